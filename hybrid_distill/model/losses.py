"""The two terms of the hybrid loss (paper Eq. 1-3, docs/algorithm.md).

* feature loss: smooth-L1_beta between the student head's output and the feature teacher's last-block tokens
  whitened by a parameter-free LayerNorm, at CLS + kept positions;
* relation loss: smooth-L1_beta' between the student's and the MIM teacher's relations over kept rows and
  columns, averaged over the layer pairs. The relation is ``q k^T / sqrt(d_head)`` (``scale="sqrt_d"``, timm's
  attention logits) or ``q k^T`` (``scale="none"``, Eq. 2's R as written), each model with its own ``d_head``.
  Computed in fp32 by ``kernels.relation_loss`` (fused Triton on GPU, the PyTorch reference elsewhere).

All means are over every element.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import kernels
from hybrid_distill.model.masking import gather_tokens
from hybrid_distill.model.qk_capture import QK


def whiten(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free LayerNorm over the channel dim (FD/dBOT target whitening), in fp32."""
    return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)


def feature_loss(pred: torch.Tensor, target_tokens: torch.Tensor, keep_idx: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """Smooth-L1 between head outputs and whitened teacher tokens at the kept positions.

    Args:
        pred: ``(B, N', D_t)`` student head output on CLS + kept tokens.
        target_tokens: ``(B, 1 + N, D_t)`` feature-teacher tokens on the student's grid (not whitened).
        keep_idx: ``(B, N')`` kept positions.
        beta: smooth-L1 transition point.
    """
    target = whiten(gather_tokens(target_tokens, keep_idx))  # (B, N', D_t)
    return F.smooth_l1_loss(pred.float(), target, beta=beta)


RELATION_SCALES = ("sqrt_d", "none")


def relation_scales(d_s: int, d_t: int, scale: str = "sqrt_d") -> tuple[float, float]:
    """Multipliers of ``q k^T`` for the student and the teacher: ``1/sqrt(d)`` each (``sqrt_d``) or 1 (``none``)."""
    if scale not in RELATION_SCALES:
        raise ValueError(f"relation scale {scale!r} is not one of {RELATION_SCALES}")
    return (d_s ** -0.5, d_t ** -0.5) if scale == "sqrt_d" else (1.0, 1.0)


def relation_pair_loss(student: QK, teacher: QK, index: torch.Tensor, beta: float, head_reduce: str = "none",
                       impl: str = "auto", scale: str = "sqrt_d") -> torch.Tensor:
    """Relation loss of one (student block, teacher block) pair.

    Args:
        student: ``(q, k)`` of the student, ``(B, H_s, N', d_s)``.
        teacher: ``(q, k)`` of the MIM teacher, ``(B, H_t, M, d_t)``.
        index: ``(B, N')`` positions of the kept tokens along ``M``.
        beta: smooth-L1 transition point.
        head_reduce: ``none`` (H_s == H_t, per-head relations) or ``mean`` (average relations over heads).
        impl: ``kernels.relation_loss`` implementation.
        scale: ``sqrt_d`` (relations ``q k^T / sqrt(d_head)``) or ``none`` (``q k^T``); ``loss.relation_scale``.
    """
    (q_s, k_s), (q_t, k_t) = student, teacher
    c_s, c_t = relation_scales(q_s.shape[-1], q_t.shape[-1], scale)
    if head_reduce == "mean":
        r_s = torch.einsum("bhid,bhjd->bij", q_s.float(), k_s.float()) * (c_s / q_s.shape[1])
        r_t = kernels.gather_relations(q_t, k_t, index, scale=c_t).float().mean(dim=1)
        return F.smooth_l1_loss(r_s, r_t, beta=beta)
    if q_s.shape[1] != q_t.shape[1]:
        raise ValueError(f"student has {q_s.shape[1]} heads, teacher {q_t.shape[1]}: set loss.head_reduce=mean")
    if c_s == c_t:
        return kernels.relation_loss(q_s, k_s, q_t, k_t, index, beta=beta, scale=c_s, impl=impl)
    # different head dims: each side carries its own 1/sqrt(d)
    return kernels.relation_loss(q_s * c_s, k_s, q_t * c_t, k_t, index, beta=beta, scale=1.0, impl=impl)


def relation_loss(student: Sequence[QK], teacher: Sequence[QK], indices: Sequence[torch.Tensor], beta: float,
                  head_reduce: str = "none", impl: str = "auto", scale: str = "sqrt_d") -> torch.Tensor:
    """Mean of ``relation_pair_loss`` over the layer pairs (student L-3, L-2 with teacher L-3, L-2)."""
    pairs = [relation_pair_loss(s, t, i, beta, head_reduce, impl, scale)
             for s, t, i in zip(student, teacher, indices, strict=True)]
    return torch.stack(pairs).mean()
