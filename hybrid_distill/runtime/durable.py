"""Files that survive a crash: atomic replacement and fsync (of files and of the directories that name them).

A rename is atomic but not durable until the directory holding it is fsynced, and data written with ``write``
may still sit in the page cache when a node loses power: ``COMPLETE`` must never reach the disk before the files
it vouches for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to stable storage (the writer must call it: on NFS only its client's pages count)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; their renames are durable anyway
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new file, never a torn one.

    The data is fsynced before the rename and the directory after it. On failure (e.g. a full disk) the old file is
    untouched and the temporary file removed; the ``OSError`` propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
