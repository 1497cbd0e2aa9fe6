"""Numerics contract of the Triton relation kernels, run on CPU by the Triton interpreter.

``kernels.relation`` jits its kernels lazily at each call, compiled or interpreted according to
``TRITON_INTERPRET`` at that moment (Triton reads the flag when a kernel object is made), so the autouse
fixture below switches the interpreter on for this module whatever the rest of the suite imported
earlier. The interpreter has no bf16 ``tl.dot`` (it returns garbage), so inputs here are fp32 and fp16;
bf16 is covered by ``tests/test_kernels_gpu.py`` on a GPU.

Every result is compared with :func:`kernels.reference.relation_loss` evaluated in float64 on the *same*
(already rounded) inputs; the reference itself is checked against an independent loop/einsum computation
in ``tests/test_kernels_reference.py``. Errors are measured as max|got - ref| / max|ref| per tensor.
Tolerances:

* fp32 (1e-5): every product and sum is fp32 (eps 6e-8); S and T are sums of d <= 128 products, each
  relative error ~ sqrt(d)·eps ~ 1e-6, and the smooth-L1 gradient is 1-Lipschitz in S - T, so loss and
  gradients sit at ~1e-6 of their scale; 1e-5 leaves a 10x margin without hiding a real bug (a wrong
  mask or index gives O(1) errors).
* fp16 (loss 1e-5, gradients 4e-3): products of fp16 numbers are exact in fp32, so S, T and the loss are
  as good as in fp32. The gradient path rounds G to fp16 before the tensor-core product G·k (as
  flash-attention does with P): relative 2^-11 = 4.9e-4 per element; the forward stores the gradient in
  fp16 (normalised by 1/N', another 4.9e-4) and the backward's product with grad_output is rounded once
  more (4.9e-4). Normalised by the largest element the three roundings stay below ~1.5e-3 (measured
  3-8e-4); 4e-3 is a 3x margin.
* fp32 with TF32 allowed: the interpreter's dots are exact fp32 whatever the precision, so these cases
  check the TF32 plans' tiling and masks at the fp32 tolerance (TF32 rounding itself is a GPU matter).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_testlib import rel_err, run_loss  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

TOL = {torch.float32: dict(loss=1e-5, grad=1e-5), torch.float16: dict(loss=1e-5, grad=4e-3)}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """Run every kernel of this module on the CPU interpreter (read at call time by kernels.relation)."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels._relation.interpret_mode(), f"triton {triton.__version__} ignored TRITON_INTERPRET"


def make_inputs(b, h, n, m, d, dtype, seed=0, d_t=None, keep_dtype=torch.int64):
    """Random student (kept tokens) and teacher (all tokens) q/k, keep_idx sorted with CLS (0) first."""
    g = torch.Generator().manual_seed(seed)
    d_t = d_t or d
    keep = [torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1, generator=g)[: m - 1].sort().values + 1])
            for _ in range(b)]  # fmt: skip
    keep_idx = torch.stack(keep).to(keep_dtype)  # (B, N')
    q_t = torch.randn(b, h, n, d_t, generator=g).to(dtype)  # (B, H, N, d_t)
    k_t = torch.randn(b, h, n, d_t, generator=g).to(dtype)
    # Student relations near the teacher's (as after some training) so that both smooth-L1 branches occur.
    q_s = (q_t.float().gather(2, keep_idx.long()[:, None, :, None].expand(b, h, m, d_t))[..., :d] * 0.8
           + 0.5 * torch.randn(b, h, m, d, generator=g)).to(dtype)  # fmt: skip
    k_s = (torch.randn(b, h, m, d, generator=g)).to(dtype)
    return q_s, k_s, q_t, k_t, keep_idx


def reference64(q_s, k_s, q_t, k_t, keep_idx, grad_out, beta, scale):
    to64 = lambda t: t.detach().double()
    kw = dict(impl="torch", beta=beta, scale=scale)
    return run_loss(to64(q_s), to64(k_s), to64(q_t), to64(k_t), keep_idx, grad_out.double(), **kw)


