"""Frozen teachers: any timm ViT or open_clip vision tower, in either role (docs/algorithm.md).

A ``Teacher`` wraps one ``Backbone`` (``backbones``) so that one forward pass gives what its role needs:

* MIM role (``mim_targets``): hidden states at the masking blocks -> ``keep_idx``; q, k at blocks
  ``L-3, L-2`` for the relation targets.
* feature role (``feature_targets``): last-block tokens after the teacher's own final norm (or before it,
  or after the open_clip projection), on the student's patch grid.

Each teacher normalises the shared uint8 crop with its own mean/std and sees it at the resolution that
makes its patch grid equal the student's (CLIP-L/14 at 196 px for a /16 student at 224 px); its
position embedding is resampled once, when the weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn

from hybrid_distill.config import TeacherConfig
from hybrid_distill.config.files import check_weights_file
from hybrid_distill.errors import ConfigError
from hybrid_distill.model.backbones import Backbone, EvaBackbone, OpenClipBackbone, TimmBackbone
from hybrid_distill.model.masking import gather_tokens, keep_count, least_redundant, prefix_then
from hybrid_distill.model.qk_capture import QK, attention_of, capture_qk, head_dims
from hybrid_distill.model.weights import load_open_clip_file, load_timm_file

# ----------------------------------------------------------------------------------------------------------------
# Building: architecture, grid alignment, weights


def aligned_img_size(cfg: TeacherConfig, patch_size: int, student_grid: tuple[int, int], student_img: int,
                     role: str) -> int:
    """The input size that puts the teacher's patch grid on the student's (or the student's size to resample)."""
    if cfg.grid_align == "resample":  # feature teacher only (schema.validate)
        return cfg.img_size or student_img
    want = student_grid[0] * patch_size
    if student_grid[0] != student_grid[1]:
        raise ConfigError(f"student grid {student_grid} is not square; teachers align only square grids")
    if cfg.img_size is not None and cfg.img_size != want:
        raise ConfigError(
            f"{role}.img_size={cfg.img_size} gives a {cfg.img_size // patch_size}x{cfg.img_size // patch_size} "
            f"patch grid but the student's is {student_grid[0]}x{student_grid[1]}: set {role}.img_size={want} "
            f"(or null), or {role}.grid_align=resample")
    return want


def _timm_kwargs(cfg: TeacherConfig) -> dict:
    kwargs = {name: getattr(cfg, name) for name in ("embed_dim", "depth", "num_heads", "patch_size")
              if getattr(cfg, name) is not None}
    return kwargs


def _timm_patch_size(cfg: TeacherConfig) -> int:
    with torch.device("meta"):
        model = timm.create_model(cfg.model, pretrained=False, **_timm_kwargs(cfg))
    return model.patch_embed.patch_size[0]


def build_timm(cfg: TeacherConfig, img_size: int) -> TimmBackbone:
    """A timm ViT at ``img_size`` with random, hub (``pretrained``) or local-file weights."""
    kwargs = dict(_timm_kwargs(cfg), img_size=img_size)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.weights == "pretrained", **kwargs)
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"cannot build timm teacher {cfg.model!r} with {kwargs}: {e}") from e
    if cfg.weights not in ("random", "pretrained"):
        load_timm_file(model, Path(cfg.weights), cfg.model)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ConfigError(f"timm model {cfg.model!r} is not a ViT with `blocks` and `patch_embed`")
    return EvaBackbone(model) if isinstance(model, Eva) else TimmBackbone(model)


def build_open_clip(cfg: TeacherConfig, img_size: int) -> OpenClipBackbone:
    """An open_clip vision tower at ``img_size``; position embeddings resized by open_clip's own loader."""
    import open_clip

    if any(getattr(cfg, n) is not None for n in ("embed_dim", "depth", "num_heads", "patch_size")):
        raise ConfigError("open_clip teachers take their dimensions from the model config; register a custom "
                          "config with open_clip.add_model_config instead of setting embed_dim/depth/num_heads")
    tag = cfg.pretrained_tag if cfg.weights == "pretrained" else None
    try:
        model = open_clip.create_model(cfg.model, pretrained=tag, force_quick_gelu=cfg.force_quick_gelu,
                                       force_image_size=img_size, device=torch.get_default_device())
    except RuntimeError as e:
        raise ConfigError(f"cannot build open_clip teacher {cfg.model!r} (pretrained={tag!r}): {e}") from e
    if cfg.weights not in ("random", "pretrained"):
        load_open_clip_file(model, Path(cfg.weights), cfg.model)
    return OpenClipBackbone(model.visual)


