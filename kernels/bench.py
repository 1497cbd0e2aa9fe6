"""Throughput benchmark of the relation loss: eager reference, ``torch.compile`` baselines and Triton.

    python -m kernels.bench [--out results.json] [--batch 128] [--dtype bf16] [--quick] [--no-compile]
    python -m kernels.bench --compile-report [--out report.json]

Shapes: ViT-B/16 (H=12) and ViT-L/16 (H=16) with d=64 at 224 px (N=197) and 448 px (N=785), keep ratios
100/73/34/13% (N' = 1 + round(keep·(N-1))), plus a d=80 point (H=16, 224 px, keep 34%); ``--quick``: exactly
ViT-B/16 224 px keep 34% and 100%, ViT-L/16 224 px keep 34% and ViT-L/16 448 px keep 34%. Implementations:
``eager`` (the reference, fp32 matmuls), ``compile`` (``torch.compile(reference)``), ``compile_bf16`` (the
same loss with both matmuls in bf16, compiled: the fastest plain-PyTorch baseline), ``triton`` and
``triton_det`` (deterministic). For each: forward time (inputs requiring grad, as in training: the fused
kernel computes the gradients there) and forward+backward time (median, with p20 and p80: do_bench's
quantiles on GPU), the host time of one forward+backward (CPU time until the call returns, the GPU idle
before it: launch and dispatch overhead; GPU only), peak extra memory over the inputs, achieved GB/s
(bytes = student q, k and the kept teacher q, k rows read + dq, dk written: 6·B·H·N'·d elements) and TFLOP/s
(8·N'²·d per (b, h) for forward+backward), set against the device's copy bandwidth and bf16 matmul rate
measured in the same run. A shape is memory-bound when its arithmetic intensity (FLOP/byte) is below the
ridge point (matmul rate / copy bandwidth); the "% of floor" column is then the HBM time floor (bytes / copy
bandwidth) over the measured time, else the FLOP time floor.

On a machine without CUDA it says so and times the eager reference only, with a small batch and fewer
shapes (quantiles of 9 wall-clock runs), so it finishes in well under a minute.

``--compile-report`` compiles the launches of each plan for Hopper (sm_90) without a GPU and prints
registers, stack/spills, shared memory and matrix instructions per plan and dtype (:mod:`kernels.aot`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import reference

MODELS = (("ViT-B/16", 12, 64), ("ViT-L/16", 16, 64))
IMAGES = ((224, 197), (448, 785))
KEEPS = (1.0, 0.73, 0.34, 0.13)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def n_kept(n: int, keep: float) -> int:
    """N' = CLS + round(keep · patches)."""
    return 1 + round(keep * (n - 1))


QUICK = (("ViT-B/16", 224, 0.34), ("ViT-B/16", 224, 1.0), ("ViT-L/16", 224, 0.34), ("ViT-L/16", 448, 0.34))


def shapes(quick: bool, cuda: bool) -> list[dict]:
    """Benchmark points: name, H, N, N', d (``quick``: exactly the four of ``QUICK``, on GPU and CPU)."""
    out = []
    for model, heads, d in MODELS:
        for px, n in IMAGES:
            for keep in KEEPS:
                if quick and (model, px, keep) not in QUICK:
                    continue
                if not quick and not cuda and px == 448 and model != "ViT-B/16":
                    continue  # CPU: keep the run short
                out.append(dict(name=f"{model} {px}px keep {keep:.0%}", H=heads, N=n, Nk=n_kept(n, keep), d=d))
    if not quick:
        out.append(dict(name="H=16 d=80 224px keep 34%", H=16, N=197, Nk=n_kept(197, 0.34), d=80))
    return out


