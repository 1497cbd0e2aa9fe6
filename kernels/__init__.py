"""Relation kernels of hybrid-distill: public functional API and dispatch.

Layers (Liger-Kernel style): ``@triton.jit`` kernels -> launchers -> torch custom op with autograd
(:mod:`kernels.relation`) -> the functions below; :mod:`kernels.reference` is the one pure-PyTorch
reference that tests, benchmarks and the CPU fallback import.

Dispatch: ``impl="auto"`` runs Triton on CUDA tensors and the reference elsewhere; ``"triton"`` and
``"torch"`` force one. The argument is the only switch (the trainer passes ``loss.relation_impl``); the
environment variable ``HD_RELATION_IMPL`` that used to override it is no longer read (a warning at import
says so when it is set). ``impl="triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (the Triton
interpreter, used by the tests). ``import kernels`` works without Triton installed; ``"auto"`` then always
takes the reference.

FLOP count of the fused loss: 8·N'²·d per (b, h) for forward+backward (S, T, dq_s, dk_s: four
N'×N'×d matmuls).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference

try:  # Triton is optional: CPU-only installs fall back to the reference.
    from . import relation as _relation
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _relation = None

__all__ = ["relation_loss", "gather_relations", "resolve_impl", "HAS_TRITON", "IMPL_ENV_VAR", "reference"]

HAS_TRITON: bool = _relation is not None
IMPL_ENV_VAR = "HD_RELATION_IMPL"  # no longer read; kept for the import-time warning and old references
_IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if os.environ.get(IMPL_ENV_VAR):
    warnings.warn(
        f"${IMPL_ENV_VAR} is set but no longer read: the impl argument (loss.relation_impl in the trainer) is the "
        "only switch",
        stacklevel=2,
    )


def _interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _relation is not None and _relation.interpret_mode()


def _kernel_dtypes_ok(dtypes: tuple[torch.dtype, ...]) -> bool:
    """dtypes is (q_s, k_s[, q_t, k_t]): each pair one dtype, all fp16/bf16/fp32."""
    pairs = [dtypes[i : i + 2] for i in range(0, len(dtypes), 2)]
    return all(d in _TRITON_DTYPES for d in dtypes) and all(p[0] == p[-1] for p in pairs)


def resolve_impl(impl: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """Pick the implementation for tensors on ``device``.

    Args:
        impl: ``"auto"``, ``"torch"`` or ``"triton"``.
        device: device of the inputs.
        dtypes: dtypes of (q, k) pairs, student then teacher; the kernels need fp16/bf16/fp32 and q, k
            of one dtype per model. ``"auto"`` sends anything else (e.g. float64) to the reference.

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: unknown ``impl``, or ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``.
        RuntimeError: ``"triton"`` requested but Triton is not importable.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {_IMPLS}")
    if impl == "auto":
        return "triton" if (HAS_TRITON and device.type == "cuda" and _kernel_dtypes_ok(dtypes)) else "torch"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' requested but triton is not installed; use impl='torch'")
        if not _kernel_dtypes_ok(dtypes):
            raise ValueError(
                f"impl='triton' needs q and k of one dtype per model among {_TRITON_DTYPES}, got {dtypes}; "
                "use impl='torch'"
            )
        if device.type != "cuda" and not torch.compiler.is_compiling() and not _interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU with the Triton interpreter, or use impl='torch'"
            )
    return impl


