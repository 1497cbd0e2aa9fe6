"""Fused Triton kernels for the masked relation loss and the masked relation gathering.

Layers: raw kernel bodies (``_relation_rows_kernel``, ``_gather_kernel``) -> launchers
(``_launch_relation``, ``_launch_gather``) -> torch custom ops with autograd (``hd_kernels::relation_loss``,
``hd_kernels::gather_relations``, so ``torch.compile`` traces through them) -> the functions
``relation_loss_triton`` / ``gather_relations_triton`` that :mod:`kernels` dispatches to.

Algorithm (flash-attention-like, no softmax). For one (b, h), a block of rows i and a block of columns j:

    S_ij = q_s[i]·k_s[j]·scale                      student relation tile   (BLOCK_M, BLOCK_N), fp32
    T_ij = q_t[keep[i]]·k_t[keep[j]]·scale          teacher rows gathered by keep_idx while loading
    loss += smoothL1_β(S_ij − T_ij)
    G_ij  = clamp((S_ij − T_ij)/β, −1, 1)·scale     (divided by count = B·H·N'² at the end)
    dq_s[i] += G_ij k_s[j];   dk_s[j] += G_ijᵀ q_s[i]

The smooth-L1 gradient of a tile depends only on that tile, so the forward also produces dq_s and dk_s
and the backward only multiplies them by grad_output. No N'×N' (or N×N) tensor is ever allocated: the
extra memory is the two gradients, a (B·H·row-blocks,) vector of partial losses and, in the atomic plan,
an fp32 dk accumulator.

FLOPs (the ``kernels`` ops note): 8·N'²·d per (b, h) for forward+backward (S, T, dq_s, dk_s); the
deterministic two-pass plan recomputes S and T in its second pass: 12·N'²·d.

Plans (:func:`plan_relation`; grid = B·H·row-blocks programs, one launch unless noted):
    * ``single`` (N' <= 128; fp32-IEEE <= 32): one program per (b, h) owns every row, so each column
      block's dk_s is complete when computed and is stored directly: no atomics, deterministic.
    * ``atomic`` (N' > 128, default): dq_s written by the owning program, dk_s by fp32 ``tl.atomic_add``
      (order of additions varies run to run: not bit-reproducible), then cast to the gradient dtype.
    * ``two_pass`` (N' > 128, deterministic): the same kernel launched twice, the second time with the roles
      of q and k swapped (S_ijᵀ = k_s[j]·q_s[i], so "dq" of the swapped problem is dk_s); no atomics.
    * ``forward`` (no gradient wanted): S, T and the loss only.
    Partial losses are summed in a fixed order (float64), so every plan but ``atomic`` is bit-identical
    run to run.

Numerics: fp32 accumulation; fp16/bf16 operands go to the tensor cores, G is rounded to the input dtype
before the G·k and Gᵀ·q products (as flash-attention does with P); fp32 inputs use IEEE fp32 dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set (same contract as the eager reference). Gradients are
returned in the input dtype, except fp16 whose gradients are kept in fp32 until multiplied by
grad_output (1/count is tiny and would underflow fp16).

Inputs: any strides (pointer arithmetic, no copies), head dims padded with masks to the next power of two
(>= 16), any N' >= 1, any N, keep_idx int32/int64. Plain pointer arithmetic only (``tl.make_block_ptr`` is
gone in Triton 3.8); written for Triton 3.6 and 3.8.

Interpreter: the kernels are created lazily, per call, as compiled ``JITFunction`` or as the CPU
interpreter's ``InterpretedFunction`` according to ``TRITON_INTERPRET`` *at call time*, so tests can switch
the interpreter on with an environment variable whatever was imported first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "relation_loss_triton",
    "gather_relations_triton",
    "interpret_mode",
    "plan_relation",
    "TUNING",
    "relation_kernel_configs",
    "all_relation_kernel_configs",
    "gather_kernel_configs",
    "RELATION_KERNEL",
    "GATHER_KERNEL",
]


# ----------------------------------------------------------------------------------------------------------
# Kernels (raw bodies; see ``_kernel`` for how they are jitted). No @triton.jit helpers are called from
# them, so the same body runs compiled or interpreted.
# ----------------------------------------------------------------------------------------------------------


def _relation_rows_kernel(
    a_s_ptr,  # (B, H, M, DS) student rows operand: q_s (or k_s in the swapped pass)
    b_s_ptr,  # (B, H, M, DS) student columns operand: k_s (or q_s)
    a_t_ptr,  # (B, H, N, DT) teacher rows operand: q_t (or k_t), gathered by keep
    b_t_ptr,  # (B, H, N, DT) teacher columns operand: k_t (or q_t), gathered by keep
    keep_ptr,  # (B, M) int32/int64 kept positions
    grad_a_ptr,  # (B, H, M, DS) contiguous, out: dloss/da (divided by count)
    grad_b_ptr,  # (B, H, M, DS) contiguous, out: dloss/db; fp32 accumulated with atomics (GRAD_B=1) or stored (2)
    loss_ptr,  # (B*H*num_row_blocks,) fp32, out (COMPUTE_LOSS): partial sums of smooth-L1
    H,
    M,
    DS,
    DT,
    scale,
    beta,
    inv_beta,
    inv_count,
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
    BLOCK_DS: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    GRAD_A: tl.constexpr,  # write dloss/da (the row operand)
    GRAD_B: tl.constexpr,  # 0: no dk (two-pass mode), 1: fp32 atomics, 2: direct store (single row block)
    IS_L1: tl.constexpr,
    PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = (pid // num_m).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_ds = tl.arange(0, BLOCK_DS)  # (BDS,)
    offs_dt = tl.arange(0, BLOCK_DT)  # (BDT,)
    mask_m = offs_m < M
    mask_ds = offs_ds < DS
    mask_dt = offs_dt < DT

    # Row operands: student rows straight, teacher rows gathered through keep. Masked lanes load 0, so padded
    # rows/columns/head-dims give S = T = 0, a zero loss and a zero gradient without further masking.
    keep_m = tl.load(keep_ptr + off_b * s_keep_b + offs_m * s_keep_n, mask=mask_m, other=0).to(tl.int64)
    a_s = tl.load(
        a_s_ptr + off_b * s_as_b + off_h * s_as_h + offs_m[:, None] * s_as_n + offs_ds[None, :] * s_as_d,
        mask=mask_m[:, None] & mask_ds[None, :],
        other=0.0,
    )  # (BM, BDS)
    a_t = tl.load(
        a_t_ptr + off_b * s_at_b + off_h * s_at_h + keep_m[:, None] * s_at_n + offs_dt[None, :] * s_at_d,
        mask=mask_m[:, None] & mask_dt[None, :],
        other=0.0,
    )  # (BM, BDT)

    acc = tl.zeros((BLOCK_M, BLOCK_DS), dtype=tl.float32)  # (BM, BDS) sum_j G_ij b_j
    loss_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        mask_n = offs_n < M
        keep_n = tl.load(keep_ptr + off_b * s_keep_b + offs_n * s_keep_n, mask=mask_n, other=0).to(tl.int64)
        b_s = tl.load(
            b_s_ptr + off_b * s_bs_b + off_h * s_bs_h + offs_n[:, None] * s_bs_n + offs_ds[None, :] * s_bs_d,
            mask=mask_n[:, None] & mask_ds[None, :],
            other=0.0,
        )  # (BN, BDS)
        b_t = tl.load(
            b_t_ptr + off_b * s_bt_b + off_h * s_bt_h + keep_n[:, None] * s_bt_n + offs_dt[None, :] * s_bt_d,
            mask=mask_n[:, None] & mask_dt[None, :],
            other=0.0,
        )  # (BN, BDT)
        s = tl.dot(a_s, tl.trans(b_s), input_precision=PRECISION)  # (BM, BN) fp32
        t = tl.dot(a_t, tl.trans(b_t), input_precision=PRECISION)  # (BM, BN) fp32
        x = (s - t) * scale
        if COMPUTE_LOSS:
            ax = tl.abs(x)
            elem = tl.where(ax < beta, 0.5 * x * x * inv_beta, ax - 0.5 * beta)
            loss_rows += tl.sum(elem, axis=1)
        if GRAD_A or GRAD_B != 0:
            if IS_L1:
                g = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))
            else:
                g = tl.minimum(tl.maximum(x * inv_beta, -1.0), 1.0)
            g = (g * scale).to(b_s.dtype)  # (BM, BN): rounded to the operand dtype for the tensor cores
        if GRAD_A:
            acc = tl.dot(g, b_s, acc, input_precision=PRECISION)  # (BM, BDS)
        if GRAD_B == 1:  # other row blocks add to the same columns: fp32 atomics
            gb = tl.dot(tl.trans(g), a_s, input_precision=PRECISION) * inv_count  # (BN, BDS)
            tl.atomic_add(
                grad_b_ptr + off_b * s_g_b + off_h * s_g_h + offs_n[:, None] * s_g_n + offs_ds[None, :],
                gb,
                mask=mask_n[:, None] & mask_ds[None, :],
                sem="relaxed",
            )
        if GRAD_B == 2:  # this program owns every row: the column block's dk is complete, store it
            gb = tl.dot(tl.trans(g), a_s, input_precision=PRECISION) * inv_count  # (BN, BDS)
            tl.store(
                grad_b_ptr + off_b * s_g_b + off_h * s_g_h + offs_n[:, None] * s_g_n + offs_ds[None, :],
                gb.to(grad_b_ptr.dtype.element_ty),
                mask=mask_n[:, None] & mask_ds[None, :],
            )

    if GRAD_A:
        acc = acc * inv_count
        tl.store(
            grad_a_ptr + off_b * s_g_b + off_h * s_g_h + offs_m[:, None] * s_g_n + offs_ds[None, :],
            acc.to(grad_a_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_ds[None, :],
        )
    if COMPUTE_LOSS:
        tl.store(loss_ptr + pid, tl.sum(loss_rows, axis=0))


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
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_n = offs_n < M
    mask_d = offs_d < D
    keep_m = tl.load(keep_ptr + off_b * s_keep_b + offs_m * s_keep_n, mask=mask_m, other=0).to(tl.int64)
    keep_n = tl.load(keep_ptr + off_b * s_keep_b + offs_n * s_keep_n, mask=mask_n, other=0).to(tl.int64)
    q = tl.load(
        q_ptr + off_b * s_q_b + off_h * s_q_h + keep_m[:, None] * s_q_n + offs_d[None, :] * s_q_d,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BM, BD)
    k = tl.load(
        k_ptr + off_b * s_k_b + off_h * s_k_h + keep_n[:, None] * s_k_n + offs_d[None, :] * s_k_d,
        mask=mask_n[:, None] & mask_d[None, :],
        other=0.0,
    )  # (BN, BD)
    r = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (BM, BN) fp32
    out = out_ptr + pid_bh * M * M + offs_m[:, None] * M + offs_n[None, :]
    tl.store(out, r, mask=mask_m[:, None] & mask_n[None, :])


RELATION_KERNEL = _relation_rows_kernel
GATHER_KERNEL = _gather_kernel


# ----------------------------------------------------------------------------------------------------------
# Jitting and configuration
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
    imported: compiled-only ``JITFunction`` objects if the interpreter was off then. For the launch they are
    swapped for interpreted twins; nested interpreted calls patch ``triton.language.core`` without undoing it,
    so every attribute of the language modules and classes is restored afterwards (a later compiled kernel in
    the same process then sees an untouched ``triton.language``).
    """
    from triton.runtime.interpreter import InterpretedFunction

    owners = (tl, tl.core, tl.standard, tl.math, tl.tensor, tl.dtype)
    saved = [(obj, dict(vars(obj))) for obj in owners]
    for name in _STDLIB_USED:
        fn = getattr(tl, name)
        if isinstance(fn, triton.JITFunction):
            setattr(tl, name, InterpretedFunction(fn.fn))
    try:
        yield
    finally:
        for obj, before in saved:
            for key, value in before.items():
                if vars(obj).get(key, _MISSING) is not value:
                    setattr(obj, key, value)
            for key in set(vars(obj)) - set(before):
                delattr(obj, key)


