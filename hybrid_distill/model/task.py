"""The Hybrid Distillation task: owns the student, its head, both teachers and the loss (paper Eq. 1).

The training loop only calls ``task(images, student=engine)``: teachers run under ``no_grad`` outside the
DeepSpeed engine, the engine (wrapping ``task.trainable`` = student + head) runs the student on the kept
tokens, and the loss dict comes back::

    task = HybridDistillTask(cfg)
    out = task(images)                    # images: uint8 (B, 3, S, S)
    out["loss"].backward()                # loss, feature_loss, relation_loss, keep_ratio

``compile_forwards`` puts the teachers' forwards and the loss terms under ``torch.compile`` (``run.compile``); the
student is compiled where it is wrapped (``engine.compile()`` in the loop, ``trainable.compile()`` without one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hybrid_distill.config import Config, RunConfig
from hybrid_distill.errors import ConfigError
from hybrid_distill.model import losses
from hybrid_distill.model.flops import default_mask_layers
from hybrid_distill.model.qk_capture import QK, install_qk_taps
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


# (attribute of the task or None for the task itself, method) that ``compile_forwards`` compiles
COMPILED_FORWARDS = (("mim_teacher", "mim_targets"), ("feature_teacher", "feature_targets"), (None, "loss_terms"))


def compile_options(run: RunConfig) -> dict[str, Any]:
    """``torch.compile`` keyword arguments for ``run.compile`` / ``run.compile_backend``, static shapes.

    N' is fixed for a run, so nothing needs dynamic shapes (``dynamic=False``: a new shape recompiles rather than
    switching to dynamic kernels). ``mode`` is inductor's; other backends take none.
    """
    options: dict[str, Any] = {"backend": run.compile_backend, "dynamic": False}
    if run.compile_backend == "inductor":
        options["mode"] = run.compile
    return options


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
        depth = self.mim_teacher.depth
        install_qk_taps(self.mim_teacher.backbone.blocks, (depth - 3, depth - 2))  # compile-friendly q/k capture
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
        return self.loss_terms(pred, qk_s, targets)

    def loss_terms(self, pred: torch.Tensor, qk_s: list[QK], targets: Targets) -> dict[str, torch.Tensor]:
        """The hybrid loss (Eq. 1) of the student's head output ``(B, N', D_t)`` and q, k at its relation blocks."""
        c = self.cfg.loss
        feat = losses.feature_loss(pred, targets.features, targets.keep_idx, c.feature_beta)
        rel = losses.relation_loss(qk_s, targets.mim.qk, targets.mim.qk_index, c.relation_beta, c.head_reduce,
                                   c.relation_impl, c.relation_scale)
        n_patches = targets.features.shape[1] - 1
        keep_ratio = torch.full((), (targets.keep_idx.shape[1] - 1) / n_patches, device=feat.device)  # no H2D copy
        return {"loss": feat + c.alpha * rel, "feature_loss": feat, "relation_loss": rel, "keep_ratio": keep_ratio}

    def compile_forwards(self, **options: Any) -> None:
        """``torch.compile`` the teachers' forwards (``mim_targets``, ``feature_targets``) and ``loss_terms``.

        Args:
            options: ``torch.compile`` keyword arguments, e.g. ``compile_options(cfg.run)``.

        The student is not compiled here: it runs inside the DeepSpeed engine, which compiles it itself
        (``engine.compile``). Under ``mode="reduce-overhead"`` the teachers (no gradients, static shapes) run as
        CUDA graphs.
        """
        # The student's q/k taps are a side effect; a checkpointed block must not replay it when recomputed (the
        # knob torchtitan sets for the same reason; absent from older torch, which then graph-breaks there).
        if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
            torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        for owner, name in COMPILED_FORWARDS:
            obj = self if owner is None else getattr(self, owner)
            setattr(obj, name, torch.compile(getattr(obj, name), **options))  # instance attribute over the method

    def forward(self, images: torch.Tensor, student: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Loss dict ``{"loss", "feature_loss", "relation_loss", "keep_ratio"}`` for a uint8 batch."""
        return self.losses(images, self.targets(images), student)
