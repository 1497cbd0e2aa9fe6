"""Fused Triton kernels for the masked relation loss and the masked relation gathering.

Layers: raw kernel bodies (``_relation_kernel``, ``_gather_kernel``, ``_scale_grads_kernel``) and their
``@triton.jit`` device functions -> launchers (:func:`relation_calls` builds the exact launches,
:class:`KernelCall` runs one) -> torch custom ops with autograd (``hd_kernels::relation_loss``,
``hd_kernels::gather_relations``, so ``torch.compile`` traces through them) -> the functions
``relation_loss_triton`` / ``gather_relations_triton`` that :mod:`kernels` dispatches to.

Algorithm (flash-attention-like, no softmax). For one (b, h), a block of rows i and a block of columns j, with
u = (S − T)/scale computed as ONE dot over the concatenated head dim:

    u_ij  = [q_s[i], −q_t[keep[i]]] · [k_s[j], k_t[keep[j]]]ᵀ      (BLOCK_M, BLOCK_N) fp32, one accumulator
    loss += smoothL1_β(scale·u_ij) / |scale|                        (β/|scale| as threshold: no rescaling)
    G_ij  = clamp(u_ij·|scale|/β, −1, 1)                            rounded to the student dtype
    dq_s[i] += G_ij k_s[j];   dk_s[j] += G_ijᵀ q_s[i]
    loss, dq_s, dk_s ·= |scale|/count  once, at the store            (count = B·H·N'²)

The smooth-L1 gradient of a tile depends only on that tile, so the forward also produces dq_s and dk_s for
grad_output = 1; the backward multiplies them by grad_output in one small kernel (in place; a no-op, decided
on the device without a host sync, when the factor is exactly 1). No N'×N' (or N×N) tensor is ever
allocated. The loss is reduced inside the kernel: every program stores its partial sum, and the last
program to finish (an atomic ticket) adds all of them in index order in float64 and writes the fp32 loss.

FLOPs (the ``kernels`` ops note): 8·N'²·d per (b, h) for forward+backward (S − T as one dot over d_s + d_t,
dq_s, dk_s); the deterministic two-pass plan recomputes S − T in its second pass: 12·N'²·d.

Plans (:func:`plan_relation`; grid = B·H·row-blocks programs, one launch unless noted):
    * ``single`` (bf16/fp16: N' <= 256 for head dims <= 64, <= 128 for wider ones; fp32 see ``TUNING``): one
      program per (b, h) owns every row (up to 256 rows: 8 warps, two warpgroups of 128 rows), so each column
      block's dk_s is complete when computed and is stored directly: no atomics, no fp32 buffer,
      deterministic.
    * ``atomic`` (larger N', default): dq_s written by the owning program, dk_s by fp32 ``tl.atomic_add``
      into a zeroed fp32 buffer (order of additions varies run to run: not bit-reproducible); the backward's
      scaling kernel casts it to the gradient dtype.
    * ``two_pass`` (larger N', deterministic): the same kernel launched twice, the second time with the
      roles of q and k swapped (u_ijᵀ = [k_s[j], −k_t[j]]·[q_s[i], q_t[i]]ᵀ, so "dq" of the swapped problem is
      dk_s); no atomics.
    * ``forward`` (no gradient wanted): the loss only.
    The loss is bit-identical run to run in every plan (fixed-order float64 sum of the partials); the
    gradients in every plan but ``atomic``.

Numerics: fp32 accumulation; fp16/bf16 operands go to the tensor cores, G is rounded to the student dtype
before the G·k and Gᵀ·q products (as flash-attention does with P); fp32 inputs use IEEE fp32 dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set (same contract as the eager reference). Student and teacher
may differ in dtype and head dim: the concatenated dot is chained ``tl.dot`` calls (one per head-dim chunk
of each model) into one fp32 accumulator, each in its own operands' dtype, so no operand is converted.
Gradients are stored in the student dtype (fp16 ones normalised by 1/N' instead of 1/count, which would
underflow fp16; the backward applies the rest, see :func:`_grad_scales`).

Inputs: any strides (pointer arithmetic, no copies), head dims padded with masks to a power of two (>= 16)
or split into two power-of-two chunks when that is narrower (80 = 64 + 16, 96 = 64 + 32, 48 = 32 + 16), any
N' >= 1, any N, keep_idx int32/int64. Plain pointer arithmetic only (``tl.make_block_ptr`` is gone in
Triton 3.8); written for Triton 3.6 and 3.8.

Interpreter: the kernels are created lazily, per call, as compiled ``JITFunction`` or as the CPU
interpreter's ``InterpretedFunction`` according to ``TRITON_INTERPRET`` *at call time*, so tests can switch
the interpreter on with an environment variable whatever was imported first; the device functions get
interpreted twins for the duration of an interpreted launch (:func:`_interpreter_scope`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

__all__ = [
    "relation_loss_triton",
    "gather_relations_triton",
    "interpret_mode",
    "plan_relation",
    "relation_calls",
    "gather_call",
    "scale_grads_call",
    "split_dim",
    "KernelCall",
    "RelationPlan",
    "TUNING",
]


# ----------------------------------------------------------------------------------------------------------
# Device functions. Compiled kernels call the JITFunction bound to the module name; an interpreted launch
# rebinds the name to an interpreted twin (see _interpreter_scope).
# ----------------------------------------------------------------------------------------------------------

_DEVICE_FNS: dict[str, Callable] = {}


def _device_fn(fn: Callable) -> triton.JITFunction:
    """Register a raw device function and return its compiled-mode JITFunction."""
    _DEVICE_FNS[fn.__name__] = fn
    return triton.JITFunction(fn)


@_device_fn
def _load_tile(base, rows, row_mask, stride_n, col0, D, stride_d, BLOCK_D: tl.constexpr):
    """(R, BLOCK_D) tile of a (rows, D) matrix: columns col0 .. col0 + BLOCK_D of ``rows``; masked lanes load 0."""
    cols = col0 + tl.arange(0, BLOCK_D)  # (BD,)
    ptrs = base + rows[:, None] * stride_n + cols[None, :] * stride_d  # (R, BD)
    return tl.load(ptrs, mask=row_mask[:, None] & (cols[None, :] < D), other=0.0)


@_device_fn
def _store_tile(base, rows, row_mask, stride_n, col0, D, value, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    """Store (or fp32-atomically add) ``value`` (R, BLOCK_D) into columns col0 .. of a contiguous-row matrix."""
    cols = col0 + tl.arange(0, BLOCK_D)  # (BD,)
    ptrs = base + rows[:, None] * stride_n + cols[None, :]  # (R, BD)
    mask = row_mask[:, None] & (cols[None, :] < D)
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@_device_fn
def _smooth_l1(u, beta_u, inv_beta_u, IS_L1: tl.constexpr):
    """Per-element smooth-L1 of x = |scale|·u over |scale|, and its clamp: d(loss)/du over |scale|.

    With beta_u = β/|scale| and inv_beta_u = |scale|/β: 0.5·x²/β / |scale| = 0.5·u²·inv_beta_u and
    (|x| − 0.5·β) / |scale| = |u| − 0.5·beta_u; the gradient clamp(x/β, −1, 1) = clamp(u·inv_beta_u, −1, 1).
    """
    au = tl.abs(u)
    if IS_L1:
        return au, tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0))
    elem = tl.where(au < beta_u, 0.5 * u * u * inv_beta_u, au - 0.5 * beta_u)
    return elem, tl.minimum(tl.maximum(u * inv_beta_u, -1.0), 1.0)


@_device_fn
def _reduce_loss(part_ptr, count_ptr, loss_ptr, num_parts, loss_scale, BLOCK_R: tl.constexpr):
    """Called by every program after storing its partial: the last one to arrive writes the loss.

    The last program (atomic ticket) sums all partials in index order in float64 (bit-identical whichever
    program is last), multiplies by |scale|/count and resets the counter to 0 for the next launch. The
    barrier + acq_rel atomic publish this program's partial (the pattern of Triton's layer-norm tutorial);
    the partials are read past L1 (``.cg``).
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if ticket == num_parts - 1:
        total = tl.zeros((BLOCK_R,), dtype=tl.float64)
        for start in range(0, num_parts, BLOCK_R):
            offs = start + tl.arange(0, BLOCK_R)
            part = tl.load(part_ptr + offs, mask=offs < num_parts, other=0.0, cache_modifier=".cg")
            total += part.to(tl.float64)
        tl.store(loss_ptr, (tl.sum(total, axis=0) * loss_scale).to(tl.float32))
        tl.atomic_xchg(count_ptr, 0)


