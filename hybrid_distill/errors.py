"""The one exception hierarchy: every error a user can fix by changing their input.

``train.main`` (and the other command-line tools) turn exactly these into exit code 2 and a one-line message;
anything else is a bug and keeps its traceback.

* ``ConfigError``: a config key, value, type or range; the DeepSpeed JSON; a file named in the config.
* ``CheckpointError``: a training checkpoint that cannot be found, is incomplete, or cannot be loaded.
* ``WeightsError``: a teacher weights file that is missing, unreadable or does not fit the architecture.
* ``DataError``: a data source that is missing or malformed.
* ``ExportError``: nothing to export, or weights that do not fit the configured student.
"""

from __future__ import annotations


class HybridDistillError(Exception):
    """Bad input: the message names the key, file or shape at fault and how to fix it."""


class ConfigError(HybridDistillError, ValueError):
    """A configuration problem; the message names the key and what would be valid."""


class CheckpointError(HybridDistillError, RuntimeError):
    """A training checkpoint cannot be found, is incomplete, or cannot be loaded; the message names the path."""


class WeightsError(HybridDistillError, RuntimeError):
    """A teacher weights file is missing, unreadable or does not match the architecture; names the file and keys."""


class DataError(HybridDistillError, ValueError):
    """A data source is missing or malformed; the message names ``data.source`` (or the key) and the path."""


class ExportError(HybridDistillError, RuntimeError):
    """No checkpoint, no config, or weights that do not fit the configured student; the message names the path."""
