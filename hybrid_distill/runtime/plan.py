"""The plan of a run, before anything is built: ``launch.py --dry-run`` (no torch import, no model, no data).

``describe(cfg, ds_config, world_size)`` returns the text the dry run prints: the keep schedule per masking
layer, FLOPs per image by part (``hybrid_distill.model.flops``), gradient accumulation, the learning-rate
schedule, and an estimate of GPU memory per device. World size: ``WORLD_SIZE`` when set, else 1.

The memory model (``memory_estimate``), per GPU, bf16 DeepSpeed (``bf16.enabled`` auto/true), Ψ = trainable
parameters (student + feature head), W = world size:

* model states, DeepSpeed's own formulas (``estimate_zero2/3_model_states_mem_needs``): ZeRO-2 ``2Ψ + 18Ψ/W``
  (bf16 weights; bf16 + fp32 gradient, fp32 master weights and Adam's two moments partitioned); ZeRO-3
  ``4·largest layer + 18Ψ/W``; ZeRO-1 (DeepSpeed's ``BF16_Optimizer``: bf16 weights and gradients, full fp32
  gradient accumulator) ``8Ψ + 12Ψ/W``; ZeRO-0 ``20Ψ``. Offloaded optimizer: ZeRO-2 ``2Ψ``, ZeRO-3
  ``4·largest layer + 2Ψ/W``, with parameters offloaded too ``4·largest layer``;
* ZeRO-1/2 gradient buckets with ``contiguous_gradients``: ``reduce_bucket_size`` bf16 elements, twice with
  ``overlap_comm`` (ZeRO-3: once);
* teachers: all their parameters in ``run.teacher_dtype`` (not partitioned);
* activations at the micro-batch B: what the student's backward keeps (``student_activation_bytes``: per block
  and kept token, in bf16, the block input, both LayerNorm outputs, the residual after attention, q, k, v, the
  attention output, the MLP hidden before and after GELU, i.e. ``4D + 4I + 2H`` elements, plus fp32 norm
  statistics and the attention's log-sum-exp; with ``student.grad_checkpointing`` only the block input, plus
  one block recomputed at a time), the patch embedding's input and output, the final norm and head, the fused
  relation loss's precomputed fp32 gradients, the feature loss's fp32 operands, and the teachers' targets held
  for the loss; plus one block's activations of working space for the backward.

Not counted: the CUDA context and allocator caching (typically 0.5–1.5 GiB), the teachers' own forward
activations (freed before the student runs), fragmentation. Checked against torch's ``MemTracker`` and
saved-tensor accounting on the CPU (``tests/test_dry_run.py``); not yet against a GPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hybrid_distill.config import Config, peak_lr
from hybrid_distill.config.files import read_ds_config
from hybrid_distill.errors import ConfigError
from hybrid_distill.model import flops

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PART_NAMES = {"teacher_mim": "MIM teacher", "teacher_feature": "feature teacher", "student_fwd": "student forward",
              "student_bwd": "student backward", "relation_loss": "relation loss"}


def world_size_for_plan() -> int:
    """``WORLD_SIZE`` (set by the launchers) or 1."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ----------------------------------------------------------------------------------------------------------------
# Schedule


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """``optim.global_batch_size / (data.batch_size × world size)``, as ``engine.resolve_ds_config`` resolves it.

    Raises:
        ConfigError: the global batch is not a multiple of micro-batch × world size.
    """
    per_step = cfg.data.batch_size * world_size
    if cfg.optim.global_batch_size % per_step:
        raise ConfigError(f"optim.global_batch_size={cfg.optim.global_batch_size} must be a positive multiple of "
                          f"data.batch_size={cfg.data.batch_size} x world size {world_size} = {per_step}")
    return cfg.optim.global_batch_size // per_step