def _check_rank4(name: str, x: torch.Tensor) -> None:
    """A floating-point (B, H, N, d) tensor with B, H, d >= 1 (N is checked against keep_idx)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, H, N, d), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for axis, what in ((0, "batch size B"), (1, "head count H"), (3, "head dim d")):
        if x.shape[axis] == 0:
            raise ValueError(f"{name} must have {what} >= 1, got shape {tuple(x.shape)}")


def _check_keep(keep_idx: torch.Tensor, b: int, n_keep: int, n: int, what: str) -> None:
    """keep_idx must be an integer (B, N') tensor with N' <= N (values checked on CPU, eagerly: no GPU sync)."""
    if not isinstance(keep_idx, torch.Tensor) or keep_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"keep_idx must be an int32/int64 tensor, got {getattr(keep_idx, 'dtype', type(keep_idx))}")
    if keep_idx.dim() != 2 or keep_idx.shape[0] != b or (n_keep >= 0 and keep_idx.shape[1] != n_keep):
        want = f"({b}, {n_keep if n_keep >= 0 else 'Nk'})"
        raise ValueError(f"keep_idx must have shape {want} to match {what}, got {tuple(keep_idx.shape)}")
    if keep_idx.shape[1] < 1 or keep_idx.shape[1] > n:
        raise ValueError(f"keep_idx must keep between 1 and N={n} tokens, got shape {tuple(keep_idx.shape)}")
    if (
        keep_idx.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and (keep_idx.min() < 0 or keep_idx.max() >= n)
    ):
        raise ValueError(f"keep_idx values must lie in [0, {n}), got [{int(keep_idx.min())}, {int(keep_idx.max())}]")


def _check_pair(name_q: str, q: torch.Tensor, name_k: str, k: torch.Tensor) -> None:
    _check_rank4(name_q, q)
    _check_rank4(name_k, k)
    if q.shape != k.shape:
        raise ValueError(f"{name_q} and {name_k} must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")


def _validate_loss_args(q_s, k_s, q_t, k_t, keep_idx, beta) -> None:
    """Shape/dtype/device checks for :func:`relation_loss`; errors name the argument and its shape."""
    _check_pair("q_s", q_s, "k_s", k_s)
    _check_pair("q_t", q_t, "k_t", k_t)
    (b, h, n_keep, _), (bt, ht, n, _) = q_s.shape, q_t.shape
    if (b, h) != (bt, ht):
        raise ValueError(
            f"student q_s {tuple(q_s.shape)} and teacher q_t {tuple(q_t.shape)} must agree on batch and heads (B, H)"
        )
    if n_keep > n:
        raise ValueError(f"student tokens N'={n_keep} (q_s {tuple(q_s.shape)}) exceed teacher tokens N={n}")
    _check_keep(keep_idx, b, n_keep, n, f"q_s {tuple(q_s.shape)}")
    devices = {t.device for t in (q_s, k_s, q_t, k_t, keep_idx)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")


def relation_loss(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    keep_idx: torch.Tensor,
    beta: float = 1.0,
    scale: float | None = None,
    impl: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Mean smooth-L1 between student relations q_s·k_sᵀ·scale and teacher relations at kept tokens.

    Args:
        q_s: student queries (B, H, N', d_s), kept tokens only.
        k_s: student keys (B, H, N', d_s).
        q_t: teacher queries (B, H, N, d_t), all tokens.
        k_t: teacher keys (B, H, N, d_t).
        keep_idx: kept positions (B, N'), int64/int32, sorted, prefix (CLS) tokens first.
        beta: smooth-L1 threshold (``F.smooth_l1_loss`` semantics).
        scale: multiplier of q·kᵀ; None means 1/sqrt(d_s) and needs d_s == d_t. With different head
            dims, pre-scale each q by its model's 1/sqrt(d) and pass ``scale=1.0``.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"`` (see module docstring).
        deterministic: Triton only: bit-identical results run to run. Only N' above the single-block limit
            (256 for bf16/fp16) changes plan: two passes, no atomics, about 1.5x the FLOPs. Also on when
            ``torch.use_deterministic_algorithms(True)`` is set.

    Returns:
        Scalar fp32 loss; gradients flow to q_s and k_s (never to the teacher).
    """
    _validate_loss_args(q_s, k_s, q_t, k_t, keep_idx, beta)
    if scale is None:
        scale = reference.default_scale(q_s.shape[-1], q_t.shape[-1])
    if resolve_impl(impl, q_s.device, (q_s.dtype, k_s.dtype, q_t.dtype, k_t.dtype)) == "torch":
        return reference.relation_loss(q_s, k_s, q_t, k_t, keep_idx, beta=beta, scale=scale)
    deterministic = bool(deterministic or torch.are_deterministic_algorithms_enabled())
    return _relation.relation_loss_triton(q_s, k_s, q_t, k_t, keep_idx, float(beta), float(scale), deterministic)


def gather_relations(
    q_t: torch.Tensor, k_t: torch.Tensor, keep_idx: torch.Tensor, scale: float | None = None, impl: str = "auto"
) -> torch.Tensor:
    """Teacher relations at kept rows and columns: (q_t[keep] @ k_t[keep]ᵀ)·scale, fp32 (B, H, N', N').

    Args:
        q_t: teacher queries (B, H, N, d).
        k_t: teacher keys (B, H, N, d).
        keep_idx: kept positions (B, N'), sorted, prefix (CLS) tokens first.
        scale: multiplier; None means 1/sqrt(d).
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``.

    Returns:
        fp32 tensor (B, H, N', N') (no gradient).
    """
    _check_pair("q_t", q_t, "k_t", k_t)
    _check_keep(keep_idx, q_t.shape[0], -1, q_t.shape[2], f"q_t {tuple(q_t.shape)}")
    if keep_idx.device != q_t.device:
        raise ValueError(f"keep_idx is on {keep_idx.device} but q_t is on {q_t.device}")
    if scale is None:
        scale = 1.0 / q_t.shape[-1] ** 0.5
    if resolve_impl(impl, q_t.device, (q_t.dtype, k_t.dtype)) == "torch":
        return reference.gather_relations(q_t, k_t, keep_idx, scale)
    return _relation.gather_relations_triton(q_t, k_t, keep_idx, float(scale))