@_device_fn
def _scale_block(x_ptr, y_ptr, n, block, g, BLOCK: tl.constexpr, IN_PLACE: tl.constexpr):
    """y[block] = x[block]·g in y's dtype; in place (x is y) nothing is read or written when g == 1."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if IN_PLACE:
        if g != 1.0:
            x = tl.load(x_ptr + offs, mask=mask)
            tl.store(y_ptr + offs, (x.to(tl.float32) * g).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, (x.to(tl.float32) * g).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Kernels (raw bodies; see ``_kernel`` for how they are jitted)
# ----------------------------------------------------------------------------------------------------------


def _relation_kernel(
    a_s_ptr,  # (B, H, M, DS) student rows operand: q_s (or k_s in the swapped pass)
    b_s_ptr,  # (B, H, M, DS) student columns operand: k_s (or q_s)
    a_t_ptr,  # (B, H, N, DT) teacher rows operand: q_t (or k_t), gathered by keep
    b_t_ptr,  # (B, H, N, DT) teacher columns operand: k_t (or q_t), gathered by keep
    keep_ptr,  # (B, M) int32/int64 kept positions
    grad_a_ptr,  # (B, H, M, DS) contiguous, out: dloss/da
    grad_b_ptr,  # (B, H, M, DS) contiguous, out: dloss/db; fp32 atomics (GRAD_B=1) or stored (GRAD_B=2)
    part_ptr,  # (num_parts,) fp32 scratch (COMPUTE_LOSS): one partial smooth-L1 sum per program
    count_ptr,  # (1,) int32 (COMPUTE_LOSS): programs finished; 0 before and after every launch
    loss_ptr,  # () fp32, out (COMPUTE_LOSS): the loss
    H,
    M,
    DS,
    DT,
    num_parts,  # programs in the grid
    beta_u,  # β/|scale|
    inv_beta_u,  # |scale|/β
    loss_scale,  # |scale|/count, applied once to the summed partials
    grad_scale,  # applied once to each gradient at its store: |scale|/count (fp16: see _grad_scales)
    s_as_b,
    s_as_h,
    s_as_n,
    s_as_d,
    s_bs_b,
    s_bs_h,
    s_bs_n,
    s_bs_d,
    s_at_b,
    s_at_h,
    s_at_n,
    s_at_d,
    s_bt_b,
    s_bt_h,
    s_bt_n,
    s_bt_d,
    s_keep_b,
    s_keep_n,
    s_g_b,
    s_g_h,
    s_g_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DS0: tl.constexpr,  # student head dim = chunk 0 (+ chunk 1 when BLOCK_DS1 > 0), e.g. 80 = 64 + 16
    BLOCK_DS1: tl.constexpr,
    BLOCK_DT0: tl.constexpr,  # teacher head dim chunks
    BLOCK_DT1: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    GRAD_A: tl.constexpr,  # write dloss/da (the row operand)
    GRAD_B: tl.constexpr,  # 0: no db (two-pass mode), 1: fp32 atomics, 2: direct store (one row block)
    IS_L1: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,  # partial losses summed per step by the last program
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    a_s_base = a_s_ptr + off_b * s_as_b + off_h * s_as_h
    b_s_base = b_s_ptr + off_b * s_bs_b + off_h * s_bs_h
    a_t_base = a_t_ptr + off_b * s_at_b + off_h * s_at_h
    b_t_base = b_t_ptr + off_b * s_bt_b + off_h * s_bt_h
    keep_base = keep_ptr + off_b * s_keep_b
    g_off = off_b * s_g_b + off_h * s_g_h

    # Row operands, loaded once: [a_s, −a_t] is the left operand of u = (S − T)/scale. Masked lanes load 0, so
    # padded rows/columns/head dims give u = 0, a zero loss and a zero gradient without further masking.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    mask_m = offs_m < M
    keep_m = tl.load(keep_base + offs_m * s_keep_n, mask=mask_m, other=0).to(tl.int64)  # (BM,)
    a_s0 = _load_tile(a_s_base, offs_m, mask_m, s_as_n, 0, DS, s_as_d, BLOCK_DS0)  # (BM, BDS0)
    a_t0 = -_load_tile(a_t_base, keep_m, mask_m, s_at_n, 0, DT, s_at_d, BLOCK_DT0)  # (BM, BDT0)
    if BLOCK_DS1 > 0:
        a_s1 = _load_tile(a_s_base, offs_m, mask_m, s_as_n, BLOCK_DS0, DS, s_as_d, BLOCK_DS1)  # (BM, BDS1)
    if BLOCK_DT1 > 0:
        a_t1 = -_load_tile(a_t_base, keep_m, mask_m, s_at_n, BLOCK_DT0, DT, s_at_d, BLOCK_DT1)  # (BM, BDT1)
    if GRAD_A:
        dq0 = tl.zeros((BLOCK_M, BLOCK_DS0), dtype=tl.float32)  # (BM, BDS0) sum_j G_ij b_j
        if BLOCK_DS1 > 0:
            dq1 = tl.zeros((BLOCK_M, BLOCK_DS1), dtype=tl.float32)
    loss_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        mask_n = offs_n < M
        keep_n = tl.load(keep_base + offs_n * s_keep_n, mask=mask_n, other=0).to(tl.int64)
        b_s0 = _load_tile(b_s_base, offs_n, mask_n, s_bs_n, 0, DS, s_bs_d, BLOCK_DS0)  # (BN, BDS0)
        b_t0 = _load_tile(b_t_base, keep_n, mask_n, s_bt_n, 0, DT, s_bt_d, BLOCK_DT0)  # (BN, BDT0)
        u = tl.dot(a_s0, tl.trans(b_s0), input_precision=PRECISION)  # (BM, BN) fp32
        if BLOCK_DS1 > 0:
            b_s1 = _load_tile(b_s_base, offs_n, mask_n, s_bs_n, BLOCK_DS0, DS, s_bs_d, BLOCK_DS1)
            u = tl.dot(a_s1, tl.trans(b_s1), u, input_precision=PRECISION)
        u = tl.dot(a_t0, tl.trans(b_t0), u, input_precision=PRECISION)
        if BLOCK_DT1 > 0:
            b_t1 = _load_tile(b_t_base, keep_n, mask_n, s_bt_n, BLOCK_DT0, DT, s_bt_d, BLOCK_DT1)
            u = tl.dot(a_t1, tl.trans(b_t1), u, input_precision=PRECISION)
        elem, g = _smooth_l1(u, beta_u, inv_beta_u, IS_L1)
        if COMPUTE_LOSS:
            loss_rows += tl.sum(elem, axis=1)
        g = g.to(b_s0.dtype)  # (BM, BN): rounded to the student dtype for the tensor cores
        if GRAD_A:
            dq0 = tl.dot(g, b_s0, dq0, input_precision=PRECISION)  # (BM, BDS0)
            if BLOCK_DS1 > 0:
                dq1 = tl.dot(g, b_s1, dq1, input_precision=PRECISION)
        if GRAD_B != 0:  # 1: other row blocks add to the same columns (fp32 atomics); 2: complete, store it
            gt = tl.trans(g)  # (BN, BM)
            db0 = tl.dot(gt, a_s0, input_precision=PRECISION) * grad_scale  # (BN, BDS0)
            _store_tile(grad_b_ptr + g_off, offs_n, mask_n, s_g_n, 0, DS, db0, BLOCK_DS0, GRAD_B == 1)
            if BLOCK_DS1 > 0:
                db1 = tl.dot(gt, a_s1, input_precision=PRECISION) * grad_scale  # (BN, BDS1)
                _store_tile(grad_b_ptr + g_off, offs_n, mask_n, s_g_n, BLOCK_DS0, DS, db1, BLOCK_DS1, GRAD_B == 1)

    if GRAD_A:
        _store_tile(grad_a_ptr + g_off, offs_m, mask_m, s_g_n, 0, DS, dq0 * grad_scale, BLOCK_DS0, False)
        if BLOCK_DS1 > 0:
            _store_tile(grad_a_ptr + g_off, offs_m, mask_m, s_g_n, BLOCK_DS0, DS, dq1 * grad_scale, BLOCK_DS1, False)
    if COMPUTE_LOSS:
        tl.store(part_ptr + pid, tl.sum(loss_rows, axis=0))
        _reduce_loss(part_ptr, count_ptr, loss_ptr, num_parts, loss_scale, BLOCK_R)


def _gather_kernel(
    q_ptr,  # (B, H, N, D)
    k_ptr,  # (B, H, N, D)
    keep_ptr,  # (B, M)
    out_ptr,  # (B, H, M, M) contiguous fp32
    H,
    M,
    D,
    scale,
    s_q_b,
    s_q_h,
    s_q_n,
    s_q_d,
    s_k_b,
    s_k_h,
    s_k_n,
    s_k_d,
    s_keep_b,
    s_keep_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(M, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    pid_bh = (pid // (num_n * num_m)).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < M
    keep_m = tl.load(keep_ptr + off_b * s_keep_b + offs_m * s_keep_n, mask=mask_m, other=0).to(tl.int64)
    keep_n = tl.load(keep_ptr + off_b * s_keep_b + offs_n * s_keep_n, mask=mask_n, other=0).to(tl.int64)
    q = _load_tile(q_ptr + off_b * s_q_b + off_h * s_q_h, keep_m, mask_m, s_q_n, 0, D, s_q_d, BLOCK_D)  # (BM, BD)
    k = _load_tile(k_ptr + off_b * s_k_b + off_h * s_k_h, keep_n, mask_n, s_k_n, 0, D, s_k_d, BLOCK_D)  # (BN, BD)
    r = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BM, BN) fp32
    out = out_ptr + pid_bh * M * M + offs_m[:, None] * M + offs_n[None, :]
    tl.store(out, r, mask=mask_m[:, None] & mask_n[None, :])


def _scale_grads_kernel(
    x0_ptr,  # (n0,) saved gradient 0 (dq)
    y0_ptr,  # (n0,) out: x0·grad_output (x0 itself when IN_PLACE0)
    n0,
    x1_ptr,  # (n1,) saved gradient 1 (dk)
    y1_ptr,  # (n1,) out
    n1,
    g_ptr,  # () grad_output, read on the device
    post,  # fp32 factor besides grad_output (fp16: see _grad_scales)
    BLOCK: tl.constexpr,
    IN_PLACE0: tl.constexpr,
    IN_PLACE1: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(n0, BLOCK)
    g = tl.load(g_ptr).to(tl.float32) * post
    if pid < blocks0:
        _scale_block(x0_ptr, y0_ptr, n0, pid, g, BLOCK, IN_PLACE0)
    else:
        _scale_block(x1_ptr, y1_ptr, n1, pid - blocks0, g, BLOCK, IN_PLACE1)


# ----------------------------------------------------------------------------------------------------------
# Jitting
# ----------------------------------------------------------------------------------------------------------


def interpret_mode() -> bool:
    """Whether Triton kernels run under the CPU interpreter now (``TRITON_INTERPRET`` read at call time)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")  # pragma: no cover