def dataset_size(cfg: Config) -> int | None:
    """Samples per epoch when the config states it (the synthetic size; ``data.num_samples`` of a streamed
    source), else None (a folder, a dataset's own length: known once the source is read)."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_size
    return cfg.data.num_samples if cfg.data.streaming else None


def schedule(cfg: Config, world_size: int) -> dict[str, Any]:
    """Accumulation, steps per epoch, total and warmup steps (``loop.build_run``'s arithmetic), and the lr."""
    accum = accumulation_steps(cfg, world_size)
    size = dataset_size(cfg)
    per_epoch = None if size is None else max(1, size // (world_size * cfg.data.batch_size) // accum)
    total = cfg.run.max_steps or (math.ceil(cfg.run.epochs * per_epoch) if per_epoch else None)
    warmup = round(cfg.optim.warmup_epochs * per_epoch) if per_epoch else None
    return {"accumulation": accum, "steps_per_epoch": per_epoch, "total_steps": total, "warmup_steps": warmup,
            "peak_lr": peak_lr(cfg), "min_lr": cfg.optim.min_lr}


# ----------------------------------------------------------------------------------------------------------------
# Memory


def student_activation_bytes(s: flops.ViTShape, n_kept: int, batch: int, dtype_bytes: int = 2,
                             checkpointing: bool = False) -> dict[str, int]:
    """Bytes the student + head forward keeps for the backward (see the module docstring), and its working set.

    Returns:
        ``{"saved": ..., "working": ...}``: tensors saved during the forward, and one block's activations (the
        block recomputed under checkpointing, or the gradients of the block being differentiated).
    """
    width, inner, hidden = s.dim, s.inner, s.mlp_weights // (2 * s.dim)
    per_token = (4 * width + 4 * inner + 2 * hidden) * dtype_bytes + (4 + s.heads) * 4  # + fp32 stats, lse
    block = batch * n_kept * per_token
    blocks = s.depth * (batch * n_kept * width * dtype_bytes if checkpointing else block)
    embed = batch * (3 * s.num_patches * s.patch * s.patch + s.tokens * s.dim) * dtype_bytes + batch * n_kept * 8
    final = batch * n_kept * (2 * width * dtype_bytes + 2 * 4)  # final norm input + output (head input), fp32 stats
    return {"saved": embed + blocks + final, "working": block}


def loss_and_target_bytes(shapes: flops.StepShapes, batch: int, teacher_bytes: int) -> int:
    """The loss's saved tensors (fused relation loss: fp32 dq, dk per pair; feature loss: fp32 prediction and
    target) and the teachers' targets alive until the backward."""
    nk, s, mim = shapes.n_kept, shapes.student, shapes.mim
    relation = flops.RELATION_PAIRS * 2 * batch * nk * s.inner * 4
    feature = 2 * batch * nk * shapes.head_out * 4
    mim_tokens = mim.num_prefix + (shapes.keep[-2] if shapes.prunes and len(shapes.keep) > 1 else mim.num_patches)
    qk_width = mim.qk_weights // mim.dim  # the tapped qkv output (3I), or q and k (2I)
    targets = batch * (shapes.feature.tokens * shapes.head_out + flops.RELATION_PAIRS * mim_tokens * qk_width)
    return relation + feature + targets * teacher_bytes


def model_state_bytes(psi: int, largest: int, ds: dict[str, Any], world_size: int) -> dict[str, int]:
    """Student weights, gradients and optimizer states per GPU under the ZeRO stage of the DeepSpeed JSON."""
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    offload_param = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    W = world_size
    if stage == 3:
        states = 4 * largest + (0 if offload_param else (2 * psi // W if offload_opt else 18 * psi // W))
    elif stage == 2:
        states = 2 * psi + (0 if offload_opt else 18 * psi // W)
    elif stage == 1:
        states = 8 * psi + 12 * psi // W
    else:
        states = 20 * psi
    buckets = 0
    if stage in (1, 2) and zero.get("contiguous_gradients", True) and not offload_opt:
        buckets = int(zero.get("reduce_bucket_size", 5e8)) * 2 * (2 if zero.get("overlap_comm", False) else 1)
    elif stage == 3:
        buckets = int(zero.get("reduce_bucket_size", 5e8)) * 2
    return {"model_states": states, "grad_buckets": buckets, "zero_stage": stage}


def memory_estimate(cfg: Config, shapes: flops.StepShapes, ds: dict[str, Any], world_size: int) -> dict[str, int]:
    """Bytes per GPU by part (see the module docstring) and their total."""
    s = shapes.student
    psi = s.params + shapes.head_out * s.dim + shapes.head_out
    teacher_bytes = DTYPE_BYTES[cfg.run.teacher_dtype]
    B = cfg.data.batch_size
    acts = student_activation_bytes(s, shapes.n_kept, B, checkpointing=cfg.student.grad_checkpointing)
    out = model_state_bytes(psi, max(s.largest_layer, shapes.head_out * s.dim), ds, world_size)
    out.update(trainable_params=psi, teachers=(shapes.mim.params + shapes.feature.params) * teacher_bytes,
               activations=acts["saved"] + acts["working"] + loss_and_target_bytes(shapes, B, teacher_bytes))
    out["total"] = out["model_states"] + out["grad_buckets"] + out["teachers"] + out["activations"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The report


def describe(cfg: Config, ds_config: str | Path, world_size: int) -> str:
    """The dry run's text (see the module docstring)."""
    shapes = flops.config_shapes(cfg, fallback=built_shape)
    ds = read_ds_config(ds_config)
    lines = [f"dry run: {cfg.student.model} student, {cfg.mim_teacher.model} + {cfg.feature_teacher.model} teachers, "
             f"world size {world_size} ({'from WORLD_SIZE' if 'WORLD_SIZE' in os.environ else 'WORLD_SIZE unset'}), "
             f"micro-batch {cfg.data.batch_size}, {ds_config}"]
    lines += _keep_lines(shapes)
    lines += _flop_lines(shapes, cfg.data.batch_size)
    lines += _schedule_lines(cfg, world_size)
    lines += _memory_lines(cfg, shapes, ds, world_size)
    return "\n".join(lines)


def built_shape(section: Any, img_size: int, head_out: int | None) -> flops.ViTShape:
    """The shape of a timm model the name-based shapes do not know, built on the meta device (imports torch and
    timm: a few seconds, no weights, no memory)."""
    import timm
    import torch

    dims = {k: getattr(section, k) for k in ("embed_dim", "depth", "num_heads", "patch_size") if getattr(section, k)}
    if head_out is not None:
        dims["num_classes"] = head_out
    with torch.device("meta"):
        return flops.shape_of(timm.create_model(section.model, pretrained=False, img_size=img_size, **dims))


def _keep_lines(shapes: flops.StepShapes) -> list[str]:
    counts = [shapes.student.num_patches, *shapes.keep]
    stages = ", ".join(f"block {layer}: {a} -> {b}" for layer, a, b in zip(shapes.mask_layers, counts, counts[1:],
                                                                             strict=False))
    return [f"keep schedule (K = {shapes.drop_ratio}): {' -> '.join(map(str, counts))} patches ({stages}); "
            f"N' = {shapes.n_kept} tokens with CLS"]


def _flop_lines(shapes: flops.StepShapes, batch: int) -> list[str]:
    per_image = flops.step_flops(shapes)
    total = sum(per_image.values())
    parts = ", ".join(f"{PART_NAMES[k]} {v / 1e9:.2f}" for k, v in per_image.items())
    return [f"FLOPs per image (GFLOP, matmuls): {parts}; total {total / 1e9:.2f} "
            f"({batch * total / 1e12:.3g} TFLOP per micro-batch)"]


def _schedule_lines(cfg: Config, world_size: int) -> list[str]:
    sc = schedule(cfg, world_size)
    if sc["steps_per_epoch"] is None:
        hint = " (data.num_samples=N plans them)" if cfg.data.streaming else ""
        steps = (f"steps per epoch unknown until {cfg.data.source!r} is read{hint}; "
                 f"warmup {cfg.optim.warmup_epochs:g} epochs")
        if sc["total_steps"]:
            steps += f", total {sc['total_steps']} steps (run.max_steps)"
    else:
        steps = (f"{sc['steps_per_epoch']} steps per epoch, total {sc['total_steps']} steps, warmup "
                 f"{sc['warmup_steps']} steps ({cfg.optim.warmup_epochs:g} epochs)")
    return [f"batch: global {cfg.optim.global_batch_size} = micro {cfg.data.batch_size} x world {world_size} x "
            f"accumulation {sc['accumulation']}; {steps}",
            f"lr: peak {sc['peak_lr']:.4g}, linear warmup then cosine to min {sc['min_lr']:.4g}"]


def _memory_lines(cfg: Config, shapes: flops.StepShapes, ds: dict[str, Any], world_size: int) -> list[str]:
    m = memory_estimate(cfg, shapes, ds, world_size)
    bf16 = (ds.get("bf16") or {}).get("enabled", "auto") in ("auto", True)
    note = "" if bf16 else " (the DeepSpeed JSON disables bf16: fp32 training needs more than this bf16 estimate)"
    ckpt = ", grad checkpointing" if cfg.student.grad_checkpointing else ""
    return [f"GPU memory per device (estimate, GiB{note}): student {m['trainable_params'] / 1e6:.1f}M parameters, "
            f"ZeRO-{m['zero_stage']} model states {_gib(m['model_states'])} + gradient buckets "
            f"{_gib(m['grad_buckets'])}; teachers ({cfg.run.teacher_dtype}) {_gib(m['teachers'])}; "
            f"activations (micro-batch {cfg.data.batch_size}{ckpt}) {_gib(m['activations'])}; "
            f"total {_gib(m['total'])} (+ CUDA context and allocator cache)"]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n >= GIB / 10 else f"{n / GIB:.2g}"
