"""The pure-PyTorch reference (``kernels.reference``) and the dispatch/validation of ``kernels``.

The reference is the spec every other implementation is tested against, so it is checked here against an
independent float64 computation written with explicit loops over (b, h) and the smooth-L1 formula spelled
out, and its gradients with ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference

REPO = Path(__file__).resolve().parents[1]


def _inputs(b=2, h=3, n=11, m=5, d=8, d_t=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d_t = d_t or d
    keep_idx = torch.stack(
        [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=g)[: m - 1].sort().values + 1])
         for _ in range(b)]
    )  # fmt: skip
    q_s = torch.randn(b, h, m, d, generator=g, dtype=torch.float64).to(dtype)
    k_s = torch.randn(b, h, m, d, generator=g, dtype=torch.float64).to(dtype)
    q_t = torch.randn(b, h, n, d_t, generator=g, dtype=torch.float64).to(dtype)
    k_t = torch.randn(b, h, n, d_t, generator=g, dtype=torch.float64).to(dtype)
    return q_s, k_s, q_t, k_t, keep_idx


def _loop_gather(q_t, k_t, keep_idx, scale):
    """Independent teacher relation: explicit loops over batch, head and kept rows/columns."""
    b, h, _, _ = q_t.shape
    m = keep_idx.shape[1]
    out = torch.zeros(b, h, m, m, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i, ti in enumerate(keep_idx[bi].tolist()):
                for j, tj in enumerate(keep_idx[bi].tolist()):
                    out[bi, hi, i, j] = (q_t[bi, hi, ti].double() * k_t[bi, hi, tj].double()).sum() * scale
    return out


def _independent_loss(q_s, k_s, q_t, k_t, keep_idx, beta, scale):
    s = torch.einsum("bhid,bhjd->bhij", q_s.double(), k_s.double()) * scale
    x = s - _loop_gather(q_t, k_t, keep_idx, scale)
    elem = torch.where(x.abs() < beta, 0.5 * x * x / beta, x.abs() - 0.5 * beta) if beta > 0 else x.abs()
    return elem.sum() / elem.numel()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("m,n", [(1, 1), (1, 6), (5, 11), (11, 11)])
def test_reference_matches_independent_loops(beta, m, n):
    q_s, k_s, q_t, k_t, keep_idx = _inputs(m=m, n=n)
    got = reference.relation_loss(q_s, k_s, q_t, k_t, keep_idx, beta=beta)
    want = _independent_loss(q_s, k_s, q_t, k_t, keep_idx, beta, 1 / math.sqrt(8))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gather_relations_matches_loops():
    _, _, q_t, k_t, keep_idx = _inputs(n=9, m=4, d=5)
    got = reference.gather_relations(q_t, k_t, keep_idx)
    torch.testing.assert_close(got, _loop_gather(q_t, k_t, keep_idx, 5**-0.5), rtol=1e-12, atol=1e-12)
    got = kernels.gather_relations(q_t, k_t, keep_idx, scale=0.3, impl="torch")
    torch.testing.assert_close(got, _loop_gather(q_t, k_t, keep_idx, 0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_reference_gradcheck(beta):
    q_s, k_s, q_t, k_t, keep_idx = _inputs(b=1, h=2, n=7, m=4, d=3)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    f = lambda q, k: reference.relation_loss(q, k, q_t, k_t, keep_idx, beta=beta, scale=0.7)
    assert torch.autograd.gradcheck(f, (q_s, k_s))


def test_reference_fp32_math_and_detached_teacher():
    q_s, k_s, q_t, k_t, keep_idx = _inputs(dtype=torch.bfloat16)
    q_s.requires_grad_(True)
    q_t.requires_grad_(True)
    loss = reference.relation_loss(q_s, k_s, q_t, k_t, keep_idx)
    assert loss.dtype == torch.float32 and loss.shape == ()
    want = _independent_loss(q_s, k_s, q_t, k_t, keep_idx, 1.0, 1 / math.sqrt(8))  # same bf16 values, in fp64
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    loss.backward()
    assert q_s.grad.dtype == torch.bfloat16 and q_t.grad is None
    assert reference.gather_relations(q_t, k_t, keep_idx).dtype == torch.float32


def test_different_head_dims_need_explicit_scale():
    q_s, k_s, q_t, k_t, keep_idx = _inputs(d=6, d_t=10)
    with pytest.raises(ValueError, match="d_s=6, d_t=10"):
        reference.relation_loss(q_s, k_s, q_t, k_t, keep_idx)
    with pytest.raises(ValueError, match="d_s=6, d_t=10"):
        kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx)
    got = kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx, scale=1.0)
    torch.testing.assert_close(got, _independent_loss(q_s, k_s, q_t, k_t, keep_idx, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("HD_RELATION_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_auto_picks_by_device_and_dtype(no_env):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = (torch.bfloat16,) * 4
    assert kernels.resolve_impl("auto", cpu, bf16) == "torch"
    assert kernels.resolve_impl("auto", cuda, bf16) == ("triton" if kernels.HAS_TRITON else "torch")
    assert kernels.resolve_impl("auto", cuda, (torch.float64,) * 4) == "torch"  # kernels have no fp64
    assert (
        kernels.resolve_impl("auto", cuda, (torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)) == "torch"
    )
    assert kernels.resolve_impl("torch", cuda, bf16) == "torch"


def test_impl_argument_is_the_only_switch(no_env):
    """$HD_RELATION_IMPL no longer overrides the argument (it silently overrode loss.relation_impl)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    no_env.setenv("HD_RELATION_IMPL", "triton")
    assert kernels.resolve_impl("torch", cuda, (torch.bfloat16,) * 4) == "torch"
    assert kernels.resolve_impl("torch", cpu, (torch.float32,) * 4) == "torch"
    no_env.setenv("HD_RELATION_IMPL", "torch")
    assert kernels.resolve_impl("auto", cuda, (torch.bfloat16,) * 4) == ("triton" if kernels.HAS_TRITON else "torch")
    no_env.setenv("HD_RELATION_IMPL", "cuda")
    assert kernels.resolve_impl("auto", cpu) == "torch"  # nor is an invalid value an error


