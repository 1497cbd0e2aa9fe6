"""The typed configuration tree: one dataclass per component, loaded from presets, YAML and dotted overrides.

Every setting lives in exactly one field. Components receive their own sub-config; runtime state (rank,
device, step) never goes back into it. ``load_config`` is the one entry point::

    cfg = load_config(preset="tiny", config_file=None, overrides=["optim.base_lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what would be valid."""


@dataclass
class StudentConfig:
    """The ViT student: a timm ``VisionTransformer``, by name and/or explicit dimensions."""

    model: str = "vit_base_patch16_224"  # timm model name
    img_size: int = 224  # the crop size every sample is made at
    patch_size: int | None = None  # None: the timm model's own
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    drop_path_rate: float = 0.0
    # Input normalisation the student is trained with (recorded in the export's pretrained_cfg). ImageNet's, as
    # MAE/dBOT and their fine-tuning recipes use; timm's own tag for a model name may differ (augreg: 0.5/0.5).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class TeacherConfig:
    """A frozen teacher: any timm ViT or open_clip vision tower.

    ``weights`` is ``"random"`` (tests), ``"pretrained"`` (hub download: the timm pretrained tag in
    ``model``, or ``pretrained_tag`` for open_clip) or a path to a local checkpoint in the upstream format.
    """

    library: str = "timm"  # timm | open_clip
    model: str = "vit_base_patch16_224.mae"
    weights: str = "random"  # random | pretrained | /path/to/checkpoint
    pretrained_tag: str | None = None  # open_clip tag: downloaded with weights=pretrained; else sets mean/std
    img_size: int | None = None  # None: chosen so the teacher's patch grid equals the student's
    embed_dim: int | None = None  # explicit timm dimensions (tiny teachers); None: the model's own
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mean: tuple[float, float, float] | None = None  # None: the model's own pretrained_cfg / open_clip values
    std: tuple[float, float, float] | None = None
    force_quick_gelu: bool = False  # open_clip: OpenAI checkpoints need QuickGELU
    feature: str = "norm"  # feature target: norm (after final norm) | prenorm | proj (CLIP projection)
    grid_align: str = "resize"  # resize (teacher sees a resized crop) | resample (token map resampled)


@dataclass
class MaskingConfig:
    """Progressive redundant-token masking (paper Eq. 4, DESIGN 1.2)."""

    drop_ratio: float = 0.3  # K: fraction of the kept patch tokens dropped at each masking layer
    layers: list[int] | None = None  # MIM-teacher blocks scored; None: [0, L//3, 2L//3]
    teacher_prunes: bool = False  # MIM teacher continues on kept tokens only (PCAE-style, cheaper)


@dataclass
class LossConfig:
    """Hybrid loss (Eq. 1): feature smooth-L1 + alpha * relation smooth-L1."""

    alpha: float = 1.0
    feature_beta: float = 2.0
    relation_beta: float = 1.0
    head_reduce: str = "none"  # none (head counts must match) | mean (average relations over heads)
    relation_impl: str = "auto"  # auto | torch | triton (kernels.relation_loss)


