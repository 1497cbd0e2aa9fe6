"""Which checkpoint a job may continue: the same recipe and ZeRO stage, or a different one only on purpose."""

from __future__ import annotations

import logging
from pathlib import Path

from hybrid_distill.config import Config, changed_keys, dotted_value, to_dict
from hybrid_distill.errors import ConfigError
from hybrid_distill.runtime.checkpoint import read_marker

log = logging.getLogger("hybrid_distill.resume")

# Keys that define what is trained: a checkpoint continues only the run that has them. Everything else (length,
# logging, data location, workers, kernels) may change on resume and is only reported.
RESUME_FIXED = ("student", "mim_teacher", "feature_teacher", "masking", "loss", "optim.global_batch_size",
                "data.batch_size", "data.crop_scale", "run.seed")
RESUME_FREE = ("mim_teacher.weights", "feature_teacher.weights", "loss.relation_impl", "student.grad_checkpointing")


def recipe_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """``(fixed, changed)``: the changed keys that define the recipe, and every changed key."""
    changed = changed_keys(saved, current)
    fixed = [k for k in changed if k.startswith(RESUME_FIXED) and not k.startswith(RESUME_FREE)]
    return fixed, changed


def check_resume(cfg: Config, ds_config: dict, resume: Path, on_purpose: bool) -> None:
    """Refuse to continue a checkpoint with another recipe or ZeRO stage; report other config changes.

    Raises:
        ConfigError: ``--resume auto`` found a checkpoint saved with other training-defining keys (a resubmission
            with changed overrides into the same ``--output-dir``), or the ZeRO stage differs.
    """
    marker = read_marker(resume) or {}
    stage, saved_stage = ds_config.get("zero_optimization", {}).get("stage", 0), marker.get("zero_stage")
    if saved_stage is not None and int(saved_stage) == 0:
        raise ConfigError(f"{resume} was saved without ZeRO (stage 0), which the trainer no longer runs and cannot "
                          "resume (docs/checkpoints.md); start a new run in another --output-dir")
    if saved_stage is not None and int(saved_stage) != int(stage):
        raise ConfigError(f"{resume} was saved with ZeRO stage {saved_stage} but --ds_config has stage {stage}: resume "
                          f"with the same stage (e.g. --ds_config ds_configs/zero{saved_stage}.json)")
    if not isinstance(marker.get("config"), dict):
        return  # saved before configs were recorded in the marker
    saved, current = marker["config"], to_dict(cfg)
    fixed, changed = recipe_changes(saved, current)
    if fixed and not on_purpose:
        diffs = ", ".join(f"{k}: {dotted_value(saved, k)!r} -> {dotted_value(current, k)!r}" for k in fixed)
        raise ConfigError(f"--resume auto found {resume}, saved with another recipe ({diffs}). Resume with the same "
                          "settings, use another --output-dir for a new run, or pass --resume PATH to continue from "
                          "that checkpoint with the new settings on purpose")
    if changed:
        log.warning("resuming %s with changed config keys: %s", resume, ", ".join(changed))