# Covering design over N' in {1, 7, 16, 67, 129, 130, 145, 197, 256, 257}, N in {N', 197, 300},
# d in {16, 48, 64, 80, 96, 128}, beta in {0.5, 1, 2}, fp32/fp16 and several B·H. Plans: fp16 with d <= 64 runs
# one program per (b, h) up to N' = 256 (128 < N' <= 256: the 256-row tile, odd sizes 145 and 197), multi-block
# (atomic / two-pass deterministic) above; d > 64 (80 = 64 + 16, 96 = 64 + 32 chunks, 128) is single-block up to
# 128 rows (129, 130 go multi-block); IEEE fp32 single-block up to 32 rows.
CASES = [
    # (B, H, N, N', d, beta, dtype)
    (2, 3, 1, 1, 16, 1.0, torch.float32),
    (1, 2, 197, 1, 80, 0.5, torch.float16),
    (3, 1, 7, 7, 64, 2.0, torch.float16),
    (2, 2, 300, 7, 128, 1.0, torch.float32),
    (1, 4, 16, 16, 80, 1.0, torch.float32),
    (2, 2, 197, 16, 16, 0.5, torch.float16),
    (2, 3, 197, 67, 64, 1.0, torch.float32),
    (1, 2, 300, 67, 80, 2.0, torch.float16),
    (1, 1, 67, 67, 128, 0.5, torch.float32),
    (1, 2, 197, 130, 64, 2.0, torch.float32),
    (2, 1, 130, 130, 16, 1.0, torch.float16),
    (1, 1, 300, 130, 80, 0.5, torch.float32),
    (1, 1, 197, 130, 128, 1.0, torch.float16),
    (1, 2, 197, 129, 80, 1.0, torch.float16),
    (2, 1, 300, 145, 48, 0.5, torch.float16),
    (1, 2, 197, 197, 64, 1.0, torch.float16),
    (1, 1, 300, 197, 96, 2.0, torch.float16),
    (1, 1, 300, 256, 32, 2.0, torch.float16),
    (1, 1, 300, 257, 64, 1.0, torch.float16),
]


def _case_id(c):
    b, h, n, m, d, beta, dtype = c
    return f"B{b}H{h}-N{n}-Nk{m}-d{d}-beta{beta}-{str(dtype)[6:]}"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_relation_loss_matches_float64_reference(case, deterministic):
    b, h, n, m, d, beta, dtype = case
    inputs = make_inputs(b, h, n, m, d, dtype, seed=m * 1000 + d)
    grad_out = torch.tensor(-1.7)  # grad_output != 1 (and negative)
    got = run_loss(*inputs, grad_out, beta=beta, impl="triton", deterministic=deterministic)
    ref = reference64(*inputs, grad_out, beta, None)
    tol = TOL[dtype]
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert rel_err(got[0], ref[0]) < tol["loss"], (got[0], ref[0])
    for name, g, r, x in zip(("dq_s", "dk_s"), got[1:], ref[1:], inputs[:2], strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert rel_err(g, r) < tol["grad"], f"{name}: {rel_err(g, r):.2e}"


@pytest.mark.parametrize("beta,teacher_dtype", [(0.0, torch.float32), (1.0, torch.float16)])
def test_mixed_head_dims_noncontiguous_int32_keep(beta, teacher_dtype):
    """d_s != d_t with scale=1.0 (pre-scaled q), strided inputs (no copies), int32 keep_idx, beta=0 (L1), an fp16
    teacher with an fp32 student."""
    b, h, n, m = 2, 3, 50, 21
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(b, h, n, m, 48, torch.float32, seed=3, d_t=80, keep_dtype=torch.int32)
    q_t, k_t = q_t.to(teacher_dtype), k_t.to(teacher_dtype)
    # Lay student/teacher out as (B, N, H, d) memory viewed as (B, H, N, d), like a qkv projection output.
    q_s, k_s, q_t, k_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q_s, k_s, q_t, k_t))
    q_s, q_t = q_s * 48**-0.5, q_t * 80**-0.5
    assert not q_s.is_contiguous() and not k_t.is_contiguous()
    grad_out = torch.tensor(0.3)
    got = run_loss(q_s, k_s, q_t, k_t, keep_idx, grad_out, beta=beta, scale=1.0, impl="triton")
    ref = reference64(q_s, k_s, q_t, k_t, keep_idx.long(), grad_out, beta, 1.0)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("m,dtype", [(67, torch.float32), (130, torch.float32), (197, torch.float16),
                                     (300, torch.float16)])  # fmt: skip