def make_inputs(b: int, h: int, n: int, m: int, d: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    keep = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=g)[: m - 1]
                                   .sort().values + 1]) for _ in range(b)]).to(device)  # fmt: skip
    q_t = torch.randn(b, h, n, d, device=device, dtype=dtype)  # (B, H, N, d)
    k_t = torch.randn(b, h, n, d, device=device, dtype=dtype)
    q_s = torch.randn(b, h, m, d, device=device, dtype=dtype, requires_grad=True)  # (B, H, N', d)
    k_s = torch.randn(b, h, m, d, device=device, dtype=dtype, requires_grad=True)
    return q_s, k_s, q_t, k_t, keep


QUANTILES = (0.2, 0.5, 0.8)
CPU_RUNS = 9


def timeit(fn: Callable[[], object], cuda: bool, grads: list[torch.Tensor]) -> list[float]:
    """Milliseconds per call of fn at the 20/50/80 % quantiles: do_bench's on GPU, of CPU_RUNS wall-clock runs
    on CPU (after one warm-up)."""
    if cuda:
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                                          quantiles=list(QUANTILES))]  # fmt: skip
    fn()  # warm-up
    times = []
    for _ in range(CPU_RUNS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(QUANTILES, dtype=torch.float64))
    return q.tolist()


def host_ms(fn: Callable[[], object], cuda: bool, grads: list[torch.Tensor], reps: int = 20) -> float | None:
    """Median CPU time until one call of fn returns with the GPU idle before it: launch and dispatch overhead
    (the GPU work is only enqueued; a call that synchronises shows its whole time). None on CPU."""
    if not cuda:
        return None
    fn()
    times = []
    for _ in range(reps):
        for g in grads:
            g.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return float(torch.tensor(times).median())


