"""Backbone adapters: one typed interface over timm and open_clip vision towers.

A teacher runs its backbone block by block (``embed``, ``run_block``, ``block_qk``, ``final_norm``,
``project``), so the masking, relation and feature code never asks which library a tower came from.
Adapters: ``TimmBackbone`` (timm ``VisionTransformer`` family: MAE, DeiT, DINO, DINOv2, the CLIP tower),
``EvaBackbone`` (timm ``Eva``: EVA-01/02 and the other RoPE ViTs) and ``OpenClipBackbone`` (open_clip
``VisionTransformer``, ``model.visual``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from timm.models.eva import Eva, EvaBlockPostNorm
from torch import nn

from hybrid_distill.errors import ConfigError
from hybrid_distill.model.qk_capture import QK, attention_of, qk_from_input


class Backbone(nn.Module, ABC):
    """The interface every adapter implements; runs blocks one at a time.

    Attributes:
        blocks: the transformer blocks, in order.
        num_prefix_tokens: leading tokens (CLS, registers) before the patch tokens.
        has_class_token: whether the first prefix token is a CLS token.
        embed_dim: token width.
        grid_size: the patch grid ``(rows, cols)`` at the built input size.
    """

    blocks: nn.ModuleList
    num_prefix_tokens: int
    has_class_token: bool
    embed_dim: int
    grid_size: tuple[int, int]

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, S, S)`` -> tokens ``(B, P + N, D)`` entering block 0."""

    @abstractmethod
    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's own final norm of last-block tokens."""

    @abstractmethod
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, then the tower's projection (CLIP image embedding space), per token."""

    @property
    @abstractmethod
    def out_dim_proj(self) -> int:
        """Width of ``project``'s output."""

    @property
    @abstractmethod
    def input_dtype(self) -> torch.dtype:
        """The dtype the first layer's weights (and so the normalised input) are in."""

    @staticmethod
    @abstractmethod
    def attn_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``block``'s attention sees for the block input ``x``."""

    def block_kwargs(self, index: int, patch_pos: torch.Tensor | None = None) -> dict:
        """Extra keyword arguments of block ``index`` (none for a plain ViT).

        Args:
            index: block index.
            patch_pos: ``(B, n)`` original patch index (0-based, on the teacher's grid) of each patch token in the
                block's input, when that input is a pruned sequence; ``None`` when it holds every patch in order.
        """
        return {}

    def run_block(self, index: int, x: torch.Tensor, patch_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Output of block ``index`` for its input ``x`` ``(B, P + n, D)`` (see ``block_kwargs`` for ``patch_pos``)."""
        return self.blocks[index](x, **self.block_kwargs(index, patch_pos))

    def block_qk(self, index: int, x: torch.Tensor, patch_pos: torch.Tensor | None = None) -> QK:
        """q, k ``(B, H, P + n, d)`` of block ``index`` for its input ``x`` without running its attention or MLP."""
        block = self.blocks[index]
        return qk_from_input(attention_of(block), self.attn_input(block, x), **self.block_kwargs(index, patch_pos))


class TimmBackbone(Backbone):
    """A timm ViT (VisionTransformer family: MAE, DeiT, DINO, DINOv2, CLIP tower, ...)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.blocks = model.blocks
        self.num_prefix_tokens = model.num_prefix_tokens
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.embed_dim = model.embed_dim
        self.grid_size = tuple(model.patch_embed.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # (B, P + N, D)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)

    @staticmethod
    def attn_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``block``'s attention sees: its pre-norm of ``x``."""
        return block.norm1(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        head = self.model.head
        if not isinstance(head, nn.Linear):
            raise ConfigError("feature_teacher.feature=proj needs a timm model with a linear head (e.g. a CLIP tower)")
        return head(self.model.fc_norm(self.model.norm(x)))  # timm order: norm -> (pool) -> fc_norm -> head

    @property
    def out_dim_proj(self) -> int:
        return self.model.head.out_features

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype



def gather_rope(rope: torch.Tensor, patch_pos: torch.Tensor) -> torch.Tensor:
    """The rows of a rotary embedding for the patch tokens of a pruned sequence.

    Args:
        rope: ``(N, E)`` (shared by all heads) or ``(H, N, E)`` (per head), one row per patch of the full grid.
        patch_pos: ``(B, n)`` patch index of each token of the pruned sequence.

    Returns:
        ``(B, 1, n, E)`` or ``(B, H, n, E)``: broadcasts against q, k ``(B, H, n, d)``.
    """
    if rope.ndim == 2:
        return rope[patch_pos].unsqueeze(1)
    if rope.ndim == 3:
        return rope[:, patch_pos].transpose(0, 1)
    raise ConfigError(f"cannot prune tokens for a rotary embedding of shape {tuple(rope.shape)}; "
                      "set masking.teacher_prunes=false")


class EvaBackbone(TimmBackbone):
    """A timm ``Eva`` (EVA-01, EVA-02, and timm's other RoPE ViTs built on it): blocks take the rotary embedding.

    ``embed`` keeps the rotary embedding of the current forward (``None`` for models without RoPE, e.g. EVA-01)
    and every block gets it through ``block_kwargs``: its own slice for per-block ("mixed") RoPE, and only the
    rows of the kept patches when the sequence was pruned, so each kept token keeps its own 2-D position.
    """

    def __init__(self, model: Eva):
        super().__init__(model)
        self._rope: torch.Tensor | None = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x, self._rope = m._pos_embed(m.patch_embed(x))  # patch dropout is off in eval: rope covers every patch
        return m.norm_pre(x)  # (B, P + N, D)

    def block_kwargs(self, index: int, patch_pos: torch.Tensor | None = None) -> dict:
        rope = self._rope
        if rope is None:
            return {}
        if getattr(self.model, "rope_mixed", False):  # (depth, H, N, E): one embedding per block
            rope = rope[index]
        if patch_pos is not None:
            rope = gather_rope(rope, patch_pos)
        return {"rope": rope}

    @staticmethod
    def attn_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``block``'s attention sees: its pre-norm of ``x`` (``x`` itself for post-norm blocks)."""
        return x if isinstance(block, EvaBlockPostNorm) else block.norm1(x)


class OpenClipBackbone(Backbone):
    """An open_clip ``VisionTransformer`` (``model.visual``)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.model = visual
        self.blocks = visual.transformer.resblocks
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.embed_dim = visual.conv1.out_channels
        self.grid_size = tuple(visual.grid_size)
        if not getattr(visual.transformer, "batch_first", True):
            raise ConfigError("open_clip towers with batch_first=False are not supported")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model
        x = v.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_post(x)

    @staticmethod
    def attn_input(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What ``block``'s attention sees: its pre-norm of ``x``."""
        return block.ln_1(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.ln_post(x) @ self.model.proj

    @property
    def out_dim_proj(self) -> int:
        return self.model.proj.shape[1]

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model.conv1.weight.dtype