def _launch_scope():
    """Context for a kernel launch: the interpreter scope when interpreting, nothing otherwise."""
    return _interpreter_scope() if interpret_mode() else contextlib.nullcontext()


@functools.cache
def _kernel(fn, interpret: bool):
    """The jitted (or interpreted) version of a raw kernel body, cached per mode."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.JITFunction(fn)


# Tile sizes, in one place so a GPU session can tune them (``python -m kernels.bench --tuning key=value``).
TUNING = dict(
    single_block_max=128,  # N' up to this: one program per (b, h) owns all rows -> dk stored, no atomics
    block_m=64,  # row block when N' > single_block_max
    block_n=64,  # column block for padded head dims <= 64
    block_n_wide=32,  # column block for padded head dims > 64 (register pressure)
    num_stages=2,
    # IEEE fp32 dots run on the FMA units and are unrolled by the compiler: smaller tiles.
    ieee_single_block_max=32,
    ieee_block_m=32,
    ieee_block_n=32,
)

# Passes of the relation kernel: (COMPUTE_LOSS, GRAD_A, GRAD_B, swapped operands).
_PASSES = {
    "forward": ((True, False, 0, False),),  # no gradients wanted
    "single": ((True, True, 2, False),),  # N' <= single_block_max: dq and dk in one pass, deterministic
    "atomic": ((True, True, 1, False),),  # default for large N': dk by fp32 atomics
    "two_pass": ((True, True, 0, False), (False, True, 0, True)),  # deterministic: dk by the swapped pass
}


@dataclasses.dataclass(frozen=True)
class RelationPlan:
    """How the relation kernel is launched for one problem size."""

    block_m: int
    block_n: int
    block_ds: int
    block_dt: int
    num_warps: int
    mode: str  # key of _PASSES

    @property
    def passes(self) -> tuple[tuple[bool, bool, int, bool], ...]:
        return _PASSES[self.mode]

    def constexprs(self, compute_loss: bool, grad_a: bool, grad_b: int, precision: str, is_l1: bool = False) -> dict:
        return dict(
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_DS=self.block_ds, BLOCK_DT=self.block_dt,
            COMPUTE_LOSS=compute_loss, GRAD_A=grad_a, GRAD_B=grad_b, IS_L1=is_l1, PRECISION=precision,
        )  # fmt: skip


def _pad_dim(d: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(d))


def plan_relation(
    m: int, d_s: int, d_t: int, deterministic: bool, need_grad: bool, precision: str = "tf32"
) -> RelationPlan:
    """Tile sizes and pass structure for N' = m kept tokens, head dims d_s (student), d_t (teacher).

    Args:
        precision: tl.dot input precision (see :func:`_precision`); "ieee" (exact fp32) gets smaller tiles.
    """
    block_ds, block_dt = _pad_dim(d_s), _pad_dim(d_t)
    ieee = precision == "ieee"
    single = m <= TUNING["ieee_single_block_max" if ieee else "single_block_max"]
    block_m = max(16, triton.next_power_of_2(m)) if single else TUNING["ieee_block_m" if ieee else "block_m"]
    block_n = TUNING["block_n"] if max(block_ds, block_dt) <= 64 else TUNING["block_n_wide"]
    block_n = min(block_n, block_m, TUNING["ieee_block_n"] if ieee else block_n)
    if single and block_n > 32 and triton.cdiv(m, 32) * 32 <= 0.9 * triton.cdiv(m, block_n) * block_n:
        block_n = 32  # >= 10% less column padding (N' = 67: 96 instead of 128 columns)
    if not need_grad:
        mode = "forward"
    elif single:
        mode = "single"
    else:
        mode = "two_pass" if deterministic else "atomic"
    return RelationPlan(block_m, block_n, block_ds, block_dt, 8 if block_m >= 128 else 4, mode)


def _precision(*dtypes: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 operands only when torch allows TF32 matmuls (same as the reference)."""
    if torch.float32 in dtypes and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DIMS = (16, 32, 64, 128)  # the padded head dims (80 -> 128)


