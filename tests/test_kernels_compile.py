"""The relation kernels' exact launches compile for Hopper (sm_90) on a machine without a GPU, within its limits.

The interpreter accepts code the real compiler rejects (layouts, dot shapes, register/shared-memory limits).
``kernels.aot.compile_call`` compiles a launch exactly as Triton's JIT would on an sm_90 device: the
launcher builds the call from real (CPU) tensors of the training layout, and the JIT's own binder derives
the specialisation from them (unit strides become constants, divisibility-by-16 hints on pointers and
ints), so the shared memory and registers checked here are those of the launched binary. What is compiled
(``kernels.aot.compile_cover``): for every input kind (bf16, fp16, fp32 IEEE, fp32 TF32) and head-dim
chunking (d = 16, 32, 48, 64, 80, 96, 128), the gradient pass of every largest tile shape (the binaries
that run out of registers or shared memory first), and every pass kind with every input kind and every
chunking; plus L1, mixed student/teacher dtypes and head dims, int32 keep_idx, and the gather kernel for
every input kind. ``test_cover_contains_frontier_and_every_pass`` checks that against the full set of
plans (N' <= 1024). Asserts: <= 227 KiB of shared memory, no spills for bf16/fp16, wgmma for 64-row and
larger tiles, mma below, FMA for IEEE fp32, fp32 atomics only in the atomic pass. Compiled kernels land in
Triton's on-disk cache, so reruns take seconds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import aot, relation  # noqa: E402

COVER = aot.compile_cover()
GATHER = aot.gather_cover()


@pytest.fixture(scope="module")
def compiled(request) -> dict:
    """Resources of every selected problem's launches, compiled in parallel processes (once per module)."""
    wanted = [item.callspec.params["problem"] for item in request.session.items
              if getattr(item, "callspec", None) and "problem" in item.callspec.params]  # fmt: skip
    wanted = list(dict.fromkeys(wanted))
    return dict(zip(wanted, aot.compile_problems(wanted), strict=True))


def _check(res: dict, block_m: int, precision: str, dtypes: tuple[torch.dtype, ...]) -> None:
    assert res["shared"] <= aot.MAX_SHARED, f"needs {res['shared']} B of shared memory"
    if all(dt in (torch.float16, torch.bfloat16) for dt in dtypes):  # (fp32 IEEE FMA tiles do spill)
        assert res["stack"] == 0 and res["local"] == 0, f"spills: {res}"
    if precision == "ieee" and all(dt == torch.float32 for dt in dtypes):
        assert res["mma"] == "fma", res  # exact fp32 dots run on the FMA units
    elif precision != "ieee":  # (an fp32 student with a 16-bit teacher: FMA for S, tensor cores for T)
        assert res["mma"] == ("wgmma" if block_m >= 64 else "mma"), res


@pytest.mark.parametrize("problem", COVER, ids=lambda p: p.name())
def test_relation_launch_compiles_for_hopper(problem, compiled):
    results = compiled[problem]
    assert not isinstance(results, str), results
    plan = problem.plan()
    for res, (_, _, grad_b, _) in zip(results, plan.passes, strict=True):
        _check(res, plan.block_m, plan.precision, problem.dtypes)
        assert res["fp32_atomics"] == (grad_b == 1)  # only the default large-N' pass adds with atomics


@pytest.mark.parametrize("problem", GATHER, ids=lambda p: p.name())
def test_gather_launch_compiles_for_hopper(problem, compiled):
    results = compiled[problem]
    assert not isinstance(results, str), results
    call = problem.calls()[0]
    _check(results[0], call.kwargs["BLOCK_M"], call.kwargs["PRECISION"], aot.KINDS[problem.kind][:1])


@pytest.mark.parametrize("m,need_grad", [(65, True), (100, True), (128, True), (128, False)])
def test_tf32_head_dim_128_fits_shared_memory(m, need_grad):
    """fp32 inputs with allow_tf32, head dim 128, 65 <= N' <= 128 once planned 128-row tiles: 256 KiB of
    shared memory, more than sm_90's 227 KiB, so the launch failed."""
    p = aot.Problem("fp32-tf32", 128, 128, m, False, need_grad)
    for call in p.calls():
        res = aot.resources(aot.compile_call(call))
        assert res["shared"] <= aot.MAX_SHARED, (p.name(), res)


def test_compile_call_specialises_like_the_jit():
    """Unit strides become constants and 16-divisible pointers/ints get divisibility hints, as in a real launch."""
    call = aot.Problem("bf16", 80, 80, 197, False, True).calls()[0]
    src, _ = aot.specialise(call)
    assert src.signature["s_as_d"] == "constexpr" and src.signature["s_keep_n"] == "constexpr"
    names = relation._kernel(call.fn, False).arg_names
    hinted = {names[path[0]] for path, attr in src.attrs.items() if ["tt.divisibility", 16] in attr}
    assert {"a_s_ptr", "a_t_ptr", "grad_a_ptr", "s_as_n", "DS"} <= hinted
    assert "M" not in hinted  # N' = 197


def test_cover_contains_frontier_and_every_pass():
    """The compiled problems contain every resource-frontier binary and every (kind, pass) and (chunking, pass)
    pair of the full set of plans for N' <= 1024."""
    frontier, pass_keys = aot.required_keys()
    assert not frontier - aot.covered_binaries(COVER)
    assert not pass_keys - aot.covered_keys(COVER)
    assert len(aot.plan_keys()) > 2 * len(COVER)  # a cover, not the full set


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 32, 48, 64])
def test_no_atomics_up_to_256_kept_tokens(dtype, d):
    """bf16/fp16, d <= 64: every N' <= 256 (each 224-px shape, keep 100% included) is one launch in which one
    program owns all rows of a (b, h) and stores dk directly: no atomics, no fp32 buffer, deterministic."""
    for m in range(1, 257):
        for deterministic in (False, True):
            plan = relation.plan_relation(m, d, d, dtype, dtype, deterministic, True)
            assert plan.mode == "single" and plan.block_m >= m and plan.block_m <= 256, (m, plan)
    q = torch.zeros(2, 3, 197, d, dtype=dtype)
    _, calls, (_, dq, dk) = relation.relation_calls(q, q, q, q, torch.zeros(2, 197, dtype=torch.long), 1.0, 0.1,
                                                    False, True)  # fmt: skip
    assert len(calls) == 1 and calls[0].kwargs["GRAD_B"] == 2 and calls[0].kwargs["BLOCK_M"] == 256
    assert dq.dtype == dk.dtype == dtype  # the gradients themselves: no fp32 accumulator, no cast


def test_head_dims_split_into_two_chunks():
    assert [relation.split_dim(d) for d in (8, 16, 48, 64, 80, 88, 96, 112, 128)] == [
        (16, 0), (16, 0), (32, 16), (64, 0), (64, 16), (64, 32), (64, 32), (128, 0), (128, 0)
    ]  # fmt: skip
