"""The student: a plain timm ``VisionTransformer`` run on CLS + kept tokens (docs/algorithm.md), plus its feature head.

The student is randomly initialised and exported as an ordinary timm state dict, so it only ever uses
timm's own modules. The kept-token forward patch-embeds *all* patches (position embeddings need the full
grid), gathers CLS + kept tokens, and runs every block with fused attention on the short sequence, tapping
q, k at the relation blocks (persistent taps, so the forward also runs under ``torch.compile``). With
``student.grad_checkpointing`` (timm's ``set_grad_checkpointing`` flag) each block runs under non-reentrant
activation checkpointing, as timm's ``checkpoint_seq`` does: only block inputs are kept, each block is
recomputed in the backward. Non-reentrant explicitly (older timm releases default to re-entrant, which would cut
the gradient of the q, k tapped inside a block).
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybrid_distill.config import StudentConfig
from hybrid_distill.errors import ConfigError
from hybrid_distill.model.masking import gather_tokens
from hybrid_distill.model.qk_capture import QK, head_dims, install_qk_taps, take_qk


def student_kwargs(cfg: StudentConfig) -> dict:
    """The ``timm.create_model`` keyword arguments that define the student architecture (also used by export)."""
    kwargs = dict(img_size=cfg.img_size, num_classes=0, drop_path_rate=cfg.drop_path_rate)
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def build_student(cfg: StudentConfig) -> VisionTransformer:
    """A randomly initialised timm ViT (no classifier) as described by ``cfg``, its ``pretrained_cfg`` carrying the
    configured input mean/std (what the task normalises with and the export records)."""
    try:
        model = timm.create_model(cfg.model, pretrained=False, **student_kwargs(cfg))
    except (RuntimeError, ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"student.model={cfg.model!r} cannot be built with {student_kwargs(cfg)}: {e}") from e
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"student.model={cfg.model!r} is a {type(model).__name__}; the student must be a timm "
                          "VisionTransformer (e.g. vit_base_patch16_224)")
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise ConfigError(f"student.model={cfg.model!r} must have exactly one prefix token (CLS, no registers)")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


class DistillStudent(nn.Module):
    """Student ViT + linear feature head: the only module that is trained (and handed to DeepSpeed).

    Args:
        student: timm VisionTransformer with a CLS token.
        target_dim: width of the feature teacher's tokens (the head maps student width -> target_dim).
    """

    def __init__(self, student: VisionTransformer, target_dim: int):
        super().__init__()
        self.student = student
        self.head = nn.Linear(student.embed_dim, target_dim)
        depth = len(student.blocks)
        if depth < 3:
            raise ConfigError(f"the student needs >= 3 blocks for relations at blocks L-3, L-2; it has {depth}")
        self.relation_blocks = (depth - 3, depth - 2)
        install_qk_taps(student.blocks, self.relation_blocks)

    @property
    def num_heads(self) -> int:
        return head_dims(self.student.blocks[0].attn)[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.student.patch_embed.grid_size)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, list[QK]]:
        """Run on CLS + kept tokens.

        Args:
            images: ``(B, 3, H, W)`` normalised images (cast to the student's parameter dtype here).
            keep_idx: ``(B, N')`` sorted token positions to keep, CLS (0) first.

        Returns:
            ``(pred, qk)``: head output ``(B, N', target_dim)`` and ``[(q, k)]`` ``(B, H, N', d)`` at the
            relation blocks.
        """
        m = self.student
        x = images.to(m.patch_embed.proj.weight.dtype)
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # (B, 1 + N, D)
        x = gather_tokens(x, keep_idx)  # (B, N', D)
        if m.grad_checkpointing and torch.is_grad_enabled():
            for block in m.blocks:  # timm's checkpoint_seq, block by block; q, k leave the block: non-reentrant
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = m.blocks(x)
        x = m.norm(x)
        return self.head(x), [take_qk(m.blocks[i]) for i in self.relation_blocks]