def all_relation_kernel_configs(dtypes=_DTYPES, dims=_DIMS, max_m: int = 1024) -> list[dict]:
    """Every constexpr set :func:`plan_relation` produces for N' <= max_m (equal head dims, beta > 0).

    Returns:
        List of dicts with keys dtype, d (padded head dim), num_warps, constexprs.
    """
    seen, out = set(), []
    for dtype in dtypes:
        prec = _precision(dtype)
        for d in dims:
            for m in range(1, max_m + 1):
                for deterministic, need_grad in ((False, False), (False, True), (True, True)):
                    plan = plan_relation(m, d, d, deterministic, need_grad, prec)
                    for compute_loss, grad_a, grad_b, _ in plan.passes:
                        c = plan.constexprs(compute_loss, grad_a, grad_b, prec)
                        key = (dtype, tuple(sorted(c.items())))
                        if key not in seen:
                            seen.add(key)
                            out.append(dict(dtype=dtype, d=d, num_warps=plan.num_warps, constexprs=c))
    return out


def _cover_keys(cfg: dict) -> tuple[tuple, tuple]:
    """(pass key, tile key): what a config exercises besides its dtype and padded head dim."""
    c = cfg["constexprs"]
    base = (cfg["dtype"], c["BLOCK_DS"], c["BLOCK_DT"])
    return base + (c["COMPUTE_LOSS"], c["GRAD_A"], c["GRAD_B"], c["PRECISION"]), base + (c["BLOCK_M"], c["BLOCK_N"])


