"""The one place that wraps the trainable module (student + head) in DeepSpeed.

Three pieces, used by the training loop in this order::

    ds_config = resolve_ds_config(args.ds_config, cfg, world_size, device.type)  # every "auto" filled in
    engine = build_engine(task.trainable, cfg, ds_config)                       # AdamW + deepspeed.initialize
    for step in range(start, total):
        set_lr(engine, lr_at(step, total, warmup, peak_lr(cfg), cfg.optim.min_lr))
        ...                                                                      # forward/backward/step

The DeepSpeed JSON holds engine knobs only (ZeRO stage, buckets, offload, bf16 switch); batch sizes,
accumulation and clipping come from the training config, so no setting lives in two places (docs/dependencies.md).
The learning-rate schedule is ours and applied per optimizer step; DeepSpeed gets no scheduler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_distill.config import Config, peak_lr  # peak_lr: re-exported (engine.peak_lr)
from hybrid_distill.config.files import read_ds_config
from hybrid_distill.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed config


def resolve_ds_config(path: str | Path, cfg: Config, world_size: int, device_type: str) -> dict[str, Any]:
    """Load a DeepSpeed JSON and fill in every ``"auto"`` from the training config.

    DeepSpeed 0.19 does not resolve ``"auto"`` itself (docs/dependencies.md), so this does, and rejects any that remain.

    * ``train_micro_batch_size_per_gpu`` = ``data.batch_size``
    * ``gradient_accumulation_steps`` = ``optim.global_batch_size / (data.batch_size * world_size)``
      (must be a positive integer)
    * ``train_batch_size`` = ``optim.global_batch_size``
    * ``gradient_clipping`` = ``optim.clip_grad`` (``0`` disables clipping). A number written in the JSON must
      equal ``optim.clip_grad``: the training config owns the value, the JSON may only repeat it.
    * ``bf16.enabled`` = True on CUDA devices that support bf16, False elsewhere (CPU runs in fp32).
    * ``fp16.enabled`` (if present) = False: mixed precision here is bf16 only; ``true`` is rejected.
    * ``bf16``, ``fp16``, ``zero_optimization`` (and its ``offload_optimizer``/``offload_param``) must be objects.
    * ``zero_optimization.stage`` must be 1, 2 or 3 (``config.files.ZERO_STAGES``, checked by ``read_ds_config``);
      stage 0, also what a missing ``zero_optimization`` section means to DeepSpeed, is refused
      (docs/checkpoints.md says why).

    The same rule as for clipping holds for the three batch keys: a number in the JSON must match.

    Args:
        path: the DeepSpeed JSON file.
        cfg: the resolved training config.
        world_size: number of data-parallel processes.
        device_type: ``"cuda"`` or ``"cpu"`` (the device the student trains on).

    Returns:
        The resolved config dict, ready for ``deepspeed.initialize(config=...)`` and for saving in the run dir.

    Raises:
        ConfigError: unreadable file, an ``optimizer``/``scheduler`` section, a batch size that does not divide,
            a JSON number contradicting the training config, a section that is not an object (``"bf16": true``),
            ``fp16`` enabled, a ZeRO stage other than 1, 2, 3, or an ``"auto"`` this function cannot resolve.
    """
    ds = read_ds_config(path)  # its checks: known keys (top level, zero_optimization), sections, the ZeRO stage
    for key, value in _batch_values(cfg, world_size).items():
        ds[key] = _fill(ds.get(key, "auto"), value, key, path)
    ds["gradient_clipping"] = _fill(ds.get("gradient_clipping", "auto"), float(cfg.optim.clip_grad),
                                    "gradient_clipping", path, source="optim.clip_grad")
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = _bf16_supported(device_type)
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if fp16 == "auto":
        ds["fp16"]["enabled"] = False
    elif fp16:
        raise ConfigError(f"{path}: fp16.enabled={json.dumps(fp16)} is not supported: mixed precision here is bf16 "
                          "only (no fp16 loss scaling); remove the \"fp16\" section (or set \"fp16\": {\"enabled\": "
                          "false}) and use \"bf16\": {\"enabled\": \"auto\"}")
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{path}: cannot resolve \"auto\" at {', '.join(leftover)}; write explicit values there")
    return ds


def _batch_values(cfg: Config, world_size: int) -> dict[str, int]:
    micro, global_batch = cfg.data.batch_size, cfg.optim.global_batch_size
    per_step = micro * world_size
    if world_size < 1 or global_batch % per_step or global_batch < per_step:
        raise ConfigError(
            f"optim.global_batch_size={global_batch} must be a positive multiple of data.batch_size={micro} x "
            f"world size {world_size} = {per_step} (gradient accumulation steps = global / (micro x world))")
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": global_batch // per_step,
            "train_batch_size": global_batch}


def _fill(current: Any, value: Any, key: str, path: str | Path, source: str | None = None) -> Any:
    """``value`` where the JSON says "auto"; a JSON number must agree with the training config."""
    if current == "auto":
        return value
    if isinstance(current, bool) or not isinstance(current, (int, float)) or current != value:
        where = source or "the training config (data.batch_size, optim.global_batch_size, world size)"
        raise ConfigError(f"{path}: {key}={current!r} contradicts {where} which gives {value!r}; set it to \"auto\" "
                          "and change the training config instead")
    return current


def _bf16_supported(device_type: str) -> bool:
    return device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _find_auto(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and learning rate


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters that timm models exclude from weight decay (``no_weight_decay()``:
    position embedding, CLS and register tokens), for every submodule that declares them."""
    names = set()
    for prefix, sub in module.named_modules():
        if callable(getattr(sub, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    return names


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups by timm's rule: no weight decay on norms, biases, position embedding and CLS.

    ``timm.optim.param_groups_weight_decay``: a parameter has no decay when it has at most one dimension (norm
    weights, biases, LayerScale gammas), its name ends in ``.bias``, or it is in a submodule's
    ``no_weight_decay()`` (``no_weight_decay_names``). Frozen parameters (``requires_grad=False``) are left out.

    Returns:
        ``[{"params": [...], "weight_decay": 0.0}, {"params": [...], "weight_decay": weight_decay}]``; empty
        groups are dropped.
    """
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_weight_decay_names(module))


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the ``step + 1``-th update).

    Linear warmup over the first ``warmup_steps`` updates, ``peak * (step + 1) / warmup_steps``, so the first
    update already moves (``peak / warmup_steps``) and step ``warmup_steps - 1`` uses the peak. Then cosine from
    ``peak`` at ``step == warmup_steps`` to ``min_lr`` at ``step == total_steps`` (halfway, the mean of the two);
    steps past ``total_steps`` stay at ``min_lr``. ``warmup_steps == 0`` starts at the peak.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(engine: Any, lr: float) -> None:
    """Set the learning rate of every parameter group (our scheduler, called before each optimizer step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------------------------
# Engine


def build_engine(module: nn.Module, cfg: Config, ds_config: dict[str, Any]) -> Any:
    """Wrap the trainable module in a DeepSpeed engine with our AdamW as client optimizer.

    Only trainable parameters may be in ``module``: frozen ones (e.g. a teacher attached by mistake) are an
    error, because they have a history of bugs inside ZeRO (docs/dependencies.md). With ``offload_optimizer`` to CPU the
    optimizer is DeepSpeed's ``DeepSpeedCPUAdam`` in AdamW mode (same maths; DeepSpeed refuses a torch
    optimizer there), built as a JIT C++ op on first use. The process group must already exist
    (``deepspeed.init_distributed``).

    Args:
        module: ``nn.Module`` with children ``student`` and ``head`` (state-dict keys ``student.*``, ``head.*``).
        cfg: training config (``optim.*`` gives lr, betas, eps, weight decay).
        ds_config: the dict from ``resolve_ds_config``, passed as ``config=`` (not also via args: it asserts).

    Returns:
        The ``deepspeed.DeepSpeedEngine``; call it as ``engine(...)`` (under ZeRO-3 that gathers parameters),
        then ``engine.backward(loss)`` and ``engine.step()`` every micro-batch.
    """
    import deepspeed

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"build_engine: {len(frozen)} frozen parameters (e.g. {frozen[:3]}) in the trainable "
                         "module; only student + head go to DeepSpeed, teachers stay outside")
    groups = param_groups(module, cfg.optim.weight_decay)
    optimizer = _make_optimizer(groups, cfg, _offloads_optimizer(ds_config))
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def _offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _make_optimizer(groups: list[dict[str, Any]], cfg: Config, offload: bool) -> torch.optim.Optimizer:
    kwargs = dict(lr=peak_lr(cfg), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def grad_norm(engine: Any) -> float | None:
    """Global gradient norm of the last optimizer step (before clipping), or None when DeepSpeed has none.

    Valid after ``engine.step()`` at a gradient-accumulation boundary.
    """
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def skipped_steps(engine: Any) -> int:
    """Optimizer steps DeepSpeed skipped so far (overflowing bf16/fp16 gradients); log it (docs/dependencies.md)."""
    return int(getattr(engine, "skipped_steps", 0))


def copy_module_weights(engine: Any, name: str, target: nn.Module) -> None:
    """Copy the full weights of ``engine.module.<name>`` into ``target`` (same architecture), on every rank.

    Under ZeRO-3 each parameter is gathered from its partitions (``deepspeed.zero.GatheredParameters``, one at a
    time, read-only) — a collective, so every rank must call this; under ZeRO-0/1/2 the parameters are whole and
    this is a plain copy. ``target`` keeps its own dtype (a bf16 engine's weights are upcast).
    """
    import deepspeed

    source = engine.module.get_submodule(name)
    params = dict(source.named_parameters())
    with torch.no_grad():
        for key, dst in target.named_parameters():
            src = params[key]
            with deepspeed.zero.GatheredParameters([src], modifier_rank=None):
                dst.copy_(src.detach().to(device=dst.device, dtype=dst.dtype))
        buffers = dict(source.named_buffers())
        for key, dst in target.named_buffers():
            if key in buffers:
                dst.copy_(buffers[key].to(device=dst.device, dtype=dst.dtype))
