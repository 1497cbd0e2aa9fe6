"""Capture the query/key projections of attention modules during a normal forward pass.

Relations (paper Eq. 2) are ``q k^T / sqrt(d_head)`` with the block's *own* projections, taken after its
pre-norm and after any q/k norm. We never materialise attention maps: a hook grabs ``q, k`` as
``(B, H, N, d)`` tensors while the block runs its fused (SDPA) attention unchanged.

Supported attention modules: timm ``Attention`` (fused ``qkv`` linear, optional ``q_norm``/``k_norm``) and
``nn.MultiheadAttention`` (open_clip's ``ResidualAttentionBlock``). For timm, the hook sits on the output of
``qkv`` so no projection is computed twice (the student's gradients flow through it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

QK = tuple[torch.Tensor, torch.Tensor]


def attention_of(block: nn.Module) -> nn.Module:
    """The self-attention module of a transformer block (timm ``Block`` or open_clip ``ResidualAttentionBlock``)."""
    attn = getattr(block, "attn", None)
    if attn is None:
        raise TypeError(f"{type(block).__name__} has no `attn` attention module; cannot capture q/k")
    return attn


def head_dims(attn: nn.Module) -> tuple[int, int]:
    """(num_heads, head_dim) of a supported attention module."""
    if isinstance(attn, nn.MultiheadAttention):
        return attn.num_heads, attn.head_dim
    if hasattr(attn, "qkv") and hasattr(attn, "num_heads"):
        return attn.num_heads, attn.head_dim
    raise TypeError(f"unsupported attention module {type(attn).__name__}: need timm Attention (fused qkv) "
                    "or nn.MultiheadAttention")


def _split_timm_qkv(attn: nn.Module, qkv: torch.Tensor) -> QK:
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
    return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


def _mha_qk(attn: nn.MultiheadAttention, x: torch.Tensor) -> QK:
    if not attn.batch_first:
        x = x.transpose(0, 1)
    B, N, D = x.shape
    bias = attn.in_proj_bias[: 2 * D] if attn.in_proj_bias is not None else None
    qk = F.linear(x, attn.in_proj_weight[: 2 * D], bias)  # (B, N, 2D)
    qk = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, H, N, d)
    return qk[0], qk[1]


def qk_from_input(attn: nn.Module, x: torch.Tensor) -> QK:
    """q, k ``(B, H, N, d)`` that ``attn`` computes from its (already normalised) input ``x`` ``(B, N, D)``."""
    if isinstance(attn, nn.MultiheadAttention):
        return _mha_qk(attn, x)
    return _split_timm_qkv(attn, attn.qkv(x))


@contextlib.contextmanager
def capture_qk(blocks: Sequence[nn.Module], indices: Sequence[int]) -> Iterator[dict[int, QK]]:
    """Within the context, every forward through ``blocks[i]`` (i in ``indices``) stores ``(q, k)`` in the dict.

    Example::

        with capture_qk(model.blocks, [9, 10]) as qk:
            model(x)
        q9, k9 = qk[9]  # (B, H, N, d)
    """
    store: dict[int, QK] = {}
    handles = [_register(attention_of(blocks[i]), i, store) for i in indices]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _register(attn: nn.Module, index: int, store: dict[int, QK]) -> torch.utils.hooks.RemovableHandle:
    head_dims(attn)  # fail early on an unsupported module
    if isinstance(attn, nn.MultiheadAttention):
        def pre_hook(module, args, kwargs):
            query = args[0] if args else kwargs["query"]
            store[index] = _mha_qk(module, query)
        return attn.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def qkv_hook(module, args, output):
        store[index] = _split_timm_qkv(attn, output)
    return attn.qkv.register_forward_hook(qkv_hook)