_STDLIB_USED = ("cdiv", "zeros", "sum")  # triton.language functions the kernels call that are @triton.jit'd
_MISSING = object()


@contextlib.contextmanager
def _interpreter_scope():
    """Make an interpreted launch work, and leave no trace, whatever TRITON_INTERPRET was at triton import.

    Triton's own library (``tl.sum``, ``tl.cdiv``, ``tl.zeros``) is jitted when ``triton.language`` is
    imported, and this module's device functions when it is imported: compiled-only ``JITFunction`` objects.
    For the launch they are swapped for interpreted twins; nested interpreted calls patch
    ``triton.language.core`` without undoing it, so every attribute of the language modules and classes (and
    this module's globals) is restored afterwards: a later compiled kernel in the same process then sees an
    untouched ``triton.language``.
    """
    from triton.runtime.interpreter import InterpretedFunction

    module = globals()
    saved_fns = {name: module[name] for name in _DEVICE_FNS}
    owners = (tl, tl.core, tl.standard, tl.math, tl.tensor, tl.dtype)
    saved = [(obj, dict(vars(obj))) for obj in owners]
    for name in _STDLIB_USED:
        fn = getattr(tl, name)
        if isinstance(fn, triton.JITFunction):
            setattr(tl, name, InterpretedFunction(fn.fn))
    module.update({name: _interpreted(fn) for name, fn in _DEVICE_FNS.items()})
    try:
        yield
    finally:
        module.update(saved_fns)
        for obj, before in saved:
            for key, value in before.items():
                if vars(obj).get(key, _MISSING) is not value:
                    setattr(obj, key, value)
            for key in set(vars(obj)) - set(before):
                delattr(obj, key)