def test_deterministic_mode_is_bit_identical(m, dtype):
    """Runs repeat bit for bit (the in-kernel loss reduction included); single-block plans (here N' <= 256 for
    fp16) are the same launch with or without deterministic=True."""
    inputs = make_inputs(2, 2, 400, m, 64, dtype, seed=11)
    runs = [run_loss(*inputs, torch.tensor(2.0), impl="triton", deterministic=True) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    plan = kernels._relation.plan_relation(m, 64, 64, dtype, dtype, False, True)
    if plan.mode == "single":
        default = run_loss(*inputs, torch.tensor(2.0), impl="triton")
        for a, b in zip(runs[0], default, strict=True):
            assert torch.equal(a, b)


def test_forward_only_and_teacher_gets_no_gradient():
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(1, 2, 197, 67, 64, torch.float32, seed=5)
    q_t.requires_grad_(True)
    with torch.no_grad():
        loss_nograd = kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx, impl="triton")
    loss = kernels.relation_loss(q_s.requires_grad_(True), k_s, q_t, k_t, keep_idx, impl="triton")
    loss.backward()
    assert torch.equal(loss_nograd, loss.detach())
    assert q_t.grad is None and k_s.grad is None and q_s.grad is not None


@pytest.mark.parametrize(
    "b,h,n,m,d,dtype",
    [(2, 3, 197, 67, 64, torch.float32), (1, 2, 300, 130, 80, torch.float16), (2, 1, 9, 1, 16, torch.float32)],
)
def test_gather_relations_matches_reference(b, h, n, m, d, dtype):
    _, _, q_t, k_t, keep_idx = make_inputs(b, h, n, m, d, dtype, seed=7)
    got = kernels.gather_relations(q_t, k_t, keep_idx, impl="triton")
    ref = reference.gather_relations(q_t.double(), k_t.double(), keep_idx)
    assert got.dtype == torch.float32 and got.shape == (b, h, m, m)
    assert rel_err(got, ref) < 1e-5  # fp16 products are exact in fp32: same bound as fp32


