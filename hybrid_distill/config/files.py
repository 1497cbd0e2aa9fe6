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

# Every key of "zero_optimization" DeepSpeed 0.19 accepts (its DeepSpeedZeroConfig fields and aliases; the model
# forbids any other, but only once torch and DeepSpeed have loaded; tests/test_bad_input.py re-records them).
DS_ZERO_KEYS = frozenset({
    "allgather_bucket_size", "allgather_partitions", "allgather_sequential", "compute_grad_norm",
    "contiguous_gradients", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint",
    "enable_sanity_checks", "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "leaf_module",
    "legacy_stage1", "load_from_fp32_weights", "log_trace_cache_warnings", "max_live_parameters",
    "max_reuse_distance", "memory_efficient_linear", "model_persistence_threshold", "module_granularity_threshold",
    "offload_optimizer", "offload_param", "overlap_comm", "override_module_apply", "param_persistence_threshold",
    "parameter_alignment", "pipeline_loading_checkpoint", "prefetch_bucket_size", "reduce_bucket_size",
    "reduce_scatter", "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage",
    "stage3_allgather_sequential", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_model_persistence_threshold", "stage3_module_granularity_threshold",
    "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "stage3_use_all_reduce_for_fetch_params",
    "sub_group_size", "use_all_reduce_for_fetch_params", "use_multi_rank_bucket_allreduce", "zenflow",
    "zero_hpz_partition_size", "zero_quantized_gradients", "zero_quantized_nontrainable_weights",
    "zero_quantized_weights",
})

# Sections that would make DeepSpeed build its own optimizer or scheduler; we pass a client optimizer and
# set the lr ourselves every step.
FORBIDDEN_SECTIONS = ("optimizer", "scheduler")
# Sections that must be JSON objects (``.get`` is called on them), with an example of the expected form.
OBJECT_SECTIONS = {
    "bf16": '"bf16": {"enabled": true}',
    "fp16": '"fp16": {"enabled": false}',
    "zero_optimization": '"zero_optimization": {"stage": 2}',
}
# The ZeRO stages the trainer runs. Stage 0 (DeepSpeed's default without a "zero_optimization" section) is refused:
# DeepSpeed 0.19.8 saves its checkpoints without ZeRO's layout, which zero_to_fp32 (export) and ds_to_universal
# (resume on another world size) cannot read (docs/checkpoints.md).
ZERO_STAGES = (1, 2, 3)
# Sub-sections of zero_optimization that must be objects (or null) when present.
ZERO_OBJECT_SECTIONS = {
    "offload_optimizer": '"offload_optimizer": {"device": "cpu"}',
    "offload_param": '"offload_param": {"device": "cpu"}',
}


def check_ds_config_file(path: str | Path) -> Path:
    """The DeepSpeed JSON ``path``, which must exist."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"--ds_config {str(path)!r} {what} (see ds_configs/ for zero1/2/3)")
    return path


def read_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON as a dict: an existing file holding one JSON object whose keys DeepSpeed knows, with no
    ``optimizer``/``scheduler`` section, object-valued sections and ZeRO stage 1, 2 or 3. Needs no torch: the trainer
    runs it before any heavy import (``check_inputs``, ``--dry-run``); ``engine.resolve_ds_config`` then fills in
    the ``"auto"`` values.

    Raises:
        ConfigError: missing file, invalid JSON, not an object, an unknown top-level key (the closest known one is
            named), a forbidden or malformed section, or ZeRO stage 0.
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
    for section in FORBIDDEN_SECTIONS:
        if section in data:
            raise ConfigError(f"{path}: remove the {section!r} section; the trainer passes its own AdamW and sets the "
                              "learning rate every step (configure them with optim.* keys)")
    _check_sections(data, path)
    if isinstance(data.get("zero_optimization"), dict):
        check_known_keys(data["zero_optimization"], DS_ZERO_KEYS, path, "DeepSpeed refuses it",
                         prefix="zero_optimization.")
    _check_zero_stage(data, path)
    return data


def _check_sections(ds: dict[str, Any], path: str | Path) -> None:
    """Reject a ``bf16``/``fp16``/``zero_optimization`` (or offload) section that is not a JSON object."""
    for key, example in OBJECT_SECTIONS.items():
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{path}: {key!r} must be a JSON object, e.g. {example}; got {json.dumps(ds[key])}")
    zero = ds.get("zero_optimization", {})
    for key, example in ZERO_OBJECT_SECTIONS.items():
        if zero.get(key) is not None and not isinstance(zero[key], dict):
            raise ConfigError(f"{path}: 'zero_optimization.{key}' must be a JSON object, e.g. {example}; "
                              f"got {json.dumps(zero[key])}")


def _check_zero_stage(ds: dict[str, Any], path: str | Path) -> None:
    """Refuse ZeRO stage 0 (or no ``zero_optimization`` section) and stages that do not exist."""
    zero = ds.get("zero_optimization")
    stage = 0 if zero is None else zero.get("stage", 0)
    integer = isinstance(stage, int) and not isinstance(stage, bool)
    if integer and stage in ZERO_STAGES:
        return
    if not integer or stage != 0:
        raise ConfigError(f"{path}: zero_optimization.stage={json.dumps(stage)} is not a ZeRO stage the trainer runs; "
                          "use 1, 2 or 3 (a JSON integer, e.g. \"zero_optimization\": {\"stage\": 2})")
    what = "has no \"zero_optimization\" section, so DeepSpeed would run" if zero is None else "sets"
    raise ConfigError(f"{path} {what} ZeRO stage 0, which is not supported: its checkpoints can be neither exported "
                      "to timm nor resumed on another world size (DeepSpeed's zero_to_fp32 and ds_to_universal read "
                      "ZeRO checkpoints only); use \"zero_optimization\": {\"stage\": 1} (ds_configs/zero1.json: the "
                      "communication of plain data parallelism, with less memory), 2 or 3")


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