@functools.cache
def _interpreted(fn: Callable):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


@functools.cache
def _kernel(fn: Callable, interpret: bool):
    """The jitted (or interpreted) version of a raw kernel body, cached per mode."""
    return _interpreted(fn) if interpret else triton.JITFunction(fn)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One kernel launch, exactly: raw body, grid, positional arguments, constexpr and launch keyword arguments.

    :meth:`launch` runs it; ``kernels.aot`` compiles the same call for Hopper without a GPU, with the
    specialisation Triton's JIT derives from these very arguments.
    """

    fn: Callable
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def launch(self) -> None:
        interpret = interpret_mode()
        kernel = _kernel(self.fn, interpret)
        with _interpreter_scope() if interpret else contextlib.nullcontext():
            kernel[self.grid](*self.args, **self.kwargs)


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------

# Tile sizes and plan thresholds, in one place so a GPU session can tune them
# (``python -m kernels.bench --tuning key=value``). Every value is compiled for sm_90 by the tests.
TUNING = dict(
    single_block_max=256,  # bf16/fp16: N' up to this -> one program per (b, h) owns all rows, dk stored
    single_block_max_wide=128,  # ... when a head dim is > 64 (256 rows spill at d = 80 and d = 128)
    tf32_single_block_max=128,  # fp32 operands with TF32 dots (4-byte operands: shared memory) ...
    tf32_single_block_max_wide=64,  # ... and head dims > 64 (128 rows of d = 128 need 256 KB of shared memory)
    block_m=64,  # row block when N' is above the single-block limit
    block_n=64,  # column block for head dims <= 64
    block_n_wide=32,  # column block for head dims > 64 (register pressure)
    block_n_256=32,  # column block for 256-row tiles (64 spills at d = 64: 255 registers + 128 B of stack)
    num_stages=2,
    # IEEE fp32 dots run on the FMA units and are unrolled by the compiler: smaller tiles.
    ieee_single_block_max=32,
    ieee_block_m=32,
    ieee_block_n=32,
)

# Passes of the relation kernel: (COMPUTE_LOSS, GRAD_A, GRAD_B, swapped operands).
_PASSES = {
    "forward": ((True, False, 0, False),),  # no gradients wanted
    "single": ((True, True, 2, False),),  # one row block: dq and dk in one pass, deterministic
    "atomic": ((True, True, 1, False),),  # default for large N': dk by fp32 atomics
    "two_pass": ((True, True, 0, False), (False, True, 0, True)),  # deterministic: dk by the swapped pass
}
_REDUCE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class RelationPlan:
    """How the relation kernel is launched for one problem: tiles, head-dim chunks, warps, passes."""

    mode: str  # key of _PASSES
    block_m: int
    block_n: int
    ds: tuple[int, int]  # student head-dim chunks (BLOCK_DS0, BLOCK_DS1); BLOCK_DS1 = 0: one chunk
    dt: tuple[int, int]  # teacher head-dim chunks
    num_warps: int
    precision: str  # tl.dot input precision: "tf32" (fp16/bf16 operands, or fp32 with TF32 allowed) or "ieee"

    @property
    def passes(self) -> tuple[tuple[bool, bool, int, bool], ...]:
        return _PASSES[self.mode]

    def constexprs(self, compute_loss: bool, grad_a: bool, grad_b: int, is_l1: bool = False) -> dict:
        return dict(
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_DS0=self.ds[0], BLOCK_DS1=self.ds[1],
            BLOCK_DT0=self.dt[0], BLOCK_DT1=self.dt[1], COMPUTE_LOSS=compute_loss, GRAD_A=grad_a, GRAD_B=grad_b,
            IS_L1=is_l1, PRECISION=self.precision, BLOCK_R=_REDUCE_BLOCK,
        )  # fmt: skip


def split_dim(d: int) -> tuple[int, int]:
    """Head dim as one power-of-two chunk (>= 16, the smallest tl.dot operand) or two when that is narrower.

    Examples: 64 -> (64, 0), 80 -> (64, 16), 96 -> (64, 32), 48 -> (32, 16), 112 -> (128, 0), 8 -> (16, 0).
    """
    whole = max(16, triton.next_power_of_2(d))
    if d <= 16 or whole == d:
        return whole, 0
    lo = whole // 2
    hi = max(16, triton.next_power_of_2(d - lo))
    return (lo, hi) if lo + hi < whole else (whole, 0)


def _precision(*dtypes: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 operands only when torch allows TF32 matmuls (same as the reference)."""
    if torch.float32 in dtypes and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _plan_mode(m, d_s: int, d_t: int, precision: str, fp32: bool, deterministic: bool, need_grad: bool) -> str:
    """Key of _PASSES; comparisons only, so symbolic sizes (the fake implementation under torch.compile) work."""
    if precision == "ieee":
        limit = TUNING["ieee_single_block_max"]
    else:
        wide = max(d_s, d_t) > 64  # split/padded head dim > 64
        limit = TUNING[("tf32_" if fp32 else "") + ("single_block_max_wide" if wide else "single_block_max")]
    if not need_grad:
        return "forward"
    if m <= limit:
        return "single"
    return "two_pass" if deterministic else "atomic"


