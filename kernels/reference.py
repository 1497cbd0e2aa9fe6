"""The ONE pure-PyTorch reference for the relation kernels.

Tests, benchmarks and the CPU fallback of :mod:`kernels` all import these two functions; the Triton
kernels in :mod:`kernels.relation` are checked against them. Everything is computed in fp32 (inputs are
upcast), whatever the input dtype; float64 inputs stay float64 (used by gradcheck).

FLOP count (what the fused kernel does, used by the benchmark): per (b, h), forward S = q_s k_sᵀ and
T = q_t[keep] k_t[keep]ᵀ (2·N'²·d each) plus backward dq_s = G k_s and dk_s = Gᵀ q_s (2·N'²·d each):
8·N'²·d for forward+backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gather_relations", "relation_loss", "default_scale"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (so gradcheck runs in double precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def default_scale(d_s: int, d_t: int) -> float:
    """The scale used when ``scale=None``: 1/sqrt(d), defined only when student and teacher dims agree.

    Args:
        d_s: student head dim.
        d_t: teacher head dim.

    Returns:
        1/sqrt(d_s).

    Raises:
        ValueError: if ``d_s != d_t`` (pre-scale q by each model's 1/sqrt(d) and pass ``scale=1.0``).
    """
    if d_s != d_t:
        raise ValueError(
            f"scale=None needs equal student/teacher head dims, got d_s={d_s}, d_t={d_t}; pre-scale each q by "
            "its model's 1/sqrt(d) and pass scale=1.0"
        )
    return 1.0 / math.sqrt(d_s)


def _gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, d), keep_idx (B, N') -> x[b, h, keep_idx[b]] (B, H, N', d)."""
    b, h, _, d = x.shape
    idx = keep_idx.to(device=x.device, dtype=torch.long)[:, None, :, None].expand(b, h, -1, d)  # (B, H, N', d)
    return torch.gather(x, 2, idx)


def gather_relations(
    q_t: torch.Tensor, k_t: torch.Tensor, keep_idx: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Teacher relations restricted to kept rows and columns.

    Args:
        q_t: teacher queries (B, H, N, d).
        k_t: teacher keys (B, H, N, d).
        keep_idx: kept token positions (B, N'), int64, sorted, prefix (CLS) tokens first.
        scale: multiplier of q·kᵀ; None means 1/sqrt(d).

    Returns:
        (q_t[keep] @ k_t[keep]ᵀ) * scale, fp32 (fp64 for fp64 inputs), shape (B, H, N', N').
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q_t.shape[-1])
    dtype = _compute_dtype(q_t, k_t)
    q = _gather_tokens(q_t, keep_idx).to(dtype)  # (B, H, N', d)
    k = _gather_tokens(k_t, keep_idx).to(dtype)  # (B, H, N', d)
    return torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N', N')


def relation_loss(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    keep_idx: torch.Tensor,
    beta: float = 1.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean smooth-L1 between student relations and gathered teacher relations.

    Args:
        q_s: student queries (B, H, N', d_s), kept tokens only.
        k_s: student keys (B, H, N', d_s).
        q_t: teacher queries (B, H, N, d_t), all tokens.
        k_t: teacher keys (B, H, N, d_t).
        keep_idx: kept token positions (B, N'), sorted, prefix (CLS) tokens first.
        beta: smooth-L1 threshold (``F.smooth_l1_loss`` semantics; 0 gives L1).
        scale: multiplier of both q·kᵀ products; None means 1/sqrt(d_s) and needs d_s == d_t.

    Returns:
        Scalar fp32 loss (mean over B·H·N'·N'); gradients flow to q_s and k_s only.
    """
    if scale is None:
        scale = default_scale(q_s.shape[-1], q_t.shape[-1])
    dtype = _compute_dtype(q_s, k_s, q_t, k_t)
    s = torch.matmul(q_s.to(dtype), k_s.to(dtype).transpose(-1, -2)) * scale  # (B, H, N', N')
    with torch.no_grad():
        t = gather_relations(q_t.detach(), k_t.detach(), keep_idx, scale).to(dtype)  # (B, H, N', N')
    return F.smooth_l1_loss(s, t, reduction="mean", beta=beta)
