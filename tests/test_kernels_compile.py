"""Every shipped kernel configuration compiles for Hopper (sm_90) on a machine without a GPU.

The interpreter accepts code the real compiler rejects (layouts, dot shapes, register/shared-memory limits),
so each constexpr combination the launchers use is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to PTX and cubin, and the PTX is
checked for tensor-core instructions on the dot path (wgmma for 64-row tiles, mma otherwise; IEEE fp32
dots use FMA). Compiled kernels land in Triton's on-disk cache, so reruns take seconds.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from kernels import relation  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB): more fails to launch
_TY = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FLOAT_ARGS = {"scale", "beta", "inv_beta", "inv_count"}


def _signature(fn, constexprs: dict, ptr_types: dict) -> dict:
    """Triton signature: pointers by name, fp32 scalars, i32 sizes/strides, constexprs marked."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def _compile(raw_fn, constexprs: dict, ptr_types: dict, num_warps: int):
    fn = triton.JITFunction(raw_fn)
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs, ptr_types), constexprs=constexprs)
    options = make_backend(TARGET).parse_options(dict(num_warps=num_warps, num_stages=relation.TUNING["num_stages"]))
    return triton.compile(src, target=TARGET, options=options.__dict__)


def _check_compiled(compiled, constexprs: dict, dtype: torch.dtype) -> None:
    ptx = compiled.asm["ptx"]
    assert "cubin" in compiled.asm  # ptxas accepted it
    assert compiled.metadata.shared <= H100_MAX_SHARED, f"needs {compiled.metadata.shared} B of shared memory"
    if dtype == torch.float32 and constexprs["PRECISION"] == "ieee":
        assert "fma.rn.f32" in ptx  # exact fp32 dots run on the FMA units
    elif constexprs["BLOCK_M"] >= 64:
        assert "wgmma" in ptx, "64-row tiles should use Hopper warpgroup MMA"
    else:
        assert "mma" in ptx, "dot path should use tensor-core MMA"


def _cfg_id(cfg: dict) -> str:
    c = cfg["constexprs"]
    flags = "".join(k[0] for k in ("COMPUTE_LOSS", "GRAD_A") if c.get(k)) + str(c.get("GRAD_B", ""))
    return f"{str(cfg['dtype'])[6:]}-d{cfg['d']}-m{c['BLOCK_M']}n{c['BLOCK_N']}-{flags}-{c['PRECISION']}"


@pytest.mark.parametrize("cfg", relation.relation_kernel_configs(), ids=_cfg_id)
def test_relation_kernel_compiles_for_hopper(cfg):
    dtype, c = cfg["dtype"], cfg["constexprs"]
    grad_ty = _TY[relation._grad_dtype(dtype)]
    ptr_types = dict(
        a_s_ptr=_TY[dtype], b_s_ptr=_TY[dtype], a_t_ptr=_TY[dtype], b_t_ptr=_TY[dtype], keep_ptr="*i64",
        grad_a_ptr=grad_ty, grad_b_ptr="*fp32" if c["GRAD_B"] == 1 else grad_ty, loss_ptr="*fp32",
    )  # fmt: skip
    compiled = _compile(relation.RELATION_KERNEL, c, ptr_types, cfg["num_warps"])
    _check_compiled(compiled, c, dtype)
    ptx = compiled.asm["ptx"]
    atomics = re.search(r"\b(atom|red)\.global", ptx) is not None
    assert atomics == (c["GRAD_B"] == 1)  # only the default large-N' pass uses atomics


@pytest.mark.parametrize("cfg", relation.gather_kernel_configs(), ids=_cfg_id)
def test_gather_kernel_compiles_for_hopper(cfg):
    dtype = cfg["dtype"]
    ptr_types = dict(q_ptr=_TY[dtype], k_ptr=_TY[dtype], keep_ptr="*i64", out_ptr="*fp32")
    compiled = _compile(relation.GATHER_KERNEL, cfg["constexprs"], ptr_types, cfg["num_warps"])
    _check_compiled(compiled, cfg["constexprs"], dtype)


@pytest.mark.parametrize("student,teacher", [("bf16", "fp16"), ("fp32", "bf16")])
def test_mixed_dtypes_head_dims_and_int32_keep_compile(student, teacher):
    """Student and teacher may differ in head dim (scale=1.0, pre-scaled q) and dtype; keep_idx may be int32."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    precision = relation._precision(dtypes[student], dtypes[teacher])
    plan = relation.plan_relation(67, 64, 80, False, True, precision)
    c = plan.constexprs(True, True, plan.passes[0][2], precision)
    grad = _TY[relation._grad_dtype(dtypes[student])]
    ptr_types = dict(
        a_s_ptr=f"*{student}", b_s_ptr=f"*{student}", a_t_ptr=f"*{teacher}", b_t_ptr=f"*{teacher}", keep_ptr="*i32",
        grad_a_ptr=grad, grad_b_ptr="*fp32" if c["GRAD_B"] == 1 else grad, loss_ptr="*fp32",
    )  # fmt: skip
    compiled = _compile(relation.RELATION_KERNEL, c, ptr_types, plan.num_warps)
    _check_compiled(compiled, c, dtypes[student])


def test_compiled_configs_cover_every_shipped_pass_and_tile():
    """Each constexpr set the launcher can produce shares its pass kind and its tile shape (per dtype and padded
    head dim) with a configuration compiled above."""
    covered = {key for cfg in relation.relation_kernel_configs() for key in relation._cover_keys(cfg)}
    for cfg in relation.all_relation_kernel_configs():
        missing = set(relation._cover_keys(cfg)) - covered
        assert not missing, (cfg, missing)