def open_clip_mean_std(cfg: TeacherConfig, visual: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std of an open_clip teacher: the config's, else its weights', else OpenAI's.

    open_clip keeps normalisation per (model, tag): ``ViT-L-14`` / ``laion2b_s32b_b82k`` uses 0.5/0.5, the
    ``datacomp`` CLIPA tags ImageNet's. With ``weights=pretrained`` it is what open_clip attached to the tower
    (the tag's, or an ``hf-hub:`` model's config); with a local file or random weights, ``pretrained_tag`` (if
    set) names the tag whose values to use, so a local copy of tagged weights normalises like the download.

    Raises:
        ConfigError: ``pretrained_tag`` is not one of open_clip's tags for ``model``.
    """
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    values = open_clip.get_model_preprocess_cfg(visual)  # open_clip's defaults are OpenAI's
    if cfg.pretrained_tag and cfg.weights != "pretrained":
        values = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained_tag)
        if not values:
            known = open_clip.list_pretrained_tags_by_model(cfg.model)
            raise ConfigError(f"pretrained_tag={cfg.pretrained_tag!r} is not an open_clip tag of {cfg.model!r}; "
                              f"known tags: {known or 'none'} (or leave it unset and set mean/std)")
    mean = cfg.mean or values.get("mean") or OPENAI_DATASET_MEAN
    std = cfg.std or values.get("std") or OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def _open_clip_patch_size(cfg: TeacherConfig) -> int:
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise ConfigError(f"unknown open_clip model {cfg.model!r}; see open_clip.list_models()")
    return model_cfg["vision_cfg"]["patch_size"]


# ----------------------------------------------------------------------------------------------------------------
# The teacher


@dataclass
class MimTargets:
    """What the MIM teacher gives the loss.

    Attributes:
        keep_idx: ``(B, N')`` kept positions on the student's token grid (CLS first).
        qk: ``[(q, k)]`` at the relation blocks, ``(B, H, M, d)``.
        qk_index: per relation block, ``(B, N')`` positions of the kept tokens along ``M`` (``keep_idx`` when the
            teacher saw all tokens; positions within its pruned sequence when it pruned).
    """

    keep_idx: torch.Tensor
    qk: list[QK]
    qk_index: list[torch.Tensor]


class Teacher(nn.Module):
    """A frozen teacher (eval mode forever, no gradients).

    Args:
        backbone: the wrapped timm or open_clip tower.
        img_size: input size it sees (the crop is resized on the device when it differs).
        mean, std: its own input normalisation.
        grid_size: the student's patch grid (targets are delivered on it).
    """

    def __init__(self, backbone: Backbone, img_size: int, mean, std,
                 grid_size: tuple[int, int]):
        super().__init__()
        self.backbone = backbone
        self.img_size = img_size
        self.grid_size = grid_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode whatever the caller asks."""
        return super().train(False)

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def num_heads(self) -> int:
        return head_dims(attention_of(self.backbone.blocks[0]))[0]

    @property
    def head_dim(self) -> int:
        return head_dims(attention_of(self.backbone.blocks[0]))[1]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` crop -> this teacher's normalised input at its own size and dtype."""
        dtype = self.backbone.input_dtype
        x = images.float()
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 255)
        return ((x - self.mean) / self.std).to(dtype)

    def _cls_and_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Drop register tokens: ``(B, P + N, D)`` -> ``(B, 1 + N, D)``, CLS first."""
        P = self.backbone.num_prefix_tokens
        if P == 1:
            return x
        return torch.cat([x[:, :1], x[:, P:]], dim=1)

    # -- MIM role --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def mim_targets(self, images: torch.Tensor, drop_ratio: float, mask_layers: list[int],
                    prunes: bool = False) -> MimTargets:
        """keep_idx from progressive masking on this teacher's hidden states, and q, k at blocks L-3, L-2.

        With ``prunes=False`` the teacher runs on every token and the masking scores the full-sequence output
        of each masking block. With ``prunes=True`` it continues on the kept tokens only after each masking
        block (cheaper; relations then come from a pruned sequence, as in PCAE).
        """
        b = self.backbone
        if not b.has_class_token:
            raise ConfigError("the MIM teacher needs a CLS token (its relations cover CLS + patches)")
        relation_blocks = [self.depth - 3, self.depth - 2]
        last = max(relation_blocks + list(mask_layers))
        x = b.embed(self.prepare(images))
        B, P = x.shape[0], b.num_prefix_tokens
        kept = torch.arange(P, x.shape[1], device=x.device).expand(B, -1)  # (B, n) kept patches, full-seq positions
        seq_patches = {}  # relation block -> full-seq positions of the patch tokens in its input
        with capture_qk(b.blocks, relation_blocks) as qk:
            for i in range(last + 1):
                patch_pos = kept - P if prunes else None  # pruned input: which patch each token is (for RoPE)
                if i in relation_blocks:
                    seq_patches[i] = kept if prunes else torch.arange(P, x.shape[1], device=x.device).expand(B, -1)
                if i == last and i not in mask_layers:  # only its q, k are needed: skip attention and MLP
                    qk[i] = b.block_qk(i, x, patch_pos)
                    break
                x = b.run_block(i, x, patch_pos)
                if i in mask_layers:
                    kept, x = self._mask_step(x, kept, drop_ratio, prunes)
        keep_idx = prefix_then(kept - (P - 1), 1)  # on the student's grid: CLS at 0, patch j at 1 + j
        qk_index = [prefix_then(torch.searchsorted(seq_patches[i].contiguous(), kept.contiguous()) + 1, 1)
                    for i in relation_blocks]
        return MimTargets(keep_idx=keep_idx, qk=[self._relations_view(qk[i]) for i in relation_blocks],
                          qk_index=qk_index)

    def _mask_step(self, x: torch.Tensor, kept: torch.Tensor, drop_ratio: float, prunes: bool):
        """One stage of Eq. 4: score the kept patch tokens of block output ``x``, drop the most redundant."""
        P = self.backbone.num_prefix_tokens
        candidates = x[:, P:] if prunes else gather_tokens(x, kept)  # pruned x holds prefix + kept only
        chosen = least_redundant(candidates, keep_count(kept.shape[1], drop_ratio))  # (B, n') into candidates
        kept = kept.gather(1, chosen)
        if prunes:
            x = torch.cat([x[:, :P], gather_tokens(x[:, P:], chosen)], dim=1)
        return kept, x

    def _relations_view(self, qk: QK) -> QK:
        q, k = qk
        P = self.backbone.num_prefix_tokens
        if P == 1:
            return q, k
        # registers are not part of the student's sequence: keep CLS + patches
        return torch.cat([q[:, :, :1], q[:, :, P:]], dim=2), torch.cat([k[:, :, :1], k[:, :, P:]], dim=2)

    # -- feature role ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def feature_targets(self, images: torch.Tensor, feature: str = "norm") -> torch.Tensor:
        """Last-block tokens ``(B, 1 + N, D_t)`` (CLS + patches on the student's grid), before whitening.

        Args:
            images: uint8 crop ``(B, 3, S, S)``.
            feature: ``norm`` (after the final norm), ``prenorm`` (last block output) or ``proj`` (after the
                CLIP projection).
        """
        b = self.backbone
        if not b.has_class_token:
            raise ConfigError("the feature teacher needs a CLS token (the student's CLS is distilled from it)")
        x = b.embed(self.prepare(images))
        for i in range(len(b.blocks)):
            x = b.run_block(i, x)
        if feature == "norm":
            x = b.final_norm(x)
        elif feature == "proj":
            x = b.project(x)
        x = self._cls_and_patches(x)
        return self._to_student_grid(x)

    def feature_dim(self, feature: str = "norm") -> int:
        return self.backbone.out_dim_proj if feature == "proj" else self.backbone.embed_dim

    def _to_student_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Resample the patch-token map to the student's grid when they differ (``grid_align=resample``)."""
        grid = self.backbone.grid_size
        if tuple(grid) == tuple(self.grid_size):
            return x
        cls, patches = x[:, :1], x[:, 1:]
        B, _, D = patches.shape
        maps = patches.transpose(1, 2).reshape(B, D, *grid).float()
        maps = F.interpolate(maps, size=self.grid_size, mode="bilinear", align_corners=False, antialias=True)
        return torch.cat([cls, maps.flatten(2).transpose(1, 2).to(x.dtype)], dim=1)


def build_teacher(cfg: TeacherConfig, role: str, student_grid: tuple[int, int], student_img: int) -> Teacher:
    """Build, load and freeze a teacher for ``role`` ("mim_teacher" or "feature_teacher").

    Raises:
        ConfigError: unknown model, or a patch grid that cannot be aligned with the student's.
        WeightsError: missing/corrupt checkpoint file or keys that do not match the architecture.
    """
    check_weights_file(cfg, role)
    if cfg.library == "timm":
        img_size = aligned_img_size(cfg, _timm_patch_size(cfg), student_grid, student_img, role)
        backbone = build_timm(cfg, img_size)
        mean = cfg.mean or backbone.model.pretrained_cfg.get("mean")
        std = cfg.std or backbone.model.pretrained_cfg.get("std")
    else:
        img_size = aligned_img_size(cfg, _open_clip_patch_size(cfg), student_grid, student_img, role)
        backbone = build_open_clip(cfg, img_size)
        mean, std = open_clip_mean_std(cfg, backbone.model)
    if cfg.grid_align == "resize" and tuple(backbone.grid_size) != tuple(student_grid):
        raise ConfigError(f"{role} {cfg.model!r} has a {backbone.grid_size} patch grid at {img_size} px; the "
                          f"student's is {student_grid}: they cannot be aligned")
    return Teacher(backbone, img_size, mean, std, grid_size=student_grid)


# ----------------------------------------------------------------------------------------------------------------
# Start-up report

RANDOM_TEACHER_WARN_PARAMS = 2_000_000  # a random teacher this large is a mistake, not a smoke test (tiny: < 0.5M)


def weights_origin(cfg: TeacherConfig, teacher: Teacher | None = None) -> str:
    """Where a teacher's weights came from: ``random init``, the hub (timm name/tag or open_clip tag) or a file."""
    if cfg.weights == "random":
        return "random init"
    if cfg.weights != "pretrained":
        return f"file {Path(cfg.weights).resolve()}"
    if cfg.library == "open_clip":
        return f"open_clip hub {cfg.model} pretrained={cfg.pretrained_tag}"
    pretrained_cfg = getattr(getattr(teacher, "backbone", None), "model", None)
    pretrained_cfg = getattr(pretrained_cfg, "pretrained_cfg", None) or {}
    where = pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url") or "timm default tag"
    tag = pretrained_cfg.get("tag")
    return f"timm hub {cfg.model.split('.')[0]}{'.' + tag if tag else ''} ({where})"


def describe(teacher: Teacher, cfg: TeacherConfig, role: str) -> dict:
    """The start-up facts of a teacher: role, model, where its weights came from, parameter count, dtype, input."""
    params = list(teacher.backbone.parameters())
    return {"role": role, "library": cfg.library, "model": cfg.model, "weights": weights_origin(cfg, teacher),
            "random": cfg.weights == "random", "parameters": sum(p.numel() for p in params),
            "dtype": str(params[0].dtype).removeprefix("torch."), "img_size": teacher.img_size,
            "depth": teacher.depth, "num_heads": teacher.num_heads}

