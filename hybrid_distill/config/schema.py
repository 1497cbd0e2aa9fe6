"""The typed configuration tree: one dataclass per component, its choices and its range checks.

Components receive their own sub-config; runtime state (rank, device, step) never goes back into it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from hybrid_distill.errors import ConfigError


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
    grad_checkpointing: bool = False  # recompute each block in the backward (timm checkpoint_seq): less memory
    # Input normalisation the student is trained with (recorded in the export's pretrained_cfg). ImageNet's, as
    # MAE/dBOT and their fine-tuning recipes use (timm.data.IMAGENET_DEFAULT_MEAN/STD, written out because the config
    # imports no timm; a test keeps them equal); timm's own tag for a model name may differ (augreg: 0.5/0.5).
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
    """Progressive redundant-token masking (paper Eq. 4, docs/algorithm.md)."""

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
    # The relation R distilled at blocks L-3, L-2: sqrt_d = q k^T / sqrt(d_head) (timm's attention logits, our
    # default), none = q k^T as Eq. 2 writes R_m^i (docs/algorithm.md).
    relation_scale: str = "sqrt_d"


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
    # torch.compile of the student + head, the teachers' forwards and the loss (shapes are static: N' is fixed):
    # none | default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs (torch.compile modes)
    compile: str = "none"
    compile_backend: str = "inductor"  # any torch._dynamo backend; aot_eager checks graph capture without codegen


@dataclass
class EvalConfig:
    """Online evaluation of the student during training (docs/evaluation.md); off while ``train_source`` is null.

    At step 0 (a fresh run), every ``every`` optimizer steps and at the last step, the student's frozen features of
    two fixed labelled subsets (same source forms as ``data.source``) are classified by weighted k-NN and a linear
    probe, and its attention distance and NMI per block are measured on a fixed batch of the val subset.
    """

    train_source: str | None = None  # labelled images the classifiers are fitted on (folder:, hf:, wds:, synthetic)
    val_source: str | None = None  # labelled held-out images they are scored on
    train_split: str = "train"  # hf/wds split names
    val_split: str = "validation"
    train_samples: int | None = 10000  # fixed subset sizes (seeded choice); null: the whole source
    val_samples: int | None = 5000
    every: int = 1000  # optimizer steps between evaluations
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear", "attention"])
    pools: list[str] = field(default_factory=lambda: ["cls", "avg"])  # CLS token, mean of the patch tokens
    knn_k: int = 20  # DINO's weighted k-NN: k neighbours, cosine similarity, votes exp(sim / T)
    knn_temperature: float = 0.07
    linear_epochs: int = 100  # L-BFGS iterations (each one full pass over the features)
    linear_weight_decay: float = 1e-4  # L2 penalty of the probe (mean cross-entropy + wd/2 ||W||^2)
    attention_images: int = 16  # fixed val batch for attention distance / NMI
    batch_size: int = 64  # per-device images per forward
    num_workers: int = 2
    crop_pct: float = 0.875  # resize the shorter side to img_size / crop_pct, centre-crop img_size (DINO: 224/256)
    image_key: str | None = None  # hf/wds image column (None: auto, as data.image_key)
    streaming: bool = False  # hf/wds: read the first samples of the stream instead of materialising the source


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
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "mim_teacher.library": ("timm", "open_clip"),
    "feature_teacher.library": ("timm", "open_clip"),
    "mim_teacher.feature": ("norm", "prenorm", "proj"),
    "feature_teacher.feature": ("norm", "prenorm", "proj"),
    "mim_teacher.grid_align": ("resize", "resample"),
    "feature_teacher.grid_align": ("resize", "resample"),
    "loss.head_reduce": ("none", "mean"),
    "loss.relation_impl": ("auto", "torch", "triton"),
    "loss.relation_scale": ("sqrt_d", "none"),
    "run.teacher_dtype": ("bfloat16", "float16", "float32"),
    "run.compile": ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def validate(cfg: Config) -> Config:
    """Check choices, ranges and cross-field combinations; raise ``ConfigError`` naming the key."""
    _check_finite(cfg)
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
    _check_eval(cfg.eval)
    _check_student(cfg)
    _check(cfg.masking.layers is None or len(cfg.masking.layers) > 0 and min(cfg.masking.layers) >= 0,
           "masking.layers", "must be null (the default [0, L/3, 2L/3]) or a non-empty list of MIM-teacher block "
           f"indices >= 0, got {cfg.masking.layers}")
    for role in ("mim_teacher", "feature_teacher"):
        std = getattr(cfg, role).std
        _check(std is None or all(v > 0 for v in std), f"{role}.std", f"must be > 0 per channel, got {list(std or ())}")
    lo, hi = cfg.data.crop_scale
    _check(0 < lo <= hi <= 1, "data.crop_scale", "must satisfy 0 < min <= max <= 1")
    _check(0 <= cfg.data.max_bad_fraction < 1, "data.max_bad_fraction", "must be in [0, 1)")
    _check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0 (0: load in the main process)")
    _check(cfg.data.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")
    _check(cfg.data.num_samples is None or cfg.data.num_samples >= 1, "data.num_samples",
           "must be >= 1 (or null: the source's own length)")
    _check(cfg.data.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    parse_source(cfg.data.source)
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


SOURCE_FORMS = "synthetic, folder:PATH, hf:NAME_OR_PATH or wds:GLOB_OR_BRACE_PATTERN"


def parse_source(source: str, key: str = "data.source") -> tuple[str, str]:
    """Split a source (``data.source``, ``eval.*_source``) into (kind, target), e.g. ``("folder", "/data/train")``.

    Raises:
        ConfigError: naming ``key`` and the valid forms when the value is malformed.
    """
    if source == "synthetic":
        return "synthetic", ""
    kind, sep, target = str(source).partition(":")
    if kind not in ("folder", "hf", "wds") or not sep or not target.strip():
        raise ConfigError(f"{key}={source!r} is not valid; use {SOURCE_FORMS}")
    return kind, target.strip()


EVAL_PROTOCOLS = ("knn", "linear", "attention")
EVAL_POOLS = ("cls", "avg")


def _check_eval(ev: EvalConfig) -> None:
    if ev.train_source is None and ev.val_source is None:
        return
    _check(ev.train_source is not None and ev.val_source is not None, "eval.train_source/val_source",
           "must both be set (labelled images to fit the classifiers on, and held-out images to score them on)")
    for key, source in (("eval.train_source", ev.train_source), ("eval.val_source", ev.val_source)):
        parse_source(source, key)
    bad = [p for p in ev.protocols if p not in EVAL_PROTOCOLS]
    _check(not bad and ev.protocols, "eval.protocols", f"{ev.protocols} must be a non-empty list of "
           f"{', '.join(EVAL_PROTOCOLS)}")
    bad = [p for p in ev.pools if p not in EVAL_POOLS]
    _check(not bad and ev.pools, "eval.pools", f"{ev.pools} must be a non-empty list of {', '.join(EVAL_POOLS)}")
    for key in ("train_samples", "val_samples"):
        value = getattr(ev, key)
        _check(value is None or value >= 1, f"eval.{key}", "must be >= 1 (or null: the whole source)")
    _check(ev.every >= 1, "eval.every", "must be >= 1 (optimizer steps between evaluations)")
    _check(ev.knn_k >= 1, "eval.knn_k", "must be >= 1")
    _check(ev.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _check(ev.linear_epochs >= 1, "eval.linear_epochs", "must be >= 1")
    _check(ev.linear_weight_decay > 0, "eval.linear_weight_decay", "must be > 0 (the probe's optimum is then unique)")
    _check(ev.attention_images >= 1, "eval.attention_images", "must be >= 1")
    _check(ev.batch_size >= 1 and ev.num_workers >= 0, "eval.batch_size/num_workers", "must be >= 1 / >= 0")
    _check(0 < ev.crop_pct <= 1, "eval.crop_pct", "must be in (0, 1]")


def _check_student(cfg: Config) -> None:
    student = cfg.student
    _check(0 <= student.drop_path_rate < 1, "student.drop_path_rate",
           f"must be in [0, 1), got {student.drop_path_rate}")
    _check(all(v > 0 for v in student.std), "student.std", "must be > 0 per channel (the inputs are divided by "
           f"it), got {list(student.std)}")
    patch = student.patch_size or _name_patch_size(student.model)
    _check(student.img_size >= 1 and (patch is None or patch >= 1), "student.img_size/patch_size", "must be >= 1")
    if patch is not None and student.img_size % patch:
        lower, upper = student.img_size // patch * patch, (student.img_size // patch + 1) * patch
        where = "student.patch_size" if student.patch_size else f"the patch of {student.model}"
        raise ConfigError(f"student.img_size={student.img_size} is not a multiple of {patch} ({where}): the grid "
                          f"would silently drop pixels; use {lower or upper} or {upper}")


def _name_patch_size(model: str) -> int | None:
    """The patch size a timm model name states (``vit_base_patch16_224`` -> 16), or None."""
    match = re.search(r"patch(\d+)", model)
    return int(match.group(1)) if match else None


def _check_finite(node: Any, prefix: str = "") -> None:
    """Every float in the config (also inside lists/tuples) is finite: ``inf``/``nan`` pass every range check."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(f"{key}={value!r} must be a finite number")


def peak_lr(cfg: Config) -> float:
    """``optim.lr`` when set, else ``optim.base_lr * optim.global_batch_size / 1024`` (linear scaling rule)."""
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return cfg.optim.base_lr * cfg.optim.global_batch_size / 1024


def _check(ok: Any, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def get_key(cfg: Any, key: str) -> Any:
    """Value at a dotted key, e.g. ``get_key(cfg, "optim.base_lr")``."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
