"""GPU numerics of the compiled Triton kernels (bf16 included); skipped without CUDA.

Run by ``scripts/gpu_checks.sh`` on a GPU machine. Every result is compared with the reference evaluated in
float64 on the *same* rounded inputs. Errors are max|got - ref| / max|ref| per tensor. Tolerances:

* bf16 gradients 1.6e-2: S and T are exact-product fp32 sums (tensor cores accumulate in fp32), but the
  tile gradient G is rounded to bf16 before the G·k product (unit roundoff 2^-9 = 2e-3), the forward stores
  the bf16 gradient (2e-3) and the backward's product with grad_output rounds it again (2e-3); ~6e-3 worst
  case, 2.7x margin.
* fp16 gradients 4e-3 (unit roundoff 4.9e-4, same three roundings), fp32 (IEEE dots) 1e-5.
* the loss (fp32 accumulation of exact products) 1e-5 for every dtype; 1e-4 for bf16/fp16 where the
  wgmma accumulation order differs from the float64 sum (still ~100 eps of fp32).
"""

from __future__ import annotations

import pytest
import torch
from kernel_testlib import rel_err, run_loss

import kernels
from kernels import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton"),
]

TOL = {
    torch.bfloat16: dict(loss=1e-4, grad=1.6e-2),
    torch.float16: dict(loss=1e-4, grad=4e-3),
    torch.float32: dict(loss=1e-5, grad=1e-5),
}


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make_inputs(b, h, n, m, d, dtype, seed=0, d_t=None):
    g = torch.Generator().manual_seed(seed)
    d_t = d_t or d
    keep = [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=g)[: m - 1].sort().values + 1])
            for _ in range(b)]  # fmt: skip
    keep_idx = torch.stack(keep)
    q_t = torch.randn(b, h, n, d_t, generator=g)
    k_t = torch.randn(b, h, n, d_t, generator=g)
    q_s = q_t.gather(2, keep_idx[:, None, :, None].expand(b, h, m, d_t))[..., :d] * 0.8 + 0.5 * torch.randn(b, h, m, d)
    k_s = torch.randn(b, h, m, d, generator=g)
    return tuple(x.to("cuda", dtype) for x in (q_s, k_s, q_t, k_t)) + (keep_idx.cuda(),)


def ref64(q_s, k_s, q_t, k_t, keep_idx, grad_out, beta=1.0, scale=None):
    to64 = lambda t: t.detach().double()
    return run_loss(*(to64(x) for x in (q_s, k_s, q_t, k_t)), keep_idx, grad_out.double(), impl="torch", beta=beta,
                    scale=scale)  # fmt: skip


SHAPES = [  # (B, H, N, N', d, beta): odd sizes, the ViT-B/L shapes at 224/448 px and every kernel plan
    (2, 3, 1, 1, 16, 1.0),
    (3, 2, 197, 7, 80, 0.5),
    (4, 12, 197, 67, 64, 1.0),
    (2, 16, 197, 144, 64, 2.0),
    (2, 12, 197, 145, 48, 1.0),  # 256-row single block, 32 + 16 head-dim chunks
    (2, 16, 197, 197, 64, 1.0),
    (2, 16, 257, 197, 80, 1.0),  # ViT-H/14 teacher head dim: 64 + 16 chunks, multi-block
    (1, 4, 300, 130, 128, 1.0),
    (1, 4, 300, 257, 64, 1.0),
    (1, 16, 785, 267, 64, 1.0),
    (1, 4, 785, 785, 80, 0.5),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}-N{}-Nk{}-d{}-beta{}".format(*s))
