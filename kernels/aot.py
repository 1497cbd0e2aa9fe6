"""Ahead-of-time compilation of the relation kernels' exact launches for Hopper (sm_90), without a GPU.

:func:`compile_call` compiles a :class:`kernels.relation.KernelCall` (what the launcher launches: the same
arguments, constexprs and launch options) the way Triton's JIT would on an sm_90 device: the same binder
derives the signature and the specialisation from the real arguments (int arguments equal to 1 become
constants, pointers and ints divisible by 16 get ``tt.divisibility`` hints), then ``triton.compile`` runs
down to PTX and cubin with Triton's own ptxas. :func:`resources` reads registers, stack/spills and shared
memory of the result (``cuobjdump -res-usage`` on the cubin, Triton's shared-memory figure) and which
matrix instructions the PTX uses.

The set of launch plans is :func:`plan_keys` (every binary the launcher can produce for the head dims in
``DIMS`` and N' <= 1024, per input kind); :func:`compile_cover` picks representative problems that cover
it (see its docstring) and is what ``tests/test_kernels_compile.py`` compiles and what
``python -m kernels.bench --compile-report`` tabulates (:func:`compile_report`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import relation

__all__ = [
    "HOPPER",
    "MAX_SHARED",
    "KINDS",
    "DIMS",
    "Problem",
    "GatherProblem",
    "specialise",
    "compile_call",
    "compile_problems",
    "gather_cover",
    "resources",
    "problem_calls",
    "plan_keys",
    "compile_cover",
    "compile_report",
    "report_table",
]

HOPPER = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB): more fails to launch
# Input kinds: name -> (student dtype, teacher dtype, torch.backends.cuda.matmul.allow_tf32).
KINDS = {
    "bf16": (torch.bfloat16, torch.bfloat16, False),
    "fp16": (torch.float16, torch.float16, False),
    "fp32": (torch.float32, torch.float32, False),  # IEEE fp32 dots (PyTorch's default)
    "fp32-tf32": (torch.float32, torch.float32, True),
}
DIMS = (16, 32, 48, 64, 80, 96, 128)  # head dims: every chunking split_dim produces for d <= 128
_REAL_NK = (197, 144, 68, 26, 785, 573, 268, 103)  # the benchmark's N' (ViT 224/448 px, keep 100/73/34/13 %)


# ----------------------------------------------------------------------------------------------------------
# Compiling one launch
# ----------------------------------------------------------------------------------------------------------


def specialise(call: relation.KernelCall, target: GPUTarget = HOPPER):
    """(ASTSource, options) Triton's JIT builds for ``call`` on a ``target`` device (no GPU needed).

    Mirrors ``JITFunction.run`` of Triton 3.6/3.8: the binder created for ``target``'s backend specialises the
    real arguments, ``JITFunction._pack_args`` turns that into signature, constexprs and attributes.
    """
    fn = relation._kernel(call.fn, False)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    knobs = triton.knobs
    kwargs = dict(call.kwargs, debug=bool(fn.debug or knobs.runtime.debug))
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*call.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options


def compile_call(call: relation.KernelCall, target: GPUTarget = HOPPER):
    """Compile exactly the binary ``call.launch()`` would JIT-compile on a ``target`` device (:func:`specialise`)."""
    src, options = specialise(call, target)
    return triton.compile(src, target=target, options=options.__dict__)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma"


def resources(compiled) -> dict:
    """Registers/thread, stack and local bytes/thread (spills), shared bytes/block and the matrix instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return dict(regs=int(usage["REG"]), stack=int(usage["STACK"]), local=int(usage["LOCAL"]),
                shared=int(compiled.metadata.shared), mma=_mma_kind(compiled.asm["ptx"]),
                fp32_atomics=re.search(r"\b(?:atom|red)\.global[.\w]*\.add[.\w]*\.f32", compiled.asm["ptx"])
                is not None)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Problems and the set of plans
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    """One relation-loss call: input kind, head dims, N', plan switches and beta."""

    kind: str  # key of KINDS
    d_s: int
    d_t: int
    m: int
    deterministic: bool
    need_grad: bool
    beta: float = 1.0
    teacher: str | None = None  # kind of the teacher when it differs from the student's (mixed dtypes)
    keep_dtype: torch.dtype = torch.int64

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        return KINDS[self.kind][0], KINDS[self.teacher or self.kind][1]

    @property
    def tf32(self) -> bool:
        return KINDS[self.kind][2]

    def plan(self) -> relation.RelationPlan:
        with _allow_tf32(self.tf32):
            return relation.plan_relation(self.m, self.d_s, self.d_t, *self.dtypes, self.deterministic,
                                          self.need_grad)  # fmt: skip

    def calls(self) -> list[relation.KernelCall]:
        return problem_calls(self)

    def name(self) -> str:
        kind = self.kind + (f"/{self.teacher}" if self.teacher else "")
        dims = f"d{self.d_s}" if self.d_s == self.d_t else f"d{self.d_s}/{self.d_t}"
        mode = self.plan().mode
        return f"{kind}-{dims}-Nk{self.m}-{mode}" + ("-L1" if self.beta == 0 else "")