@dataclass
class DataConfig:
    """Where images come from and how one shared crop per sample is made."""

    source: str = "synthetic"  # synthetic | folder:PATH | hf:NAME_OR_PATH | wds:GLOB_OR_BRACE_PATTERN
    split: str = "train"
    streaming: bool = False  # hf/wds: iterate without materialising
    image_key: str | None = None  # None: auto (image, jpg, png, webp, ...)
    num_samples: int | None = None  # samples per epoch where the source cannot tell (streaming)
    synthetic_size: int = 256  # images in the synthetic source
    batch_size: int = 64  # per-device micro-batch
    num_workers: int = 4
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    max_bad_fraction: float = 0.01  # abort when more than this fraction of samples cannot be decoded
    shuffle_buffer: int = 1000  # streaming shuffle buffer (resume loses up to this many samples per reader)
    gpu_decode: bool = False
    cache_dir: str | None = None  # file-list cache for folder sources; None: <output_dir>/cache


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; lr = base_lr * global_batch_size / 1024."""

    base_lr: float = 6e-4
    lr: float | None = None  # absolute lr; None: scaled from base_lr
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_epochs: float = 5.0
    global_batch_size: int = 1024  # accumulation = global / (micro * world size)
    clip_grad: float = 3.0


@dataclass
class RunConfig:
    """Length of the run, logging, checkpointing and failure policy."""

    epochs: float = 300.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    ckpt_every: int = 1000  # optimizer steps between checkpoints
    keep_last: int = 3
    max_nonfinite: int = 5  # consecutive non-finite losses before saving and stopping
    stop_after_steps: int | None = None  # stop (checkpoint, exit 75 = "resume me") after this many steps of this job
    teacher_dtype: str = "bfloat16"  # bfloat16 | float16 | float32: teacher weights on accelerators (CPU: fp32)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "hybrid-distill"
    export_at_end: bool = True


@dataclass
class Config:
    """The whole run."""

    student: StudentConfig = field(default_factory=StudentConfig)
    mim_teacher: TeacherConfig = field(default_factory=TeacherConfig)
    feature_teacher: TeacherConfig = field(
        default_factory=lambda: TeacherConfig(library="timm", model="vit_base_patch16_224.augreg_in21k")
    )
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "mim_teacher.library": ("timm", "open_clip"),
    "feature_teacher.library": ("timm", "open_clip"),
    "mim_teacher.feature": ("norm", "prenorm", "proj"),
    "feature_teacher.feature": ("norm", "prenorm", "proj"),
    "mim_teacher.grid_align": ("resize", "resample"),
    "feature_teacher.grid_align": ("resize", "resample"),
    "loss.head_reduce": ("none", "mean"),
    "loss.relation_impl": ("auto", "torch", "triton"),
    "run.teacher_dtype": ("bfloat16", "float16", "float32"),
}


def validate(cfg: Config) -> Config:
    """Check choices, ranges and cross-field combinations; raise ``ConfigError`` naming the key."""
    for key, choices in CHOICES.items():
        value = get_key(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")
    _check(0.0 <= cfg.masking.drop_ratio < 1.0, "masking.drop_ratio", "must be in [0, 1)")
    _check(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(cfg.optim.global_batch_size >= cfg.data.batch_size, "optim.global_batch_size",
           f"must be >= data.batch_size ({cfg.data.batch_size})")
    _check(cfg.optim.global_batch_size % cfg.data.batch_size == 0, "optim.global_batch_size",
           f"must be a multiple of data.batch_size ({cfg.data.batch_size})")
    _check(cfg.loss.alpha >= 0, "loss.alpha", "must be >= 0")
    _check(cfg.loss.feature_beta > 0 and cfg.loss.relation_beta > 0, "loss.feature_beta/relation_beta", "must be > 0")
    _check(cfg.run.max_steps is None or cfg.run.max_steps >= 1, "run.max_steps",
           "must be >= 1 (or null: run.epochs sets the length)")
    _check(cfg.run.epochs > 0 or cfg.run.max_steps, "run.epochs", "must be > 0 (or set run.max_steps)")
    _check(cfg.run.ckpt_every >= 1 and cfg.run.keep_last >= 1, "run.ckpt_every/keep_last", "must be >= 1")
    _check(cfg.run.log_every >= 1, "run.log_every", "must be >= 1")
    _check(cfg.run.max_nonfinite >= 1, "run.max_nonfinite", "must be >= 1")
    _check_optim(cfg)
    lo, hi = cfg.data.crop_scale
    _check(0 < lo <= hi <= 1, "data.crop_scale", "must satisfy 0 < min <= max <= 1")
    _check(0 <= cfg.data.max_bad_fraction < 1, "data.max_bad_fraction", "must be in [0, 1)")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0 (0: load in the main process)")
    _check(cfg.data.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")
    _check(cfg.data.num_samples is None or cfg.data.num_samples >= 1, "data.num_samples",
           "must be >= 1 (or null: the source's own length)")
    _check(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _check(cfg.data.source == "synthetic" or cfg.data.source.split(":", 1)[0] in ("folder", "hf", "wds")
           and ":" in cfg.data.source, "data.source",
           f"{cfg.data.source!r} is not valid; use synthetic, folder:PATH, hf:NAME_OR_PATH or wds:PATTERN")
    _check(cfg.run.stop_after_steps is None or cfg.run.stop_after_steps >= 1, "run.stop_after_steps", "must be >= 1")
    for role in ("mim_teacher", "feature_teacher"):
        t = getattr(cfg, role)
        _check(t.library != "open_clip" or t.weights != "pretrained" or t.pretrained_tag
               or t.model.startswith("hf-hub:"), f"{role}.pretrained_tag",
               f"must name the open_clip weights to download for {t.model!r} (e.g. openai; see "
               "open_clip.list_pretrained()) when weights=pretrained")
    if cfg.mim_teacher.grid_align == "resample":
        raise ConfigError("mim_teacher.grid_align=resample is not supported (the MIM teacher's tokens define keep_idx "
                          "on the student grid); use resize")
    return cfg


def _check_optim(cfg: Config) -> None:
    optim = cfg.optim
    _check(optim.base_lr > 0, "optim.base_lr", "must be > 0")
    _check(optim.lr is None or optim.lr > 0, "optim.lr", "must be > 0 (or null: scaled from optim.base_lr)")
    peak = peak_lr(cfg)
    source = "optim.lr" if optim.lr is not None else "optim.base_lr x optim.global_batch_size / 1024"
    _check(0 <= optim.min_lr <= peak, "optim.min_lr", f"must be in [0, {peak:.4g}]: at most the peak lr ({source})")
    _check(optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    _check(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(all(0 <= b < 1 for b in optim.betas), "optim.betas", "must both be in [0, 1)")
    _check(optim.eps > 0, "optim.eps", "must be > 0")
    _check(optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")


def peak_lr(cfg: Config) -> float:
    """``optim.lr`` when set, else ``optim.base_lr * optim.global_batch_size / 1024`` (linear scaling rule)."""
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return cfg.optim.base_lr * cfg.optim.global_batch_size / 1024


def _check(ok: Any, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


# ----------------------------------------------------------------------------------------------------------------
# Dotted keys, YAML, overrides


def get_key(cfg: Any, key: str) -> Any:
    """Value at a dotted key, e.g. ``get_key(cfg, "optim.base_lr")``."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` configs (one may come back from JSON: tuples and
    lists compare equal)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(section)
    return out


