"""Checks of the files and folders a config names, in one place: the trainer runs them all before any heavy
start-up (``check_inputs``), and the builders that open those files call the same function."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from hybrid_distill.config.schema import Config, TeacherConfig, parse_source
from hybrid_distill.errors import ConfigError, DataError, WeightsError

WEIGHT_KEYWORDS = ("random", "pretrained")
# Every top-level key DeepSpeed 0.19 reads (recorded from its own parser, DeepSpeedConfig; tests/test_bad_input.py
# re-records them from the installed DeepSpeed). DeepSpeed ignores any other key, so a typo such as
# "zero_optimisation" silently trains at ZeRO stage 0: such a key is refused.
DS_TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "compression_training", "csv_monitor", "curriculum_learning",
    "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt", "disable_allgather",
    "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel", "flops_profiler", "fp16",
    "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor",
    "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula",
    "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop", "quantize_training", "scheduler",
    "seq_parallel_communication_data_type", "sparse_attention", "sparse_gradients", "steps_per_print",
    "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})


def check_ds_config_file(path: str | Path) -> Path:
    """The DeepSpeed JSON ``path``, which must exist."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {str(path)!r} does not exist (see ds_configs/ for zero1/2/3)")
    return path


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON as a dict: an existing file holding one JSON object whose keys DeepSpeed knows.

    Raises:
        ConfigError: missing file, invalid JSON, not an object, or an unknown top-level key (the closest known one
            is named).
    """
    path = check_ds_config_file(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    check_known_keys(data, DS_TOP_LEVEL_KEYS, path, "DeepSpeed ignores unknown top-level keys: this run would "
                     "silently use its defaults there")
    return data


def check_known_keys(data: dict[str, Any], known: frozenset[str] | set[str], path: str | Path, why: str,
                     prefix: str = "") -> None:
    """Refuse a key of ``data`` (the JSON object at ``prefix``) not in ``known``, naming the closest known one."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {prefix + close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{path}: unknown key {prefix + key!r} ({why}): {hint}")


def check_output_dir(output_dir: str | Path) -> None:
    """The run directory is a directory (or can be made) that this process may write to."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir (run.output_dir) {str(path)!r} is a file, not a directory: choose another "
                          "path")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir (run.output_dir) {str(path)!r}: no permission to write in {str(parent)!r}")


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


def check_device_support(cfg: Config, device_type: str) -> None:
    """Settings that need a CUDA device, on a rank that has none."""
    if cfg.loss.relation_impl == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("loss.relation_impl=triton needs a CUDA GPU and this rank has none: use loss.relation_impl="
                          "auto (Triton on GPUs, PyTorch elsewhere) or torch")


def check_inputs(cfg: Config, ds_config: str | Path, resume: str) -> None:
    """Every cheap file check, before teachers, data or the process group are touched."""
    read_ds_config(ds_config)
    check_output_dir(cfg.run.output_dir)
    for key, source in (("data.source", cfg.data.source), ("eval.train_source", cfg.eval.train_source),
                        ("eval.val_source", cfg.eval.val_source)):
        kind, where = parse_source(source, key) if source else ("", "")
        if kind == "folder":
            folder_root(where, key)
    check_weights_file(cfg.mim_teacher, "mim_teacher")
    check_weights_file(cfg.feature_teacher, "feature_teacher")
    check_resume_arg(resume)