@contextlib.contextmanager
def _allow_tf32(on: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def problem_calls(p: Problem, batch: int = 2, heads: int = 3) -> list[relation.KernelCall]:
    """The launches ``kernels.relation_loss`` makes for problem ``p`` (CPU tensors of the real layout).

    Contiguous (B, H, N, d) inputs, N = N' + 11 teacher tokens, int64 keep_idx: the common training layout
    (unit head-dim stride, so the JIT specialises it to a constant, as on the GPU).
    """
    dtype_s, dtype_t = p.dtypes
    n = p.m + 11
    q_s = torch.zeros(batch, heads, p.m, p.d_s, dtype=dtype_s)  # (B, H, N', d_s)
    q_t = torch.zeros(batch, heads, n, p.d_t, dtype=dtype_t)  # (B, H, N, d_t)
    keep = torch.zeros(batch, p.m, dtype=p.keep_dtype)  # (B, N')
    with _allow_tf32(p.tf32):
        _, calls, _ = relation.relation_calls(q_s, q_s.clone(), q_t, q_t.clone(), keep, p.beta,
                                              p.d_s**-0.5, p.deterministic, p.need_grad)  # fmt: skip
    return calls


@dataclasses.dataclass(frozen=True)
class GatherProblem:
    """One ``gather_relations`` call: input kind, head dim, N'."""

    kind: str
    d: int
    m: int

    def calls(self) -> list[relation.KernelCall]:
        q = torch.zeros(2, 3, self.m + 11, self.d, dtype=KINDS[self.kind][0])  # (B, H, N, d)
        keep = torch.zeros(2, self.m, dtype=torch.int64)
        with _allow_tf32(KINDS[self.kind][2]):
            return [relation.gather_call(q, q.clone(), keep, self.d**-0.5)[0]]

    def name(self) -> str:
        return f"gather-{self.kind}-d{self.d}-Nk{self.m}"


def gather_cover() -> list[GatherProblem]:
    """Every input kind x head dims 16/64/80/128 x one small (16-row) and one large (64-row) tile."""
    return [GatherProblem(kind, d, m) for kind in KINDS for d in (16, 64, 80, 128) for m in (13, 197)]


def _compile_problem(p) -> list[dict] | str:
    """Resources of each launch of p, or the error (a string) if one does not compile."""
    try:
        return [resources(compile_call(call)) for call in p.calls()]
    except Exception as e:  # noqa: BLE001 - reported by the caller, per problem
        return f"{type(e).__name__}: {e}"


def compile_problems(problems: list, workers: int | None = None) -> list[list[dict] | str]:
    """:func:`_compile_problem` for each problem, in ``workers`` processes (default: the CPU count, at most 4).

    Compiled kernels land in Triton's on-disk cache, so a rerun takes seconds.
    """
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(problems) <= 1:
        return [_compile_problem(p) for p in problems]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_problem, problems))


def _binary_keys(p: Problem) -> list[tuple]:
    """One key per launch of p: what determines its binary besides the specialisation."""
    plan = p.plan()
    out = []
    for compute_loss, grad_a, grad_b, _ in plan.passes:
        c = plan.constexprs(compute_loss, grad_a, grad_b, p.beta == 0)
        out.append((p.kind, p.teacher, plan.num_warps, tuple(sorted(c.items()))))
    return out