def relation_kernel_configs(dtypes=_DTYPES, dims=_DIMS) -> list[dict]:
    """The relation-kernel configurations to compile ahead of time (tests): a pairwise cover of the shipped ones.

    Every (dtype, padded head dim) is paired with every pass kind it can launch (forward-only, single-block,
    atomic, both deterministic passes; that is deterministic on and off) and with every tile shape it can use,
    in at least one compiled configuration; plus the L1 (beta = 0) and fp32-TF32 variants. The full set
    (:func:`all_relation_kernel_configs`, ~130) takes minutes to compile on a CPU; the cover about half.
    """
    todo = all_relation_kernel_configs(dtypes, dims)
    covered, out = set(), []
    while True:  # greedy: take the config that covers the most uncovered keys
        best = max(todo, key=lambda cfg: len(set(_cover_keys(cfg)) - covered), default=None)
        if best is None or not set(_cover_keys(best)) - covered:
            break
        covered.update(_cover_keys(best))
        out.append(best)
    extra = []
    if torch.float32 in dtypes:
        for m in (128, 200):
            plan = plan_relation(m, 64, 64, False, True, "tf32")
            extra.append((torch.float32, plan, plan.constexprs(True, True, plan.passes[0][2], "tf32")))
    plan = plan_relation(128, 64, 64, False, True)
    extra.append((dtypes[0], plan, plan.constexprs(True, True, 2, _precision(dtypes[0]), is_l1=True)))
    out += [dict(dtype=dt, d=64, num_warps=p.num_warps, constexprs=c) for dt, p, c in extra]
    return out


