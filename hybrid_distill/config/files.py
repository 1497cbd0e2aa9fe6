"""Checks of the files and folders a config names, in one place: the trainer runs them all before any heavy
start-up (``check_inputs``), and the builders that open those files call the same function."""

from __future__ import annotations

import os
from pathlib import Path

from hybrid_distill.config.schema import Config, TeacherConfig, parse_source
from hybrid_distill.errors import ConfigError, DataError, WeightsError

WEIGHT_KEYWORDS = ("random", "pretrained")


def check_ds_config_file(path: str | Path) -> Path:
    """The DeepSpeed JSON ``path``, which must exist."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {str(path)!r} does not exist (see ds_configs/ for zero1/2/3)")
    return path


def check_weights_file(teacher: TeacherConfig, role: str) -> None:
    """A teacher's ``weights`` is ``random``, ``pretrained`` or an existing file."""
    if teacher.weights not in WEIGHT_KEYWORDS and not Path(teacher.weights).is_file():
        raise WeightsError(f"{role}.weights={teacher.weights!r}: no such checkpoint file "
                           "(use random, pretrained, or a path to a local checkpoint)")


def folder_root(target: str, key: str = "data.source") -> Path:
    """The directory of a ``folder:PATH`` source (named by config key ``key``), which must exist."""
    root = Path(os.path.expanduser(target))
    if not root.is_dir():
        raise DataError(f"{key}=folder:{target}: folder {str(root)!r} does not exist")
    return root


def check_resume_arg(resume: str) -> None:
    """``--resume`` is ``auto``, ``none`` or an existing path."""
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError(f"--resume {resume!r} does not exist")


def check_inputs(cfg: Config, ds_config: str | Path, resume: str) -> None:
    """Every cheap file check, before teachers, data or the process group are touched."""
    check_ds_config_file(ds_config)
    for key, source in (("data.source", cfg.data.source), ("eval.train_source", cfg.eval.train_source),
                        ("eval.val_source", cfg.eval.val_source)):
        kind, where = parse_source(source, key) if source else ("", "")
        if kind == "folder":
            folder_root(where, key)
    check_weights_file(cfg.mim_teacher, "mim_teacher")
    check_weights_file(cfg.feature_teacher, "feature_teacher")
    check_resume_arg(resume)