def test_import_warns_that_env_var_is_no_longer_read():
    code = "import warnings; warnings.simplefilter('always'); import kernels"
    env = dict(os.environ, HD_RELATION_IMPL="torch")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "HD_RELATION_IMPL is set but no longer read" in res.stderr


def test_impl_errors(no_env):
    inputs = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="impl='fast'"):
        kernels.relation_loss(*inputs, impl="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.relation_loss(*inputs, impl="triton")
    with pytest.raises(ValueError, match="one dtype per model"):
        kernels.resolve_impl("triton", torch.device("cuda"), (torch.float64,) * 4)
    torch.testing.assert_close(kernels.relation_loss(*inputs), reference.relation_loss(*inputs))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q_s=a["q_s"][0]), r"q_s must have shape \(B, H, N, d\), got \(3, 5, 8\)"),
        (lambda a: a.update(k_s=a["k_s"][:, :, :4]), r"q_s and k_s must have the same shape.*\(2, 3, 4, 8\)"),
        (lambda a: a.update(k_t=a["k_t"][:, :2]), r"q_t and k_t must have the same shape"),
        (lambda a: a.update(q_t=a["q_t"][:1], k_t=a["k_t"][:1]), r"must agree on batch and heads"),
        (lambda a: a.update(keep_idx=a["keep_idx"][:, :4]), r"keep_idx must have shape \(2, 5\).*got \(2, 4\)"),
        (lambda a: a.update(keep_idx=a["keep_idx"].float()), r"keep_idx must be an int32/int64 tensor"),
        (lambda a: a.update(keep_idx=a["keep_idx"] + 20), r"keep_idx values must lie in \[0, 11\)"),
        (lambda a: a.update(beta=-1.0), r"beta must be >= 0"),
        (lambda a: a.update(q_s=a["q_s"].long(), k_s=a["k_s"].long()), r"q_s must be a floating-point tensor"),
        (
            lambda a: a.update(**{k: a[k][:0] for k in ("q_s", "k_s", "q_t", "k_t", "keep_idx")}),
            r"q_s must have batch size B >= 1, got shape \(0, 3, 5, 8\)",
        ),
        (
            lambda a: a.update(**{k: a[k][:, :0] for k in ("q_s", "k_s", "q_t", "k_t")}),
            r"q_s must have head count H >= 1, got shape \(2, 0, 5, 8\)",
        ),
        (
            lambda a: a.update(q_t=a["q_t"][..., :0], k_t=a["k_t"][..., :0]),
            r"q_t must have head dim d >= 1, got shape \(2, 3, 11, 0\)",
        ),
    ],
)
def test_shape_errors_name_argument_and_shape(mutate, match):
    args = dict(zip(("q_s", "k_s", "q_t", "k_t", "keep_idx"), _inputs(), strict=True))
    args["beta"] = 1.0
    mutate(args)
    with pytest.raises(ValueError, match=match):
        kernels.relation_loss(**args)