def test_torch_compile_traces_through_custom_op():
    """The custom op (fake impl + autograd) lets a compiled function with fullgraph=True trace through."""
    inputs = make_inputs(2, 2, 60, 20, 32, torch.float32, seed=9)

    def f(q_s, k_s, q_t, k_t, keep_idx):
        return 2.0 * kernels.relation_loss(q_s, k_s, q_t, k_t, keep_idx, impl="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = run_loss(*inputs, torch.tensor(1.0), impl="triton")
    q, k = (x.detach().clone().requires_grad_(True) for x in inputs[:2])
    loss = compiled(q, k, *inputs[2:])
    loss.backward()
    for a, b in zip((loss, q.grad, k.grad), got, strict=True):
        assert torch.allclose(a, 2 * b)


def test_env_var_does_not_override_impl(monkeypatch):
    """$HD_RELATION_IMPL used to override the impl argument (and so the trainer's loss.relation_impl)."""
    inputs = make_inputs(1, 1, 20, 5, 16, torch.float32)
    monkeypatch.setenv("HD_RELATION_IMPL", "triton")
    calls = []
    orig = kernels._relation.relation_loss_triton
    monkeypatch.setattr(kernels._relation, "relation_loss_triton", lambda *a: calls.append(1) or orig(*a))
    kernels.relation_loss(*inputs, impl="torch")
    assert calls == []
    kernels.relation_loss(*inputs, impl="triton")
    assert calls == [1]


@pytest.mark.parametrize("m,d", [(100, 64), (100, 128), (64, 80), (150, 64)])
def test_tf32_plans_match_float64_reference(monkeypatch, m, d):
    """fp32 inputs with allow_tf32: 128-row single block for d <= 64, 64 rows for wider heads (the 128-row tile
    of d = 128 needed 256 KiB of shared memory on sm_90), multi-block above."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    inputs = make_inputs(1, 2, 197, m, d, torch.float32, seed=m + d)
    grad_out = torch.tensor(-1.7)
    got = run_loss(*inputs, grad_out, impl="triton")
    ref = reference64(*inputs, grad_out, 1.0, None)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize(
    "m,student,teacher,d_s,d_t",
    [(197, torch.float16, torch.float16, 64, 80), (145, torch.float32, torch.float16, 64, 96),
     (40, torch.float16, torch.float32, 80, 64)],
)  # fmt: skip
def test_mixed_dtypes_and_head_dims_chain_into_one_accumulator(m, student, teacher, d_s, d_t):
    """[q_s, −q_t]·[k_s, k_t]ᵀ is two tl.dot calls into one fp32 accumulator, each in its operands' dtype and
    head-dim chunks; the student's and the teacher's may differ (single-block 256 rows, IEEE multi-block)."""
    q_s, k_s, _, _, keep_idx = make_inputs(2, 2, 260, m, d_s, student, seed=m)
    _, _, q_t, k_t, _ = make_inputs(2, 2, 260, m, d_t, teacher, seed=m)
    q_s, q_t = (q_s.float() * d_s**-0.5).to(student), (q_t.float() * d_t**-0.5).to(teacher)
    grad_out = torch.tensor(-1.7)
    got = run_loss(q_s, k_s, q_t, k_t, keep_idx, grad_out, scale=1.0, impl="triton")
    ref = reference64(q_s, k_s, q_t, k_t, keep_idx, grad_out, 1.0, 1.0)
    assert rel_err(got[0], ref[0]) < 1e-5
    for g, r in zip(got[1:], ref[1:], strict=True):
        assert rel_err(g, r) < TOL[student]["grad"]


@pytest.mark.parametrize("grad_out", [1.0, 0.0, 3.0])
@pytest.mark.parametrize("dtype,m", [(torch.float32, 20), (torch.float16, 150), (torch.float32, 70)])
def test_backward_scales_by_grad_output_on_device(dtype, m, grad_out):
    """One scaling kernel multiplies the saved gradients by grad_output (read on the device; in place, and a
    no-op for exactly 1, for bf16/fp32; fp16 also applies its 1/(B·H); the atomic plan's fp32 dk is cast)."""
    inputs = make_inputs(2, 2, 197, m, 64, dtype, seed=m)
    g = torch.tensor(grad_out)
    got = run_loss(*inputs, g, impl="triton")
    ref = reference64(*inputs, g, 1.0, None)
    for x, r in zip(got[1:], ref[1:], strict=True):
        assert x.dtype == dtype
        if grad_out == 0.0:
            assert not x.any()
        else:
            assert rel_err(x, r) < TOL[dtype]["grad"]


def test_double_backward_raises():
    """The gradient is precomputed by the forward, so second-order terms would be silently dropped."""
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(1, 2, 30, 9, 16, torch.float32)
    q = q_s.clone().requires_grad_(True)
    loss = kernels.relation_loss(q, k_s, q_t, k_t, keep_idx, impl="triton")
    (grad_q,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        (grad_q * q).sum().backward()  # a gradient penalty: d/dq of grad_q is needed


def test_create_graph_without_second_backward_works():
    q_s, k_s, q_t, k_t, keep_idx = make_inputs(1, 2, 30, 9, 16, torch.float32)
    q = q_s.clone().requires_grad_(True)
    (grad_q,) = torch.autograd.grad(kernels.relation_loss(q, k_s, q_t, k_t, keep_idx, impl="triton"), q,
                                    create_graph=True)  # fmt: skip
    (want,) = torch.autograd.grad(kernels.relation_loss(q, k_s, q_t, k_t, keep_idx, impl="torch"), q)
    assert rel_err(grad_q.detach(), want) < 1e-5