def plan_keys(kinds=tuple(KINDS), dims=DIMS, max_m: int = 1024) -> dict[tuple, Problem]:
    """Every binary the launcher produces for equal student/teacher head dims in ``dims``, N' <= max_m, beta > 0.

    Returns:
        binary key -> a representative problem producing it: one of the benchmark's N' when possible, else the
        largest odd N' (kept tokens = CLS + patches, and odd sizes exercise the masks).
    """
    out: dict[tuple, Problem] = {}
    for kind in kinds:
        for d in dims:
            for m in range(1, max_m + 1):
                for deterministic, need_grad in ((False, False), (False, True), (True, True)):
                    p = Problem(kind, d, d, m, deterministic, need_grad)
                    for key in _binary_keys(p):
                        best = out.get(key)
                        if best is None or _better(m, best.m):
                            out[key] = p
    return out


def _better(m: int, old: int) -> bool:
    """Representative N': the earliest-listed benchmark N', else the largest odd one."""
    rank = lambda x: (_REAL_NK.index(x), 0) if x in _REAL_NK else (len(_REAL_NK), -(x % 2), -x)
    return rank(m) < rank(old)


def _parts(key: tuple) -> tuple[tuple, tuple, tuple]:
    """(input kind, head-dim chunks, tile, pass flags) of a binary key, as (kind, chunks, tile, pass)."""
    kind, teacher, num_warps, items = key
    c = dict(items)
    chunks = (c["BLOCK_DS0"], c["BLOCK_DS1"], c["BLOCK_DT0"], c["BLOCK_DT1"])
    flags = (c["COMPUTE_LOSS"], c["GRAD_A"], c["GRAD_B"])
    return (kind, teacher), chunks, (c["BLOCK_M"], c["BLOCK_N"], num_warps), flags


def _frontier(keys) -> set[tuple]:
    """The resource frontier: per (kind, chunks), the gradient pass (single or atomic) of every tile that no
    larger tile (rows and columns both >=) of the same pass dominates. These use the most registers and
    shared memory; the other binaries of that (kind, chunks) differ by smaller tiles or fewer outputs."""
    grad = [k for k in keys if _parts(k)[3][2] != 0]  # GRAD_B = 1 (atomic) or 2 (single)
    out = set()
    for k in grad:
        kind, chunks, (bm, bn, _), flags = _parts(k)
        dominated = any(
            _parts(o)[:2] == (kind, chunks)
            and _parts(o)[3] == flags
            and o != k
            and _parts(o)[2][0] >= bm
            and _parts(o)[2][1] >= bn
            for o in grad
        )
        if not dominated:
            out.add(k)
    return out


def _cover_keys(key: tuple) -> set[tuple]:
    """Pass kinds a binary exercises, per input kind and per head-dim chunks (pairwise)."""
    kind, chunks, _, flags = _parts(key)
    return {("pass", kind, flags), ("pass", chunks, flags)}


def _extra_problems() -> list[Problem]:
    """Variants outside :func:`plan_keys`: L1 (beta = 0), mixed dtypes and head dims, int32 keep_idx, and
    the plans of the review's sm_90 shared-memory bug (fp32 with TF32, d = 128, 65 <= N' <= 128)."""
    return [
        Problem("bf16", 64, 64, 197, False, True, beta=0.0),
        Problem("bf16", 64, 80, 67, False, True, teacher="fp16", keep_dtype=torch.int32),
        Problem("fp32", 64, 80, 67, False, True, teacher="bf16"),
        Problem("fp32", 48, 80, 21, False, True, teacher="fp16"),
        Problem("fp16", 80, 64, 40, False, True, teacher="fp32"),
        Problem("fp32-tf32", 128, 128, 100, False, True),
        Problem("fp32-tf32", 128, 128, 128, False, False),
    ]