def peak_extra_mb(fn: Callable[[], object], cuda: bool) -> float | None:
    """Peak memory allocated by one call of fn over what was allocated before it (MiB); None on CPU."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def device_ceilings(cuda: bool) -> dict:
    """Copy bandwidth (GB/s, read+write) and bf16 matmul rate (TFLOP/s) measured now."""
    if not cuda:
        return dict(copy_gbps=None, bf16_tflops=None)
    import triton.testing

    x = torch.empty(2**29, dtype=torch.uint8, device="cuda")  # 512 MiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    copy_gbps = 2 * x.numel() / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return dict(copy_gbps=copy_gbps, bf16_tflops=2 * 8192**3 / (ms * 1e-3) / 1e12)


def relation_loss_bf16_matmul(q_s, k_s, q_t, k_t, keep_idx, beta: float = 1.0, scale: float | None = None):
    """The reference loss with both matmuls in bf16 (fp32 accumulation, bf16 products out): a speed baseline.

    Not a reference (S and T rounded to bf16 before their difference); ``compile_bf16`` compiles it so that the
    Triton speed-ups are also measured against a plain-PyTorch baseline that uses bf16 tensor cores.
    """
    scale = reference.default_scale(q_s.shape[-1], q_t.shape[-1]) if scale is None else scale
    bf16 = torch.bfloat16
    s = torch.matmul(q_s.to(bf16), k_s.to(bf16).transpose(-1, -2)).float() * scale  # (B, H, N', N')
    with torch.no_grad():
        b, h, _, d = q_t.shape
        idx = keep_idx[:, None, :, None].expand(b, h, -1, d)  # (B, H, N', d)
        qt, kt = (torch.gather(x, 2, idx).to(bf16) for x in (q_t, k_t))
        t = torch.matmul(qt, kt.transpose(-1, -2)).float() * scale  # (B, H, N', N')
    return F.smooth_l1_loss(s, t, reduction="mean", beta=beta)


def implementations(cuda: bool, compile_ref: bool) -> dict[str, Callable]:
    impls: dict[str, Callable] = {"eager": reference.relation_loss}
    if cuda and compile_ref:
        impls["compile"] = torch.compile(reference.relation_loss, dynamic=True)
        impls["compile_bf16"] = torch.compile(relation_loss_bf16_matmul, dynamic=True)
    if cuda:
        import kernels

        impls["triton"] = lambda *a: kernels.relation_loss(*a, impl="triton")
        impls["triton_det"] = lambda *a: kernels.relation_loss(*a, impl="triton", deterministic=True)
    return impls


def bench_point(p: dict, batch: int, dtype: torch.dtype, cuda: bool, impls: dict, ceil: dict) -> dict:
    """Time every implementation at one shape."""
    device = "cuda" if cuda else "cpu"
    b, h, n, m, d = batch, p["H"], p["N"], p["Nk"], p["d"]
    inputs = make_inputs(b, h, n, m, d, dtype, device)
    q_s, k_s = inputs[:2]
    elem = torch.finfo(dtype).bits // 8
    nbytes = 6 * b * h * m * d * elem
    flops = 8 * b * h * m * m * d
    row = dict(p, B=b, dtype=str(dtype)[6:], bytes=nbytes, flops=flops, impls={})
    for name, f in impls.items():
        fwd = lambda f=f: f(*inputs)
        fwd_bwd = lambda f=f: f(*inputs).backward()
        try:
            fwd_q, fwd_bwd_q = timeit(fwd, cuda, [q_s, k_s]), timeit(fwd_bwd, cuda, [q_s, k_s])
            r = dict(fwd_ms=fwd_q[1], fwd_bwd_ms=fwd_bwd_q[1], fwd_bwd_p20_ms=fwd_bwd_q[0], fwd_bwd_p80_ms=fwd_bwd_q[2])
            r["host_ms"] = host_ms(fwd_bwd, cuda, [q_s, k_s])
            q_s.grad = k_s.grad = None
            r["peak_extra_mib"] = peak_extra_mb(fwd_bwd, cuda)
            q_s.grad = k_s.grad = None
        except torch.OutOfMemoryError:
            r = dict(error="out of memory")
        except Exception as e:  # noqa: BLE001 - report and continue with the other implementations
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if "fwd_bwd_ms" in r:
            sec = r["fwd_bwd_ms"] * 1e-3
            r["gbps"] = nbytes / sec / 1e9
            r["tflops"] = flops / sec / 1e12
        row["impls"][name] = r
        if cuda:
            torch.cuda.empty_cache()
    _add_floor(row, ceil)
    return row


def _add_floor(row: dict, ceil: dict) -> None:
    """Roofline: which ceiling binds, and each implementation's fraction of that time floor."""
    if not ceil.get("copy_gbps"):
        return
    t_mem = row["bytes"] / (ceil["copy_gbps"] * 1e9)
    t_flop = row["flops"] / (ceil["bf16_tflops"] * 1e12)
    row["bound"] = "memory" if t_mem >= t_flop else "compute"
    row["floor_ms"] = max(t_mem, t_flop) * 1e3
    for r in row["impls"].values():
        if "fwd_bwd_ms" in r:
            r["pct_of_floor"] = 100 * row["floor_ms"] / r["fwd_bwd_ms"]


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


IMPLS = ("eager", "compile", "compile_bf16", "triton", "triton_det")