def gather_kernel_configs(dtypes=_DTYPES, dims=_DIMS) -> list[dict]:
    """Every constexpr combination of the gather kernel (see :func:`relation_kernel_configs`)."""
    out = []
    for dtype in dtypes:
        for d in dims:
            for m in (16, 200):
                bm, bn = _gather_blocks(m, _pad_dim(d))
                constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pad_dim(d), PRECISION=_precision(dtype))
                out.append(dict(dtype=dtype, d=d, num_warps=4, constexprs=constexprs))
    return out


def _gather_blocks(m: int, d_pad: int) -> tuple[int, int]:
    block = max(16, min(64, triton.next_power_of_2(m)))
    return block, block


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 gradients stay fp32 until scaled by grad_output (1/count underflows fp16)."""
    return torch.float32 if dtype == torch.float16 else dtype


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _launch_pass(plan, operands, keep, outs, loss_part, beta, scale, inv_count, flags):
    """One launch of ``_relation_rows_kernel`` over all (b, h, row-block) programs.

    Args:
        operands: (a_s, b_s, a_t, b_t): (q_s, k_s, q_t, k_t), or (k_s, q_s, k_t, q_t) for the swapped pass.
        outs: (grad_a, grad_b) buffers (either may be a stub the pass does not touch).
        flags: (COMPUTE_LOSS, GRAD_A, GRAD_B, swapped) from the plan.
    """
    a_s, b_s, a_t, b_t = operands
    grad_a, grad_b = outs
    compute_loss, grad_a_on, grad_b_mode, _ = flags
    bsz, heads, m, ds = a_s.shape
    grid = (bsz * heads * triton.cdiv(m, plan.block_m),)
    constexprs = plan.constexprs(compute_loss, grad_a_on, grad_b_mode, _precision(a_s.dtype, a_t.dtype), beta == 0)
    assert plan.block_m >= 16 and plan.block_n >= 16
    kernel = _kernel(_relation_rows_kernel, interpret_mode())
    with _launch_scope():
        kernel[grid](
            a_s, b_s, a_t, b_t, keep, grad_a, grad_b, loss_part,
            heads, m, ds, a_t.shape[-1], scale, beta, (1.0 / beta) if beta > 0 else 0.0, inv_count,
            *a_s.stride(), *b_s.stride(), *a_t.stride(), *b_t.stride(), *keep.stride(), heads * m * ds, m * ds, ds,
            **constexprs, num_warps=plan.num_warps, num_stages=TUNING["num_stages"],
        )  # fmt: skip


def _launch_relation(q_s, k_s, q_t, k_t, keep_idx, beta, scale, deterministic, need_grad):
    """Fused loss (and, if need_grad, dloss/dq_s and dloss/dk_s for grad_output = 1).

    Returns:
        (loss (), dq (B, H, N', d_s), dk (B, H, N', d_s)); the gradients are empty when not need_grad.
    """
    bsz, heads, m, ds = q_s.shape
    plan = plan_relation(m, ds, q_t.shape[-1], deterministic, need_grad, _precision(q_s.dtype, q_t.dtype))
    inv_count = 1.0 / float(bsz * heads * m * m)
    gdtype = _grad_dtype(q_s.dtype)
    shape = (bsz, heads, m, ds) if need_grad else (0,)
    dq = torch.empty(shape, device=q_s.device, dtype=gdtype)  # (B, H, N', d_s)
    if plan.mode == "atomic":  # fp32 accumulator for the atomics
        dk = torch.zeros(shape, device=q_s.device, dtype=torch.float32)
    else:
        dk = torch.empty(shape, device=q_s.device, dtype=gdtype)
    loss_part = torch.empty((bsz * heads * triton.cdiv(m, plan.block_m),), device=q_s.device, dtype=torch.float32)
    stub = torch.empty(1, device=q_s.device, dtype=gdtype)  # forward plan: a valid, never written pointer
    with _device_ctx(q_s):
        for flags in plan.passes:
            swapped = flags[3]
            operands = (k_s, q_s, k_t, q_t) if swapped else (q_s, k_s, q_t, k_t)
            outs = (dk, dq) if swapped else ((dq, dk) if need_grad else (stub, stub))
            _launch_pass(plan, operands, keep_idx, outs, loss_part, beta, scale, inv_count, flags)
    loss = (loss_part.sum(dtype=torch.float64) * inv_count).to(torch.float32)
    return loss, dq, dk.to(gdtype)


def _launch_gather(q_t, k_t, keep_idx, scale):
    """(q_t[keep] @ k_t[keep]ᵀ)·scale -> fp32 (B, H, N', N')."""
    bsz, heads, _, d = q_t.shape
    m = keep_idx.shape[1]
    out = torch.empty((bsz, heads, m, m), device=q_t.device, dtype=torch.float32)
    d_pad = _pad_dim(d)
    block_m, block_n = _gather_blocks(m, d_pad)
    grid = (bsz * heads * triton.cdiv(m, block_m) * triton.cdiv(m, block_n),)
    kernel = _kernel(_gather_kernel, interpret_mode())
    with _device_ctx(q_t), _launch_scope():
        kernel[grid](
            q_t, k_t, keep_idx, out, heads, m, d, scale, *q_t.stride(), *k_t.stride(), *keep_idx.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=d_pad, PRECISION=_precision(q_t.dtype), num_warps=4,
        )  # fmt: skip
    return out


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
    gdtype = _grad_dtype(q_s.dtype)
    shape = q_s.shape if need_grad else (0,)
    loss = q_s.new_empty((), dtype=torch.float32)
    return loss, q_s.new_empty(shape, dtype=gdtype), q_s.new_empty(shape, dtype=gdtype)


def _setup_context(ctx, inputs, output):
    q_s, k_s = inputs[0], inputs[1]
    _, dq, dk = output
    ctx.save_for_backward(dq, dk)
    ctx.dtypes = (q_s.dtype, k_s.dtype)
    ctx.used = False
    ctx.mark_non_differentiable(dq, dk)


def _scaled(grad: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, in_place: bool) -> torch.Tensor:
    """grad·g in ``dtype``; in place (no new allocation) when the stored gradient already has that dtype."""
    if in_place and grad.dtype == dtype:
        return grad.mul_(g)
    return (grad * g).to(dtype)


def _backward(ctx, grad_loss, _grad_dq, _grad_dk):
    """dL/dq_s = grad_output · dq (precomputed by the forward): the saved gradients are scaled in place."""
    if ctx.used:
        raise RuntimeError("hd_kernels::relation_loss supports one backward per forward (no retain_graph reuse)")
    ctx.used = True
    dq, dk = ctx.saved_tensors
    if dq.numel() == 0 and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        raise RuntimeError("relation_loss ran without gradients (grad mode off in forward) but backward was called")
    g = grad_loss.to(torch.float32)
    in_place = not torch.compiler.is_compiling()
    grad_q = _scaled(dq, g, ctx.dtypes[0], in_place) if ctx.needs_input_grad[0] else None
    grad_k = _scaled(dk, g, ctx.dtypes[1], in_place) if ctx.needs_input_grad[1] else None
    return grad_q, grad_k, None, None, None, None, None, None, None


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
        deterministic: two passes, no atomics, bit-reproducible.

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