def test_gpu_matches_float64_reference(shape, dtype, deterministic):
    b, h, n, m, d, beta = shape
    inputs = make_inputs(b, h, n, m, d, dtype, seed=m + d)
    grad_out = torch.tensor(-1.7, device="cuda")
    got = run_loss(*inputs, grad_out, beta=beta, impl="triton", deterministic=deterministic)
    ref = ref64(*inputs, grad_out, beta=beta)
    assert rel_err(got[0], ref[0]) < TOL[dtype]["loss"]
    for g, r, x in zip(got[1:], ref[1:], inputs[:2], strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert rel_err(g, r) < TOL[dtype]["grad"], rel_err(g, r)


@pytest.mark.parametrize("m", [67, 197])
def test_gpu_deterministic_is_bit_identical(m):
    inputs = make_inputs(8, 12, 197, m, 64, torch.bfloat16, seed=1)
    runs = [run_loss(*inputs, torch.tensor(1.0, device="cuda"), impl="triton", deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_gpu_mixed_dims_noncontiguous():
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(2, 4, 197, 67, 64, torch.bfloat16, d_t=80)
    q_s, k_s, q_t, k_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q_s, k_s, q_t, k_t))
    q_s, q_t = q_s * 0.125, q_t * 80**-0.5
    grad_out = torch.tensor(0.5, device="cuda")
    got = run_loss(q_s, k_s, q_t, k_t, keep_idx.int(), grad_out, scale=1.0, impl="triton")
    ref = ref64(q_s, k_s, q_t, k_t, keep_idx, grad_out, scale=1.0)
    assert rel_err(got[0], ref[0]) < 1e-4
    assert max(rel_err(g, r) for g, r in zip(got[1:], ref[1:], strict=True)) < 1.6e-2


def test_gpu_auto_dispatch_uses_triton(monkeypatch):
    calls = []
    orig = kernels._relation.relation_loss_triton
    monkeypatch.setattr(kernels._relation, "relation_loss_triton", lambda *a: calls.append(1) or orig(*a))
    kernels.relation_loss(*make_inputs(1, 2, 20, 5, 16, torch.bfloat16))
    assert calls == [1]


def test_gpu_gather_relations():
    _, _, q_t, k_t, keep_idx = make_inputs(2, 12, 197, 67, 80, torch.bfloat16)
    got = kernels.gather_relations(q_t, k_t, keep_idx)
    ref = reference.gather_relations(q_t.double(), k_t.double(), keep_idx)
    assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-5


def test_gpu_torch_compile_inductor():
    inputs = make_inputs(4, 12, 197, 67, 64, torch.bfloat16)

    def f(q_s, k_s, q_t, k_t, keep_idx):
        return 0.5 * kernels.relation_loss(q_s.float().to(q_s.dtype), k_s, q_t, k_t, keep_idx)

    compiled = torch.compile(f, fullgraph=True)
    q, k = (x.detach().clone().requires_grad_(True) for x in inputs[:2])
    loss = compiled(q, k, *inputs[2:])
    loss.backward()
    want = run_loss(*inputs, torch.tensor(0.5, device="cuda"), impl="triton", deterministic=True)
    torch.testing.assert_close(loss, 0.5 * want[0])
    torch.testing.assert_close(q.grad, want[1])
    torch.testing.assert_close(k.grad, want[2])


@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_no_relation_matrix_in_memory(deterministic):
    """Peak extra memory stays at the gradients' order, far below one fp32 (B, H, N', N') relation matrix."""
    b, h, n, m, d = 16, 16, 785, 785, 64  # relation matrix 631 MB; inputs 103 MB, gradients 51 MB (bf16)
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(b, h, n, m, d, torch.bfloat16)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx, deterministic=deterministic).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = 2 * q_s.numel() * q_s.element_size()
    relation = b * h * m * m * 4
    assert extra <= 2.2 * grads + (1 << 20), (extra, grads)  # dq, dk (+ an fp32 dk accumulator when atomic)
    assert extra < relation / 4


def test_gpu_single_block_extra_memory_within_10_percent():
    """N' <= 256 (bf16, d = 64): no fp32 dk buffer; beyond inputs and gradients only the (B·H,) partial losses."""
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(64, 12, 197, 197, 64, torch.bfloat16)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx).backward()
    torch.cuda.synchronize()
    grads = 2 * q_s.numel() * q_s.element_size()
    inputs = sum(x.numel() * x.element_size() for x in (q_s, k_s, q_t, k_t))
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra <= 0.1 * (inputs + grads), (extra, inputs, grads)


@pytest.mark.parametrize("grad_out", [1.0, -1.7])
def test_gpu_backward_scaling_kernel(grad_out):
    """bf16 in place (a no-op for grad_output exactly 1, decided on the device), fp16 with its 1/(B·H) factor, the
    atomic plan's fp32 dk cast."""
    for dtype, m in ((torch.bfloat16, 197), (torch.float16, 197), (torch.bfloat16, 300)):
        inputs = make_inputs(2, 8, 400, m, 64, dtype)
        g = torch.tensor(grad_out, device="cuda")
        got = run_loss(*inputs, g, impl="triton")
        ref = ref64(*inputs, g)
        for x, r in zip(got[1:], ref[1:], strict=True):
            assert x.dtype == dtype and rel_err(x, r) < TOL[dtype]["grad"]


def test_gpu_double_backward_raises():
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(2, 4, 197, 67, 64, torch.bfloat16)
    q = q_s.detach().clone().requires_grad_(True)
    (grad_q,) = torch.autograd.grad(kernels.relation_loss(q, k_s, q_t, k_t, keep_idx), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        (grad_q.float() * q.float()).sum().backward()