def test_student_longer_than_teacher_is_an_error():
    q_s, k_s, q_t, k_t, _ = _inputs(n=4, m=4)
    with pytest.raises(ValueError, match="exceed teacher tokens N=3"):
        kernels.relation_loss(q_s, k_s, q_t[:, :, :3], k_t[:, :, :3], torch.zeros(2, 4, dtype=torch.long))


def test_gather_relations_errors():
    _, _, q_t, k_t, keep_idx = _inputs()
    with pytest.raises(ValueError, match=r"q_t must have batch size B >= 1, got shape \(0, 3, 11, 8\)"):
        kernels.gather_relations(q_t[:0], k_t[:0], keep_idx[:0])
    with pytest.raises(ValueError, match=r"keep_idx must have shape \(2, Nk\)"):
        kernels.gather_relations(q_t, k_t, keep_idx[:1])
    with pytest.raises(ValueError, match=r"q_t must have shape"):
        kernels.gather_relations(q_t[0], k_t, keep_idx)


def test_import_without_triton_falls_back_to_torch():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "q = torch.randn(1, 2, 3, 4); t = torch.randn(1, 2, 5, 4); keep = torch.tensor([[0, 2, 4]])\n"
        "print(float(kernels.relation_loss(q, q, t, t, keep)))\n"
        "try:\n    kernels.relation_loss(q, q, t, t, keep, impl='triton')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "triton is not installed" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the benchmark")
def test_bench_cpu_quick_runs_four_shapes(tmp_path, monkeypatch):
    """``python -m kernels.bench --quick`` is exactly four shapes, and without CUDA times the eager reference."""
    from kernels import bench

    names = ["ViT-B/16 224px keep 100%", "ViT-B/16 224px keep 34%", "ViT-L/16 224px keep 34%",
             "ViT-L/16 448px keep 34%"]  # fmt: skip
    assert [p["name"] for p in bench.shapes(True, True)] == names == [p["name"] for p in bench.shapes(True, False)]
    monkeypatch.setattr(bench, "CPU_RUNS", 3)
    result = bench.main(["--quick", "--batch", "1", "--no-compile", "--out", str(tmp_path / "bench.json")])
    assert result["complete"] and [r["name"] for r in result["rows"]] == names
    for row in result["rows"]:
        r = row["impls"]["eager"]
        assert list(row["impls"]) == ["eager"] and r["fwd_bwd_p20_ms"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_p80_ms"]
    assert "| ViT-L/16 448px keep 34% | 1 | 268 | eager |" in bench.table(result["rows"])