def dotted_value(tree: dict, key: str) -> Any:
    """Value at a dotted key of a ``to_dict`` config (None where absent); ``get_key`` for the dataclasses."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set a dotted key, converting ``value`` (str from the CLI or a YAML scalar) to the field's type."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"unknown config key {key!r}: {where} has no field {part!r}; "
                              f"valid: {', '.join(sorted(names))}")
        if i == len(parts) - 1:
            hint = typing.get_type_hints(type(node))[part]
            setattr(node, part, _coerce(value, hint, key))
        else:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``hint``; raise ``ConfigError`` naming ``key`` if impossible."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if isinstance(value, str) and origin in (tuple, list):
        value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        return origin(_coerce(v, item, key) for v in value)
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects {hint.__name__}, got bool {value!r}")
        try:
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {hint.__name__}, got {value!r}") from None
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")


def _to_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, str):
        as_float = float(value)
        if not as_float.is_integer():
            raise ValueError(value)
        return int(as_float) if any(c in value for c in ".eE") else int(value)
    return int(value)


def apply_dict(cfg: Config, values: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested mapping (from YAML) onto ``cfg``, with the same typing rules as overrides."""
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            node = get_key(cfg, key) if _is_section(cfg, key) else None
            if node is None:
                set_key(cfg, key, value)  # raises: unknown key or not a section
            apply_dict(cfg, value, prefix=f"{key}.")
        else:
            set_key(cfg, key, value)


def _is_section(cfg: Config, key: str) -> bool:
    try:
        return dataclasses.is_dataclass(get_key(cfg, key))
    except AttributeError:
        return False


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"optim.base_lr=3e-4"`` into key and raw value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.base_lr=3e-4)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(preset: str | None = "tiny", config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated config: preset, then YAML file, then dotted overrides (later wins).

    Args:
        preset: name of a function in ``hybrid_distill.presets`` (None: the dataclass defaults).
        config_file: YAML file with nested sections; may name a ``preset:`` of its own at top level.
        overrides: ``section.key=value`` strings, type-checked against the dataclass fields.
    """
    from hybrid_distill import presets

    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        preset = values.pop("preset", preset)
    cfg = presets.get_preset(preset) if preset else Config()
    apply_dict(cfg, values)
    for text in overrides:
        set_key(cfg, *parse_override(text))
    return validate(cfg)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. from a checkpoint's client state)."""
    cfg = Config()
    apply_dict(cfg, values)
    return validate(cfg)