def plan_relation(
    m: int, d_s: int, d_t: int, dtype_s: torch.dtype, dtype_t: torch.dtype, deterministic: bool, need_grad: bool
) -> RelationPlan:
    """Tile sizes and pass structure for N' = m kept tokens, head dims d_s (student), d_t (teacher).

    Args:
        m: kept tokens N'.
        d_s, d_t: student and teacher head dims.
        dtype_s, dtype_t: student and teacher dtypes (fp32 operands get smaller tiles; IEEE fp32 the smallest).
        deterministic: no atomics for large N' (two passes).
        need_grad: False gives the loss-only plan.

    Returns:
        The plan; its precision follows ``torch.backends.cuda.matmul.allow_tf32`` at call time.
    """
    ds, dt = split_dim(d_s), split_dim(d_t)
    precision = _precision(dtype_s, dtype_t)
    ieee = precision == "ieee"
    fp32 = torch.float32 in (dtype_s, dtype_t)
    mode = _plan_mode(m, d_s, d_t, precision, fp32, deterministic, need_grad)
    single = _plan_mode(m, d_s, d_t, precision, fp32, deterministic, True) == "single"
    block_m = max(16, triton.next_power_of_2(m)) if single else TUNING["ieee_block_m" if ieee else "block_m"]
    block_n = TUNING["block_n_wide"] if max(d_s, d_t) > 64 else TUNING["block_n"]
    block_n = min(block_n, block_m, TUNING["ieee_block_n"] if ieee else block_n)
    if block_m >= 256:
        block_n = min(block_n, TUNING["block_n_256"])
    if single and block_n > 32 and triton.cdiv(m, 32) * 32 <= 0.9 * triton.cdiv(m, block_n) * block_n:
        block_n = 32  # >= 10% less column padding (N' = 67: 96 instead of 128 columns)
    return RelationPlan(mode, block_m, block_n, ds, dt, 8 if block_m >= 128 else 4, precision)