def compile_cover(kinds=tuple(KINDS), dims=DIMS) -> list[Problem]:
    """Problems whose launches cover the plans of :func:`plan_keys`, plus :func:`_extra_problems`.

    Covered: (1) the resource frontier (:func:`_frontier`): for every input kind and head-dim chunking, the
    gradient pass of each largest tile shape, i.e. every binary that could run out of registers or shared
    memory first; (2) every pass kind (forward-only, single-block, atomic, both deterministic passes) with
    every input kind and with every head-dim chunking, in at least one compiled problem (pairwise).
    """
    keys = plan_keys(kinds, dims)
    frontier = _frontier(keys)
    chosen = list(dict.fromkeys(keys[k] for k in sorted(frontier, key=str)))
    covered = covered_keys(chosen)
    candidates = {p: covered_keys([p]) for p in set(keys.values())}
    while True:  # greedy: the problem covering the most uncovered pass keys, cheapest compile first
        best = max(candidates, key=lambda p: (len(candidates[p] - covered), -_compile_cost(p), p.name()), default=None)
        if best is None or not candidates[best] - covered:
            break
        covered |= candidates[best]
        chosen.append(best)
    return chosen + _extra_problems()


def _compile_cost(p: Problem) -> int:
    """Rough relative compile time: launches, IEEE fp32 (FMA dots unrolled) about 3x."""
    return len(p.plan().passes) * (3 if p.plan().precision == "ieee" else 1)


def required_keys(kinds=tuple(KINDS), dims=DIMS) -> tuple[set, set]:
    """(frontier binaries, pass keys) that :func:`compile_cover` must cover (checked by the compile tests)."""
    keys = plan_keys(kinds, dims)
    return _frontier(keys), {ck for k in keys for ck in _cover_keys(k)}


def covered_binaries(problems: list[Problem]) -> set[tuple]:
    return {key for p in problems for key in _binary_keys(p)}


def covered_keys(problems: list[Problem]) -> set[tuple]:
    return {ck for key in covered_binaries(problems) for ck in _cover_keys(key)}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def compile_report(problems: list[Problem] | None = None, workers: int | None = None) -> list[dict]:
    """Compile each problem's launches for sm_90 and return one row per launch (see :func:`report_table`)."""
    problems = report_problems() if problems is None else problems
    rows = []
    for p, results in zip(problems, compile_problems(problems, workers), strict=True):
        if isinstance(results, str):
            raise RuntimeError(f"{p.name()}: {results}")
        plan = p.plan()
        for call, (_, _, grad_b, swapped), res in zip(p.calls(), plan.passes, results, strict=True):
            k = call.kwargs
            kind = p.kind if not p.teacher else f"{p.kind}/{p.teacher}"
            what = "swapped" if swapped else ("loss" if not k["GRAD_A"] else f"grad_b={grad_b}")
            rows.append(dict(problem=p.name(), kind=kind, d_s=p.d_s, d_t=p.d_t, m=p.m, plan=plan.mode, pass_=what,
                             tile=f"{k['BLOCK_M']}x{k['BLOCK_N']}", chunks=f"{k['BLOCK_DS0']}+{k['BLOCK_DS1']}",
                             warps=k["num_warps"], **res))  # fmt: skip
    return rows


def report_problems() -> list[Problem]:
    """The shapes of the docs' table: each plan at the benchmark's N' and head dims, per input kind."""
    out = []
    for kind in ("bf16", "fp16"):
        for d in (64, 80, 128):
            for m in (68, 197, 268):
                out.append(Problem(kind, d, d, m, False, True))
            out.append(Problem(kind, d, d, 268, True, True))
    for kind in ("fp32", "fp32-tf32"):
        for d in (64, 128):
            for m in (26, 100, 197):
                out.append(Problem(kind, d, d, m, False, True))
    return out


def report_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compile_report` rows."""
    head = "| kind | d | N' | plan | pass | tile | chunks | warps | regs | stack B | local B | smem KiB | mma |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r["d_s"] if r["d_s"] == r["d_t"] else f"{r['d_s']}/{r['d_t']}"
        lines.append(f"| {r['kind']} | {d} | {r['m']} | {r['plan']} | {r['pass_']} | {r['tile']} | {r['chunks']} "
                     f"| {r['warps']} | {r['regs']} | {r['stack']} | {r['local']} | {r['shared'] / 1024:.1f} "
                     f"| {r['mma']} |")  # fmt: skip
    return "\n".join(lines)
