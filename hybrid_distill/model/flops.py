"""The FLOP model of one training step: token counts, FLOPs per image by part, parameter counts, device peaks.

The one home of this arithmetic: ``benchmarks/train_throughput.py`` (TFLOP/s, MFU), the trainer (``tflops`` and
``mfu`` in every logged line) and ``launch.py --dry-run`` all call it. Pure Python, no torch import: the dry run
plans a run in well under a second. Shapes come either from built modules (``shape_of``, duck-typed) or, without
building anything, from the config's model names and dimensions (``shape_from_config``).

Counted: matmuls only, 2 FLOPs per multiply-add (the usual model-FLOP convention, as in MFU). A linear layer
with ``W`` weights on ``n`` tokens is ``2·n·W``; a transformer block on ``n`` tokens is
``2n·(attention weights + MLP weights) + 4n²·I`` (q·kᵀ and attn·v, ``I`` = heads × head dim), which for a
standard ViT (``I = D``, MLP ``4D``) is ``24nD² + 4n²D``. Not counted: norms, softmax, GELU, the masking scores,
the teachers' input resize, elementwise losses, and the recomputation of activation checkpointing or of a fused
backward (model FLOPs, not hardware FLOPs).

Per image:

* MIM teacher: patch embedding, then blocks ``0 … max(masking blocks, L-2)`` on its full sequence, except that
  the last one, when it is not a masking block, computes only its q/k projection (``Teacher.mim_targets``); with
  ``masking.teacher_prunes`` the blocks after each masking block run on the kept tokens; attention modules whose
  q, k the capture recomputes (open_clip's ``nn.MultiheadAttention``, timm's RoPE attentions) add that q/k
  projection at the relation block it runs in full.
* feature teacher: patch embedding and every block on its full sequence (+ the projection for ``feature=proj``).
* student: patch embedding of every patch; blocks and the feature head on the N' kept tokens. Backward: 2× the
  forward for blocks and head, 1× for the patch embedding (its weight gradient; the images need none).
* relation loss, per (image, head) and layer pair: ``2N'²·d_s`` (S = q_s·k_sᵀ) + ``2N'²·d_t`` (the teacher's T)
  + ``4N'²·d_s`` (dq_s, dk_s); ``8N'²·d`` when the head dims agree. Two layer pairs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PARTS = ("teacher_mim", "teacher_feature", "student_fwd", "student_bwd", "relation_loss")
RELATION_PAIRS = 2  # (L-3, L-2) of the student with (L-3, L-2) of the MIM teacher

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (the sparse figures halved), matched in this
# order against torch.cuda.get_device_name(); unknown devices get None (no MFU, TFLOP/s is still logged).
DEVICE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),  # H200 SXM
    ("H100 NVL", 835.5),
    ("H100 PCIE", 756.5),
    ("H100", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM and PCIe
)


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by its ``torch.cuda.get_device_name()`` (``None`` if not in the table or no GPU)."""
    name = (device_name or "").upper()
    return next((peak for key, peak in DEVICE_PEAK_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------------------------
# Token counts (progressive redundant-token masking, paper Eq. 4)


def keep_count(num_tokens: int, drop_ratio: float) -> int:
    """Tokens kept out of ``num_tokens`` when dropping ``drop_ratio`` of them: ``floor((1 - K) n + 0.5)``, >= 1."""
    return max(1, math.floor(round((1.0 - drop_ratio) * num_tokens, 6) + 0.5))  # round: 0.7 * 45 = 31.4999...


def keep_schedule(num_patches: int, drop_ratio: float, num_stages: int) -> list[int]:
    """Patch tokens kept after each masking stage, e.g. ``keep_schedule(196, 0.3, 3) == [137, 96, 67]``."""
    counts, n = [], num_patches
    for _ in range(num_stages):
        n = keep_count(n, drop_ratio)
        counts.append(n)
    return counts


def default_mask_layers(depth: int) -> list[int]:
    """Masking blocks I = [0, L/3, 2L/3] (0-indexed block outputs; PCAE's choice)."""
    return [0, depth // 3, 2 * depth // 3]


# ----------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ViTShape:
    """What the FLOP and memory models need of a ViT.

    Attributes:
        dim: residual width D.
        depth: number of blocks L.
        heads, head_dim: attention heads and their width (I = heads × head_dim).
        attn_weights: weights of one block's q/k/v and output projections (4·D·I for a standard block).
        mlp_weights: weights of one block's MLP matrices (2·D·H for hidden width H; 3·D·H for SwiGLU).
        qk_weights: weights a q/k-only projection multiplies: the fused qkv linear of a timm ``Attention`` (v is
            computed too), 2·D·I where q, k are projected on their own.
        qk_recompute: the q/k capture recomputes q, k in a block that runs in full (``nn.MultiheadAttention``,
            RoPE attentions); a timm ``Attention`` is tapped at its qkv output for free.
        patch: patch side p (the patch embedding multiplies 3·p² inputs per patch).
        num_patches: patch tokens at the input size the model sees.
        num_prefix: CLS (+ register) tokens.
        head_out: width of the model's own head (a timm classifier, a CLIP image projection; 0 without one).
        params: parameter count, head included.
        largest_layer: parameters of the largest single module (ZeRO-3 gathers one at a time).
    """

    dim: int
    depth: int
    heads: int
    head_dim: int
    attn_weights: int
    mlp_weights: int
    qk_weights: int
    qk_recompute: bool
    patch: int
    num_patches: int
    num_prefix: int
    head_out: int
    params: int
    largest_layer: int

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return self.num_prefix + self.num_patches


class UnknownModel(ValueError):
    """A model name the name-based shapes do not cover (build the model to read its shape instead)."""


# timm ViT/DeiT families by name: (width, depth, heads, MLP hidden)
TIMM_SIZES = {"tiny": (192, 12, 3, 768), "small": (384, 12, 6, 1536), "base": (768, 12, 12, 3072),
              "large": (1024, 24, 16, 4096), "huge": (1280, 32, 16, 5120), "giant": (1408, 40, 16, 6144)}
TIMM_NAME = re.compile(r"^(?:vit|deit|deit3)_(tiny|small|base|large|huge|giant)_patch(\d+)_(clip_)?(?:quickgelu_)?"
                       r"\d+(?:\.(\w+))?$")
# Width of the head timm builds for a pretrained tag (CLIP towers: the image projection, by tower width).
TIMM_HEADS = {None: 1000, "mae": 0, "fb_in1k": 1000, "in1k": 1000, "augreg_in1k": 1000, "augreg_in21k": 21843,
              "augreg2_in21k_ft_in1k": 1000, "augreg_in21k_ft_in1k": 1000, "fb_in22k_ft_in1k": 1000}
CLIP_PROJ = {768: 512, 1024: 768, 1280: 1024}


def vit_shape(dim: int, depth: int, heads: int, hidden: int, patch: int, img_size: int, head_out: int,
              num_prefix: int = 1, fused_qkv: bool = True, pre_norm: bool = False, patch_bias: bool = True,
              head_bias: bool = True) -> ViTShape:
    """The shape of a standard ViT (LayerNorm, GELU MLP, biased attention and MLP) from its dimensions."""
    patches = (img_size // patch) ** 2
    attn_w, mlp_w = 4 * dim * dim, 2 * dim * hidden
    block = attn_w + 4 * dim + mlp_w + hidden + dim + 4 * dim  # + the biases + two LayerNorms
    embed = (3 * patch * patch + patch_bias + 2 * num_prefix + patches) * dim  # conv, CLS, position embedding
    head = head_out * dim + (head_out if head_bias else 0)
    params = embed + depth * block + 2 * dim + (2 * dim if pre_norm else 0) + head
    return ViTShape(dim=dim, depth=depth, heads=heads, head_dim=dim // heads, attn_weights=attn_w,
                    mlp_weights=mlp_w, qk_weights=(3 if fused_qkv else 2) * dim * dim, qk_recompute=not fused_qkv,
                    patch=patch, num_patches=patches, num_prefix=num_prefix, head_out=head_out, params=params,
                    largest_layer=max(dim * hidden + hidden, 3 * dim * dim + 3 * dim, head))


def shape_from_config(section: Any, img_size: int, head_out: int | None = None) -> ViTShape:
    """The shape of a student or teacher section (``model`` + explicit dims) at ``img_size``, without building it.

    Args:
        section: a ``StudentConfig`` or ``TeacherConfig``.
        img_size: the input size the model sees.
        head_out: width of its head (the student's: 0, it is built without one); ``None``: what the name's
            pretrained tag gives.

    Raises:
        UnknownModel: a name outside the timm ViT/DeiT families and open_clip's own model configs.
    """
    if getattr(section, "library", "timm") == "open_clip":
        return _open_clip_shape(section.model, img_size)
    match = TIMM_NAME.match(section.model)
    if match is None:
        raise UnknownModel(f"no name-based shape for timm model {section.model!r}")
    size, patch, clip, tag = match.groups()
    dim, depth, heads, hidden = TIMM_SIZES[size]
    if head_out is None:
        if clip:
            head_out = CLIP_PROJ.get(dim, dim) if tag == "openai" else 0
        elif tag in TIMM_HEADS:
            head_out = TIMM_HEADS[tag]
        else:
            raise UnknownModel(f"no head width known for the pretrained tag of {section.model!r}")
    mlp_ratio = hidden / dim
    dim, depth, heads = section.embed_dim or dim, section.depth or depth, section.num_heads or heads
    return vit_shape(dim, depth, heads, int(dim * mlp_ratio), section.patch_size or int(patch), img_size, head_out,
                     pre_norm=bool(clip), patch_bias=not clip)


def _open_clip_config(model: str) -> dict:
    """open_clip's model config for ``model``: from its registry when open_clip is loaded (configs added with
    ``open_clip.add_model_config`` included), else the JSON in its package, read without importing it."""
    if "open_clip" in sys.modules:
        config = sys.modules["open_clip"].get_model_config(model)
        if config:
            return config
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{model}.json" if spec else None
    if path is None or not path.is_file():
        raise UnknownModel(f"no open_clip model config for {model!r}")
    return json.loads(path.read_text())


def _open_clip_shape(model: str, img_size: int) -> ViTShape:
    """An open_clip ViT tower (``nn.MultiheadAttention`` blocks, ``ln_pre``, projection) from its model config."""
    config = _open_clip_config(model)
    vision = config["vision_cfg"]
    width, layers = vision["width"], vision["layers"]
    if not isinstance(layers, int) or vision.get("timm_model_name") or vision.get("attentional_pool"):
        raise UnknownModel(f"open_clip {model!r} is not a plain ViT tower")
    return vit_shape(width, layers, width // vision.get("head_width", 64), int(width * vision.get("mlp_ratio", 4.0)),
                     vision["patch_size"], img_size, head_out=config["embed_dim"], fused_qkv=False, pre_norm=True,
                     patch_bias=False, head_bias=False)


def shape_of(model: Any) -> ViTShape:
    """The shape of a built timm ``VisionTransformer``/``Eva`` or open_clip ``VisionTransformer`` (``.visual``)."""
    from torch import nn

    from hybrid_distill.model.qk_capture import ROPE_ATTENTIONS, attention_of, head_dims  # torch: models exist

    open_clip = hasattr(model, "transformer")
    blocks = model.transformer.resblocks if open_clip else model.blocks
    conv = model.conv1 if open_clip else model.patch_embed.proj
    attn = attention_of(blocks[0])
    heads, head_dim = head_dims(attn)
    tapped = not isinstance(attn, (nn.MultiheadAttention, *ROPE_ATTENTIONS))  # fused qkv, hooked at its output
    if open_clip:
        head_out = model.proj.shape[1] if model.proj is not None else 0
        grid = model.grid_size
    else:
        head_out = model.head.out_features if isinstance(model.head, nn.Linear) else 0
        grid = model.patch_embed.grid_size
    dim = conv.out_channels
    return ViTShape(dim=dim, depth=len(blocks), heads=heads, head_dim=head_dim, attn_weights=_weights(attn),
                    mlp_weights=_weights(blocks[0].mlp),
                    qk_weights=attn.qkv.weight.numel() if tapped else 2 * dim * heads * head_dim,
                    qk_recompute=not tapped, patch=conv.kernel_size[0], num_patches=math.prod(grid),
                    num_prefix=1 if open_clip else model.num_prefix_tokens, head_out=head_out,
                    params=sum(p.numel() for p in model.parameters()),
                    largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()))


def _weights(module: Any) -> int:
    """Matmul weights of a module: every 2-D ``weight`` and ``nn.MultiheadAttention``'s packed projection."""
    return sum(p.numel() for m in module.modules() for name, p in m.named_parameters(recurse=False)
               if p.ndim == 2 and (name == "weight" or name.endswith("proj_weight")))


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def block_flops(s: ViTShape, n: int) -> float:
    """One transformer block on ``n`` tokens, forward."""
    return 2 * n * (s.attn_weights + s.mlp_weights) + 4 * n * n * s.inner


def embed_flops(s: ViTShape) -> float:
    """Patch embedding of every patch, forward."""
    return 2 * s.num_patches * 3 * s.patch * s.patch * s.dim


def mim_teacher_flops(s: ViTShape, drop_ratio: float, mask_layers: list[int], prunes: bool) -> float:
    """MIM teacher forward per image, as ``Teacher.mim_targets`` runs it (see the module docstring)."""
    relation_blocks = (s.depth - 3, s.depth - 2)
    last = max([*relation_blocks, *mask_layers])
    n, total = s.tokens, embed_flops(s)
    for i in range(last + 1):
        if i == last and i not in mask_layers:
            return total + 2 * n * s.qk_weights  # only its q, k are needed
        total += block_flops(s, n)
        if s.qk_recompute and i in relation_blocks:
            total += 2 * n * 2 * s.dim * s.inner
        if prunes and i in mask_layers:
            n = s.num_prefix + keep_count(n - s.num_prefix, drop_ratio)
    return total


def feature_teacher_flops(s: ViTShape, proj_dim: int = 0) -> float:
    """Feature teacher forward per image: every block on its full sequence (+ a ``proj_dim`` projection)."""
    return embed_flops(s) + s.depth * block_flops(s, s.tokens) + 2 * s.tokens * s.dim * proj_dim


def relation_flops(n_kept: int, heads: int, d_student: int, d_teacher: int) -> float:
    """Relation loss forward + backward per image: S, T, dq_s, dk_s for every head of both layer pairs."""
    return RELATION_PAIRS * heads * n_kept * n_kept * (6 * d_student + 2 * d_teacher)


@dataclass(frozen=True)
class StepShapes:
    """Everything the per-image FLOP count of a step depends on."""

    student: ViTShape
    head_out: int  # feature head width (the feature teacher's)
    mim: ViTShape
    feature: ViTShape
    feature_proj: int  # projection width when feature=proj, else 0
    mask_layers: tuple[int, ...]
    drop_ratio: float
    prunes: bool

    @property
    def keep(self) -> list[int]:
        """Patch tokens kept after each masking layer."""
        return keep_schedule(self.student.num_patches, self.drop_ratio, len(self.mask_layers))

    @property
    def n_kept(self) -> int:
        """N': CLS + the patch tokens left after the last masking layer."""
        return 1 + self.keep[-1]


def step_flops(shapes: StepShapes) -> dict[str, float]:
    """FLOPs per image of every part of a step (``PARTS``)."""
    s, nk = shapes.student, shapes.n_kept
    trunk = s.depth * block_flops(s, nk) + 2 * nk * s.dim * shapes.head_out
    return {
        "teacher_mim": mim_teacher_flops(shapes.mim, shapes.drop_ratio, list(shapes.mask_layers), shapes.prunes),
        "teacher_feature": feature_teacher_flops(shapes.feature, shapes.feature_proj),
        "student_fwd": embed_flops(s) + trunk,
        "student_bwd": embed_flops(s) + 2 * trunk,
        "relation_loss": relation_flops(nk, s.heads, s.head_dim, shapes.mim.head_dim),
    }


def task_shapes(task: Any) -> StepShapes:
    """The shapes of a built ``HybridDistillTask`` (its config's masking settings)."""
    cfg = task.cfg
    feature = shape_of(task.feature_teacher.backbone.model)
    return StepShapes(student=shape_of(task.trainable.student), head_out=task.trainable.head.out_features,
                      mim=shape_of(task.mim_teacher.backbone.model), feature=feature,
                      feature_proj=feature.head_out if cfg.feature_teacher.feature == "proj" else 0,
                      mask_layers=tuple(task.mask_layers), drop_ratio=cfg.masking.drop_ratio,
                      prunes=cfg.masking.teacher_prunes)


def config_shapes(cfg: Any, fallback: Callable[[Any, int, int | None], ViTShape] | None = None) -> StepShapes:
    """The shapes of the run ``cfg`` describes, from model names and dimensions (nothing is built).

    Teachers see the size that puts their patch grid on the student's (``grid_align=resize``), or their own
    ``img_size`` / the crop (``resample``), as ``teachers.aligned_img_size`` chooses.

    Args:
        cfg: the run's config.
        fallback: ``(section, img_size, head_out) -> ViTShape`` for models outside the name-based shapes (e.g.
            build them on the meta device); without one those raise.

    Raises:
        UnknownModel: a model the name-based shapes do not cover, and no ``fallback``.
    """
    def shape(section: Any, img_size: int, head_out: int | None = None) -> ViTShape:
        try:
            return shape_from_config(section, img_size, head_out)
        except UnknownModel:
            if fallback is None:
                raise
            return fallback(section, img_size, head_out)

    student = shape(cfg.student, cfg.student.img_size, head_out=0)
    grid = cfg.student.img_size // student.patch
    teachers = []
    for section in (cfg.mim_teacher, cfg.feature_teacher):
        img = section.img_size or cfg.student.img_size
        if section.grid_align == "resize":
            img = grid * shape(section, cfg.student.img_size).patch
        teachers.append(shape(section, img))
    mim, feature = teachers
    proj = feature.head_out if cfg.feature_teacher.feature == "proj" else 0
    return StepShapes(student=student, head_out=proj or feature.dim, mim=mim, feature=feature, feature_proj=proj,
                      mask_layers=tuple(cfg.masking.layers or default_mask_layers(mim.depth)),
                      drop_ratio=cfg.masking.drop_ratio, prunes=cfg.masking.teacher_prunes)