def _saved_grad_dtypes(mode: str, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """dtypes of the (dq, dk) the forward produces: the student's; the atomic plan accumulates dk in fp32."""
    return dtype, torch.float32 if mode == "atomic" else dtype


def _grad_scales(dtype: torch.dtype, batch: int, heads: int, m: int, scale: float) -> tuple[float, float]:
    """(factor at the forward's store, factor of the backward) of the gradients; their product is |scale|/count.

    fp16 stores the gradients normalised by 1/N' rather than 1/count = 1/(B·H·N'²), which would underflow
    fp16: each element, a mean over N' columns of G·k·min(|scale|, 1) with |G| <= 1, stays within the
    range of the fp16 inputs; the backward multiplies by grad_output·max(|scale|, 1)/(B·H). Other dtypes
    (bf16 has fp32's exponent range) store the final |scale|/count and the backward only applies grad_output.
    """
    abs_scale = abs(scale)
    if dtype == torch.float16:
        return min(abs_scale, 1.0) / m, max(abs_scale, 1.0) / (batch * heads * m)
    return abs_scale / (batch * heads * m * m), 1.0


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

_COUNTERS: dict[tuple, torch.Tensor] = {}


def _loss_counter(device: torch.device) -> torch.Tensor:
    """The int32 ticket counter of the in-kernel loss reduction: 0 between launches (the last program resets it).

    One per (device, stream): launches on one stream run one after the other, so they never share it at the
    same time. On CPU (the interpreter) it is zeroed before every launch, so an interrupted interpreted launch
    cannot leave it dirty. A counter first needed while a CUDA graph is being captured is not cached (its
    zero fill is part of the graph).
    """
    if device.type != "cuda":
        return torch.zeros(1, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        if not torch.cuda.is_current_stream_capturing():
            _COUNTERS[key] = counter
    return counter


def _pass_call(plan, operands, keep, outs, loss_bufs, beta, scale, grad_scale, flags) -> KernelCall:
    """One launch of ``_relation_kernel`` over all (b, h, row-block) programs.

    Args:
        operands: (a_s, b_s, a_t, b_t): (q_s, k_s, q_t, k_t), or (k_s, q_s, k_t, q_t) for the swapped pass.
        outs: (grad_a, grad_b) buffers (either may be a stub the pass does not touch).
        loss_bufs: (partials, counter, loss).
        grad_scale: factor of the stored gradients (:func:`_grad_scales`).
        flags: (COMPUTE_LOSS, GRAD_A, GRAD_B, swapped) from the plan.
    """
    a_s, b_s, a_t, b_t = operands
    grad_a, grad_b = outs
    compute_loss, grad_a_on, grad_b_mode, _ = flags
    bsz, heads, m, ds = a_s.shape
    num_parts = bsz * heads * triton.cdiv(m, plan.block_m)
    abs_scale = abs(scale)
    beta_u = beta / abs_scale if abs_scale > 0 else float("inf")
    inv_beta_u = abs_scale / beta if beta > 0 else 0.0
    loss_scale = abs_scale / float(bsz * heads * m * m)
    constexprs = plan.constexprs(compute_loss, grad_a_on, grad_b_mode, beta == 0)
    args = (
        a_s, b_s, a_t, b_t, keep, grad_a, grad_b, *loss_bufs,
        heads, m, ds, a_t.shape[-1], num_parts, beta_u, inv_beta_u, loss_scale, grad_scale,
        *a_s.stride(), *b_s.stride(), *a_t.stride(), *b_t.stride(), *keep.stride(), heads * m * ds, m * ds, ds,
    )  # fmt: skip
    kwargs = dict(constexprs, num_warps=plan.num_warps, num_stages=TUNING["num_stages"])
    return KernelCall(_relation_kernel, (num_parts,), args, kwargs)


def relation_calls(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad):
    """Allocate the outputs of the fused loss and build its launches (what :func:`_launch_relation` runs).

    Args:
        q_s, k_s: student (B, H, N', d_s). q_t, k_t: teacher (B, H, N, d_t). keep_idx: (B, N').
        beta: smooth-L1 threshold (>= 0). scale: multiplier of both q·kᵀ products.
        deterministic: no atomics for large N'. need_grad: also produce dq_s, dk_s (for grad_output = 1).

    Returns:
        (plan, calls, (loss (), dq (B, H, N', d_s), dk (B, H, N', d_s))); the gradients are empty (0,) when not
        need_grad, fp16 ones still to be multiplied by the backward factor of :func:`_grad_scales`; dk is fp32
        in the atomic plan (cast by the backward).
    """
    bsz, heads, m, ds = q_s.shape
    plan = plan_relation(m, ds, q_t.shape[-1], q_s.dtype, q_t.dtype, deterministic, need_grad)
    grad_scale, _ = _grad_scales(q_s.dtype, bsz, heads, m, scale)
    dev = q_s.device
    dq_dtype, dk_dtype = _saved_grad_dtypes(plan.mode, q_s.dtype)
    shape = (bsz, heads, m, ds) if need_grad else (0,)
    dq = torch.empty(shape, device=dev, dtype=dq_dtype)  # (B, H, N', d_s)
    dk = (torch.zeros if plan.mode == "atomic" else torch.empty)(shape, device=dev, dtype=dk_dtype)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    parts = torch.empty((bsz * heads * triton.cdiv(m, plan.block_m),), device=dev, dtype=torch.float32)
    loss_bufs = (parts, _loss_counter(dev), loss)
    stub = torch.empty(1, device=dev, dtype=dq_dtype)  # forward plan: a valid, never written pointer
    calls = []
    for flags in plan.passes:
        swapped = flags[3]
        operands = (k_s, q_s, k_t, q_t) if swapped else (q_s, k_s, q_t, k_t)
        outs = (dk, dq) if swapped else ((dq, dk) if need_grad else (stub, stub))
        calls.append(_pass_call(plan, operands, keep_idx, outs, loss_bufs, beta, scale, grad_scale, flags))
    return plan, calls, (loss, dq, dk)


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_relation(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad):
    """Fused loss (and, if need_grad, dloss/dq_s and dloss/dk_s for grad_output = 1); see :func:`relation_calls`."""
    _, calls, outputs = relation_calls(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad)
    with _device_ctx(q_s):
        for call in calls:
            call.launch()
    return outputs


def _gather_blocks(m: int) -> tuple[int, int]:
    block = max(16, min(64, triton.next_power_of_2(m)))
    return block, block


def gather_call(q_t, k_t, keep_idx, scale) -> tuple[KernelCall, torch.Tensor]:
    """The launch of ``_gather_kernel`` and its fp32 (B, H, N', N') output."""
    bsz, heads, _, d = q_t.shape
    m = keep_idx.shape[1]
    out = torch.empty((bsz, heads, m, m), device=q_t.device, dtype=torch.float32)
    block_m, block_n = _gather_blocks(m)
    grid = (bsz * heads * triton.cdiv(m, block_m) * triton.cdiv(m, block_n),)
    args = (q_t, k_t, keep_idx, out, heads, m, d, scale, *q_t.stride(), *k_t.stride(), *keep_idx.stride())
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
                  PRECISION=_precision(q_t.dtype), num_warps=4)  # fmt: skip
    return KernelCall(_gather_kernel, grid, args, kwargs), out


def _launch_gather(q_t, k_t, keep_idx, scale):
    """(q_t[keep] @ k_t[keep]ᵀ)·scale -> fp32 (B, H, N', N')."""
    call, out = gather_call(q_t, k_t, keep_idx, scale)
    with _device_ctx(q_t):
        call.launch()
    return out


_SCALE_BLOCK = 2048


def scale_grads_call(pairs, grad_output: torch.Tensor, post: float = 1.0) -> KernelCall | None:
    """One launch of ``_scale_grads_kernel`` for one or two (saved, out) gradient pairs (None when empty).

    Args:
        pairs: [(saved, out)]: out = saved·grad_output·post in out's dtype; out may be saved itself (in place).
        grad_output: the loss's incoming gradient, a 0-dim tensor on the same device (never read on the host).
        post: the backward factor of :func:`_grad_scales` (1 except for fp16).
    """
    (x0, y0) = pairs[0]
    (x1, y1), n1 = (pairs[1], pairs[1][0].numel()) if len(pairs) > 1 else (pairs[0], 0)
    grid = (triton.cdiv(x0.numel(), _SCALE_BLOCK) + triton.cdiv(n1, _SCALE_BLOCK),)
    if grid[0] == 0:
        return None
    args = (x0, y0, x0.numel(), x1, y1, n1, grad_output, post)
    kwargs = dict(BLOCK=_SCALE_BLOCK, IN_PLACE0=x0 is y0, IN_PLACE1=x1 is y1, num_warps=4)
    return KernelCall(_scale_grads_kernel, grid, args, kwargs)


# ----------------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("hd_kernels::relation_loss", mutates_args=())
def _relation_loss_op(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    keep_idx: torch.Tensor,
    beta: float,
    scale: float,
    deterministic: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_relation(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad)


@_relation_loss_op.register_fake
def _relation_loss_fake(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad):
    fp32 = torch.float32 in (q_s.dtype, q_t.dtype)
    precision = _precision(q_s.dtype, q_t.dtype)
    mode = _plan_mode(q_s.shape[2], q_s.shape[3], q_t.shape[3], precision, fp32, deterministic, need_grad)
    dq_dtype, dk_dtype = _saved_grad_dtypes(mode, q_s.dtype)
    shape = q_s.shape if need_grad else (0,)
    loss = q_s.new_empty((), dtype=torch.float32)
    return loss, q_s.new_empty(shape, dtype=dq_dtype), q_s.new_empty(shape, dtype=dk_dtype)


def _setup_context(ctx, inputs, output):
    q_s, k_s = inputs[0], inputs[1]
    _, dq, dk = output
    ctx.save_for_backward(dq, dk)
    ctx.dtypes = (q_s.dtype, k_s.dtype)
    bsz, heads, m, _ = q_s.shape
    ctx.post = _grad_scales(q_s.dtype, bsz, heads, m, inputs[6])[1]
    ctx.used = False
    ctx.mark_non_differentiable(dq, dk)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients of a create_graph backward; differentiating through them raises."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "hd_kernels::relation_loss has no double backward: its gradient is precomputed by the forward, so "
            "second-order terms (d/dq_s of dL/dq_s, e.g. after torch.autograd.grad(..., create_graph=True)) would "
            "be silently dropped; use kernels.relation_loss(..., impl='torch') for higher-order gradients"
        )


def _scaled_grads(saved, dtypes, grad_loss, post):
    """[saved_i · grad_loss · post in dtype_i]: one Triton launch in eager mode, in place where the dtype already
    matches; out-of-place torch ops when compiling (inductor fuses them) or for CPU tensors off the interpreter."""
    if torch.compiler.is_compiling() or (saved[0].device.type != "cuda" and not interpret_mode()):
        g = grad_loss.to(torch.float32) * post
        return [(x.to(torch.float32) * g).to(dt) for x, dt in zip(saved, dtypes, strict=True)]
    outs = [x if x.dtype == dt else torch.empty_like(x, dtype=dt) for x, dt in zip(saved, dtypes, strict=True)]
    call = scale_grads_call(list(zip(saved, outs, strict=True)), grad_loss.detach().contiguous(), post)
    if call is not None:
        with _device_ctx(saved[0]):
            call.launch()
    return outs


def _backward(ctx, grad_loss, _grad_dq, _grad_dk):
    """dL/dq_s = grad_output · dq (precomputed by the forward), scaled by one kernel launch."""
    if ctx.used:
        raise RuntimeError("hd_kernels::relation_loss supports one backward per forward (no retain_graph reuse)")
    ctx.used = True
    dq, dk = ctx.saved_tensors
    wanted = [i for i in (0, 1) if ctx.needs_input_grad[i]]
    if not wanted:
        return (None,) * 9
    if dq.numel() == 0:
        raise RuntimeError("relation_loss ran without gradients (grad mode off in forward) but backward was called")
    saved = (dq, dk)
    grads = _scaled_grads([saved[i] for i in wanted], [ctx.dtypes[i] for i in wanted], grad_loss, ctx.post)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        anchor = torch.empty(0, requires_grad=True)  # gives the gradients a grad_fn even if grad_output has none
        grads = list(_NoDoubleBackward.apply(anchor, *grads))
    out = [None] * 9
    for i, grad in zip(wanted, grads, strict=True):
        out[i] = grad
    return tuple(out)


_relation_loss_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hd_kernels::gather_relations", mutates_args=())
def _gather_relations_op(q_t: torch.Tensor, k_t: torch.Tensor, keep_idx: torch.Tensor, scale: float) -> torch.Tensor:
    return _launch_gather(q_t, k_t, keep_idx, scale)


@_gather_relations_op.register_fake
def _gather_relations_fake(q_t, k_t, keep_idx, scale):
    m = keep_idx.shape[1]
    return q_t.new_empty((q_t.shape[0], q_t.shape[1], m, m), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Functional entry points (arguments already validated by :mod:`kernels`)
# ----------------------------------------------------------------------------------------------------------


def relation_loss_triton(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    keep_idx: torch.Tensor,
    beta: float,
    scale: float,
    deterministic: bool = False,
) -> torch.Tensor:
    """Fused relation loss (see module docstring); the teacher is never differentiated.

    Args:
        q_s, k_s: student (B, H, N', d_s). q_t, k_t: teacher (B, H, N, d_t). keep_idx: (B, N').
        beta: smooth-L1 threshold (>= 0). scale: multiplier of both q·kᵀ products.
        deterministic: no atomics (two passes for large N'), bit-reproducible.

    Returns:
        Scalar fp32 loss with autograd to q_s and k_s.
    """
    need_grad = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
    loss, _, _ = _relation_loss_op(
        q_s, k_s, q_t.detach(), k_t.detach(), keep_idx, float(beta), float(scale), bool(deterministic), need_grad
    )
    return loss


def gather_relations_triton(q_t: torch.Tensor, k_t: torch.Tensor, keep_idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton ``gather_relations``: fp32 (B, H, N', N') (q_t[keep] @ k_t[keep]ᵀ)·scale, no gradient."""
    return _gather_relations_op(q_t.detach(), k_t.detach(), keep_idx, float(scale))