def table(rows: list[dict], impls: list[str] | None = None) -> str:
    """Markdown table: one line per (shape, implementation); impls default to every one in ``IMPLS``."""
    head = ("| shape | B | N' | impl | fwd ms | fwd+bwd ms | p20 | p80 | host ms | peak extra MiB | GB/s | TFLOP/s "
            "| bound | % of floor |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        for name in impls or IMPLS:
            r = row["impls"].get(name)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {row['name']} | {row['B']} | {row['Nk']} | {name} | {r['error']} ||||||||||")
                continue
            lines.append(
                f"| {row['name']} | {row['B']} | {row['Nk']} | {name} | {_fmt(r['fwd_ms'])} | {_fmt(r['fwd_bwd_ms'])} "
                f"| {_fmt(r.get('fwd_bwd_p20_ms'))} | {_fmt(r.get('fwd_bwd_p80_ms'))} | {_fmt(r.get('host_ms'))} "
                f"| {_fmt(r['peak_extra_mib'], '.0f')} | {_fmt(r['gbps'])} | {_fmt(r['tflops'])} "
                f"| {row.get('bound', '-')} | {_fmt(r.get('pct_of_floor'), '.0f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--batch", type=int, help="batch size (default 128 on GPU, 2 on CPU)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--quick", action="store_true", help="4 shapes: ViT-B/16 224px keep 34%%/100%%, ViT-L/16 224px "
                    "and 448px keep 34%%")  # fmt: skip
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--compile-report", action="store_true", help="compile every plan for sm_90 (no GPU needed) "
                    "and print registers/spills/shared memory per plan and dtype")  # fmt: skip
    ap.add_argument(
        "--tuning",
        nargs="*",
        default=[],
        metavar="KEY=INT",
        help="override kernels.relation.TUNING entries (tile sizes) for this run",
    )
    args = ap.parse_args(argv)
    tuning = _apply_tuning(args.tuning)
    if args.compile_report:
        return _compile_report(args.out, argv)
    cuda = torch.cuda.is_available()
    batch = args.batch or (128 if cuda else 2)
    device = torch.cuda.get_device_name() if cuda else _cpu_name()
    if not cuda:
        print("No CUDA device: timing the eager PyTorch reference only, small batch (no Triton, no GPU numbers).")
    ceil = device_ceilings(cuda)
    impls = implementations(cuda, not args.no_compile)
    result = dict(
        date=datetime.date.today().isoformat(), command="python -m kernels.bench " + " ".join(argv or sys.argv[1:]),
        device=device, cuda=cuda, torch=torch.__version__, triton=_triton_version(), threads=torch.get_num_threads(),
        load_avg=os.getloadavg()[0], tuning=tuning,
        timing="do_bench quantiles" if cuda else f"quantiles of {CPU_RUNS} wall-clock runs after a warm-up",
        ceilings=ceil, flop_model="8*N'^2*d per (b, h), forward+backward", complete=False, rows=[],
    )  # fmt: skip
    for p in shapes(args.quick, cuda):
        result["rows"].append(bench_point(p, batch, DTYPES[args.dtype], cuda, impls, ceil))
        print(f"  done: {p['name']}", file=sys.stderr, flush=True)
        _write(args.out, result)  # partial results survive a time limit
    result["complete"] = True
    _write(args.out, result)
    rows = result["rows"]
    print(f"device: {device}  torch {torch.__version__}  triton {result['triton']}  {result['date']}")
    if cuda:
        print(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['bf16_tflops']:.0f} TFLOP/s")
    print(table(rows, list(impls)))
    return result


def _compile_report(out: str | None, argv: list[str] | None) -> dict:
    """``--compile-report``: the docs' table of :func:`kernels.aot.compile_report`, dated, with versions."""
    try:
        import triton

        from kernels import aot
    except ImportError:
        raise SystemExit("--compile-report needs triton") from None
    rows = aot.compile_report()
    cmd = "python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(date=datetime.date.today().isoformat(), command=cmd, triton=triton.__version__,
                  torch=torch.__version__, target="cuda sm_90 (Hopper), no GPU: triton.compile + cuobjdump",
                  rows=rows)  # fmt: skip
    _write(out, result)
    print(f"{result['date']}  triton {result['triton']}  torch {result['torch']}  {result['target']}  `{cmd}`")
    print(aot.report_table(rows))
    return result


def _write(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


def _apply_tuning(items: list[str]) -> dict | None:
    """Apply KEY=INT overrides to kernels.relation.TUNING; returns the table in use (None without Triton)."""
    try:
        from kernels import relation
    except ImportError:
        if items:
            raise SystemExit("--tuning needs triton") from None
        return None
    for item in items:
        key, _, value = item.partition("=")
        if key not in relation.TUNING or not value.isdigit():
            raise SystemExit(f"--tuning {item!r}: expected KEY=INT with KEY in {sorted(relation.TUNING)}")
        relation.TUNING[key] = int(value)
    return dict(relation.TUNING)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
