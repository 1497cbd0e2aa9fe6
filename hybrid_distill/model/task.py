"""The Hybrid Distillation task: owns the student, its head, both teachers and the loss (paper Eq. 1).

The training loop only calls ``task(images, student=engine)``: teachers run under ``no_grad`` outside the
DeepSpeed engine, the engine (wrapping ``task.trainable`` = student + head) runs the student on the kept
tokens, and the loss dict comes back::

    task = HybridDistillTask(cfg)
    out = task(images)                    # images: uint8 (B, 3, S, S)
    out["loss"].backward()                # loss, feature_loss, relation_loss, keep_ratio
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybrid_distill.config import Config
from hybrid_distill.errors import ConfigError
from hybrid_distill.model import losses
from hybrid_distill.model.student import DistillStudent, build_student
from hybrid_distill.model.teachers import MimTargets, build_teacher


@dataclass
class Targets:
    """Everything the teachers contribute to one batch (no gradients)."""

    mim: MimTargets
    features: torch.Tensor  # (B, 1 + N, D_t) feature-teacher tokens on the student grid, not whitened

    @property
    def keep_idx(self) -> torch.Tensor:
        return self.mim.keep_idx


def default_mask_layers(depth: int) -> list[int]:
    """Masking blocks I = [0, L/3, 2L/3] (0-indexed block outputs; PCAE's choice)."""
    return [0, depth // 3, 2 * depth // 3]


class HybridDistillTask(nn.Module):
    """Student + head (trainable) and two frozen teachers.

    Args:
        cfg: the full config; the task reads student, mim_teacher, feature_teacher, masking and loss.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        student = build_student(cfg.student)
        grid, img = tuple(student.patch_embed.grid_size), cfg.student.img_size
        self.mim_teacher = build_teacher(cfg.mim_teacher, "mim_teacher", grid, img)
        self.feature_teacher = build_teacher(cfg.feature_teacher, "feature_teacher", grid, img)
        self.trainable = DistillStudent(student, self.feature_teacher.feature_dim(cfg.feature_teacher.feature))
        self.mask_layers = list(cfg.masking.layers or default_mask_layers(self.mim_teacher.depth))
        self._check_compatible()
        mean, std = student.pretrained_cfg.get("mean"), student.pretrained_cfg.get("std")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def _check_compatible(self) -> None:
        depth = self.mim_teacher.depth
        bad = [i for i in self.mask_layers if not 0 <= i < depth]
        if bad or sorted(set(self.mask_layers)) != self.mask_layers:
            raise ConfigError(f"masking.layers={self.mask_layers} must be increasing block indices in [0, {depth}) "
                              f"of the MIM teacher")
        h_s, h_t = self.trainable.num_heads, self.mim_teacher.num_heads
        if h_s != h_t and self.cfg.loss.head_reduce == "none":
            raise ConfigError(f"the student has {h_s} heads but the MIM teacher has {h_t}: relations are per head; "
                              "set loss.head_reduce=mean to average them over heads, or match student.num_heads")

    def place_teachers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move both teachers (and the normalisation buffers) to ``device``; cast teacher weights to ``dtype``.

        Only the backbones are cast: the mean/std buffers stay fp32 (in bf16, 123.675 would become 123.5).
        """
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        for teacher in (self.mim_teacher, self.feature_teacher):
            teacher.to(device=device)
            teacher.backbone.to(dtype=dtype)

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> Targets:
        """Run both teachers on the uint8 crop ``(B, 3, S, S)``."""
        m = self.cfg.masking
        mim = self.mim_teacher.mim_targets(images, m.drop_ratio, self.mask_layers, prunes=m.teacher_prunes)
        features = self.feature_teacher.feature_targets(images, self.cfg.feature_teacher.feature)
        return Targets(mim=mim, features=features)

    def losses(self, images: torch.Tensor, targets: Targets, student: nn.Module | None = None
               ) -> dict[str, torch.Tensor]:
        """Student forward on the kept tokens and the hybrid loss.

        Args:
            images: uint8 crop ``(B, 3, S, S)`` on the student's device.
            targets: from ``targets(images)``.
            student: the callable that runs ``self.trainable`` (the DeepSpeed engine in training; under ZeRO-3 it
                must be the engine so parameters are gathered). Defaults to ``self.trainable``.
        """
        student = student if student is not None else self.trainable
        x = (images.float() - self.mean) / self.std
        pred, qk_s = student(x, targets.keep_idx)
        c = self.cfg.loss
        feat = losses.feature_loss(pred, targets.features, targets.keep_idx, c.feature_beta)
        rel = losses.relation_loss(qk_s, targets.mim.qk, targets.mim.qk_index, c.relation_beta, c.head_reduce,
                                   c.relation_impl, c.relation_scale)
        n_patches = targets.features.shape[1] - 1
        keep_ratio = torch.full((), (targets.keep_idx.shape[1] - 1) / n_patches, device=feat.device)  # no H2D copy
        return {"loss": feat + c.alpha * rel, "feature_loss": feat, "relation_loss": rel, "keep_ratio": keep_ratio}

    def forward(self, images: torch.Tensor, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Loss dict ``{"loss", "feature_loss", "relation_loss", "keep_ratio"}`` for a uint8 batch."""
        return self.losses(images, self.targets(images), student)
