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
  flash-attention does with P): relative 2^-11 = 4.9e-4 per element, and the final fp16 gradient is
  rounded once more (another 4.9e-4). Normalised by the largest element the two roundings stay below
  ~1e-3; 4e-3 is a 4x margin.
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
    monkeypatch.delenv(kernels.IMPL_ENV_VAR, raising=False)
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


# Covering design over N' in {1, 7, 16, 67, 130}, N in {N', 197, 300}, d in {16, 64, 80, 128},
# beta in {0.5, 1, 2}, fp32/fp16 and several B·H: every value appears, with each N' paired with several N, d
# and both dtypes; 130 > 128 exercises the multi-row-block (atomic / two-pass deterministic) kernels.
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


@pytest.mark.parametrize("m", [67, 130])
def test_deterministic_mode_is_bit_identical(m):
    inputs = make_inputs(2, 2, 197, m, 64, torch.float32, seed=11)
    runs = [run_loss(*inputs, torch.tensor(2.0), impl="triton", deterministic=True) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
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


def test_env_override_selects_triton_on_cpu(monkeypatch):
    inputs = make_inputs(1, 1, 20, 5, 16, torch.float32)
    monkeypatch.setenv(kernels.IMPL_ENV_VAR, "triton")
    calls = []
    orig = kernels._relation.relation_loss_triton
    monkeypatch.setattr(kernels._relation, "relation_loss_triton", lambda *a: calls.append(1) or orig(*a))
    kernels.relation_loss(*inputs, impl="torch")  # the environment variable wins over the argument
    assert calls == [1]
