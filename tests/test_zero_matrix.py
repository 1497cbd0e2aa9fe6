"""Every DeepSpeed setup the trainer accepts, end to end on CPU with the real engine (docs/checkpoints.md).

Cells: ZeRO stage 1, 2, 3 (+ CPU offload) x fp32 or bf16 (DeepSpeed's CPU accelerator runs bf16 when the JSON
enables it) x {train, resume on the same world size, resume on another world size, export}. A cell works when

* train: every weight moves, the losses are finite, and the weights the module computes with are the engine's fp32
  master weights (rounded to bf16 under bf16);
* resume: a fresh engine holds exactly the saved master weights and Adam moments, and its next step is the
  uninterrupted run's (same world size, or 2 -> 1 process through DeepSpeed's universal checkpoint: exactly, but
  for float rounding in DeepSpeedCPUAdam under offload);
* export: the timm weights equal the fp32 master weights the engine held when it saved (``torch.equal``).

ZeRO stage 0 is refused before training (``resolve_ds_config``); an old stage-0 checkpoint is refused by export
and resume with a message.

Cost: one 2-process run trains, saves and resumes every cell on the same world size, one 1-process run resumes
every cell from the universal conversion, the exports run in this process, one ``launch.py`` run shows the
stage-0 refusal as a user meets it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from ds_testlib import REPO, run_ranks, tiny_config
from test_train_e2e import launch

from hybrid_distill.config import ConfigError
from hybrid_distill.export import ExportError, export_student, main
from hybrid_distill.runtime import checkpoint as ck
from hybrid_distill.runtime.engine import resolve_ds_config
from hybrid_distill.runtime.resume import check_resume

BF16 = {"bf16": {"enabled": True}}
# The tiny student's tensors are all below zero3.json's persistence threshold (kept whole on every rank);
# partition every one of them, as a ViT-L's are.
PARTITIONED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
CELLS = {
    "zero1": ("zero1.json", {}),
    "zero2": ("zero2.json", {}),
    "zero2_offload": ("zero2.json", {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
    "zero3": ("zero3.json", PARTITIONED),
    "zero3_offload": ("zero3_offload.json", PARTITIONED),
    "zero1_bf16": ("zero1.json", BF16),
    "zero1_bf16_fp32_accum": ("zero1.json", {**BF16, "data_types": {"grad_accum_dtype": "fp32"}}),  # BF16_Optimizer
    "zero2_bf16": ("zero2.json", BF16),
    "zero3_bf16": ("zero3.json", {**BF16, **PARTITIONED}),
    "zero3_offload_bf16": ("zero3_offload.json", {**BF16, **PARTITIONED}),
}
STAGE0 = "zero0_legacy"  # a stage-0 checkpoint as the trainer wrote them before stage 0 was refused
TAG = ck.tag_name(2)
GLOBAL_BATCH = 4  # micro-batch 2: 2 processes x 1, or 1 process x 2 accumulated


# ---------------------------------------------------------------------------------------------------------------
# helpers that run inside the DeepSpeed processes


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _ds_config(run_dir: Path, cell: str, world_size: int, universal: bool = False) -> tuple:
    """The cell's DeepSpeed JSON written as a user would, resolved by the trainer's ``resolve_ds_config``."""
    base, over = CELLS[cell]
    path = run_dir / f"ds_{cell}.json"
    # every rank writes the same file: atomically, or one rank reads it half-written by the other, fails its cell
    # alone and the ranks' collectives fall out of step (a hang or a reset connection)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_merge(json.loads((REPO / "ds_configs" / base).read_text()), over)))
    os.replace(tmp, path)
    cfg = tiny_config(batch_size=2, global_batch_size=GLOBAL_BATCH)
    ds = resolve_ds_config(path, cfg, world_size, "cpu")
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    return cfg, ds


def _engine(cfg, ds: dict, seed: int):
    """The trainer's engine around the configured student (what export rebuilds) and a head."""
    from torch import nn

    from hybrid_distill.model.student import build_student
    from hybrid_distill.runtime.engine import build_engine

    class Trainable(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = build_student(cfg.student)
            self.head = nn.Linear(cfg.student.embed_dim, 24)

        def forward(self, x):
            return self.head(self.student.forward_features(x.to(self.head.weight.dtype)))

    torch.manual_seed(seed)
    return build_engine(Trainable(), cfg, ds)


def _micro_batch(engine, seed: int, rank: int) -> float:
    size = 64  # tiny preset: student.img_size
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed * 1000 + rank))
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _step(engine, seed: int) -> list[float]:
    """One optimizer step on the global batch of ``seed``: each rank its micro-batch, or one process all of them."""
    world = engine.dp_world_size
    ranks = [engine.global_rank] if world > 1 else list(range(GLOBAL_BATCH // 2))
    return [_micro_batch(engine, seed, rank) for rank in ranks]


def _masters(engine) -> dict:
    """fp32 master weights of every parameter, gathered (collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}


def _full_state(engine) -> dict:
    """fp32 master weights and Adam moments of every parameter, gathered (collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    # DeepSpeed 0.19.8 ZeRO-1/2 links the optimizer-state views after the first param group's first step only;
    # relink them so safe_get_full_optimizer_state works for the no-decay group (as in test_checkpoint.py).
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = _masters(engine)
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}:{key}"] = safe_get_full_optimizer_state(p, key).clone()
    return state


def _module_weights(engine) -> dict:
    """The weights the module computes with (gathered under ZeRO-3), in its own dtype."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _adam_steps(engine) -> list[int]:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({int(s["step"]) for s in base.state.values() if "step" in s})


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _each_cell(func, tmp: str, cells: list[str]) -> dict:
    """``func(run_dir, cell)`` per cell; a failing cell reports its traceback instead of ending the others."""
    results = {}
    for cell in cells:
        try:
            results[cell] = func(Path(tmp) / cell, cell)
        except Exception:  # reported by the cell's own tests (and here: a rank left in a collective hangs)
            results[cell] = {"error": traceback.format_exc()[-4000:]}
            print(f"{cell}: {results[cell]['error']}", file=sys.stderr, flush=True)
    return results


def _train_save_resume(run_dir: Path, cell: str) -> dict:
    """Train 2 steps on 2 processes, save, record the reference; resume a fresh engine from it on 2 processes."""
    from hybrid_distill.config import to_dict

    run_dir.mkdir(exist_ok=True)
    cfg, ds = _ds_config(run_dir, cell, world_size=2)
    engine = _engine(cfg, ds, seed=0)
    start = _masters(engine)
    losses = _step(engine, seed=1) + _step(engine, seed=2)
    tag_dir = ck.save(engine, run_dir / "checkpoints", 2, {"step": 2, "config": to_dict(cfg)}, keep_last=2)
    saved, module, steps = _full_state(engine), _module_weights(engine), _adam_steps(engine)
    masters = {n: saved[n] for n in module}
    _step(engine, seed=7)  # the uninterrupted run's next step: the reference for every resume
    after = _full_state(engine)
    if engine.global_rank == 0:
        torch.save({"saved": saved, "after": after, "steps": steps}, run_dir / "reference.pt")

    fresh = _engine(cfg, ds, seed=5)  # other initial weights: everything must come from the checkpoint
    client = ck.load(fresh, tag_dir)
    loaded, loaded_steps = _full_state(fresh), _adam_steps(fresh)
    _step(fresh, seed=7)
    return dict(
        optimizer=type(engine.optimizer).__name__, bf16=bool(ds["bf16"]["enabled"]), losses=losses,
        unmoved=[n for n in masters if torch.equal(start[n], masters[n])],
        module_not_master=[n for n in module if not torch.equal(module[n], masters[n].to(module[n].dtype))],
        module_dtype=str(next(iter(module.values())).dtype), steps=steps, loaded_steps=loaded_steps,
        loaded_diff=_max_diff(saved, loaded), resumed_diff=_max_diff(after, _full_state(fresh)),
        client_step=client.get("step"), marker={k: ck.read_marker(tag_dir)[k] for k in ("zero_stage", "world_size")})


def _save_stage0(run_dir: Path) -> None:
    """A stage-0 checkpoint, written the way the trainer did before it refused stage 0 (bypasses the check)."""
    from hybrid_distill.config import to_dict

    run_dir.mkdir(exist_ok=True)
    cfg = tiny_config(batch_size=2, global_batch_size=GLOBAL_BATCH)
    ds = dict(train_batch_size=GLOBAL_BATCH, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
              gradient_clipping=3.0, bf16={"enabled": False}, zero_optimization={"stage": 0})
    engine = _engine(cfg, ds, seed=0)
    _step(engine, seed=1)
    ck.save(engine, run_dir / "checkpoints", 2, {"step": 2, "config": to_dict(cfg)}, keep_last=2)


def _scenario_two_processes(tmp: str, cells: list[str]) -> dict:
    results = _each_cell(_train_save_resume, tmp, cells)
    _save_stage0(Path(tmp) / STAGE0)
    return results


def _resume_on_one(run_dir: Path, cell: str) -> dict:
    """Resume the 2-process checkpoint on 1 process through the universal conversion; take the next step."""
    tag_dir = run_dir / "checkpoints" / TAG
    needs = ck.needs_universal(tag_dir)
    source = ck.ensure_universal(tag_dir)
    cfg, ds = _ds_config(run_dir, cell, world_size=1, universal=True)
    engine = _engine(cfg, ds, seed=3)
    client = ck.load(engine, tag_dir, load_universal=True)
    ref = torch.load(run_dir / "reference.pt", weights_only=True)
    loaded, loaded_steps = _full_state(engine), _adam_steps(engine)
    _step(engine, seed=7)  # the 2-process step's two micro-batches, accumulated
    after = _full_state(engine)
    worst = max(ref["after"], key=lambda k: (ref["after"][k].float() - after[k].float()).abs().max().item())
    return dict(needs=needs, source=source.name, loaded_diff=_max_diff(ref["saved"], loaded),
                loaded_steps=loaded_steps, ref_steps=ref["steps"], steps_after=_adam_steps(engine),
                after_diff=_max_diff(ref["after"], after), worst=worst, client_step=client.get("step"))


def _scenario_one_process(tmp: str, cells: list[str]) -> dict:
    return _each_cell(_resume_on_one, tmp, cells)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: one run per world size for all cells


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zero_matrix")


@pytest.fixture(scope="module")
def trained(matrix_dir) -> dict:
    return run_ranks(_scenario_two_processes, world_size=2, timeout=900, tmp=str(matrix_dir), cells=list(CELLS))[0]


@pytest.fixture(scope="module")
def resumed_on_one(matrix_dir, trained) -> dict:
    cells = [c for c in CELLS if "error" not in trained[c]]
    return run_ranks(_scenario_one_process, timeout=900, tmp=str(matrix_dir), cells=cells)[0]


def _cell(results: dict, cell: str) -> dict:
    assert cell in results, f"{cell}: not run (its training failed)"
    assert "error" not in results[cell], results[cell].get("error")
    return results[cell]


# ---------------------------------------------------------------------------------------------------------------
# the cells that work


@pytest.mark.parametrize("cell", CELLS)
def test_trains_with_the_engines_fp32_master_weights(trained, cell):
    r = _cell(trained, cell)
    bf16 = "bf16" in cell
    assert r["bf16"] is bf16 and r["module_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    assert r["marker"]["zero_stage"] == int(cell[4]) and r["marker"]["world_size"] == 2
    if cell == "zero1_bf16_fp32_accum":
        assert r["optimizer"] == "BF16_Optimizer"  # DeepSpeed's other optimizer path at stage 1
    assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 2
    assert r["unmoved"] == []
    assert r["module_not_master"] == []  # the module computes with the master weights (rounded to its dtype)
    assert r["steps"] == [2]


@pytest.mark.parametrize("cell", CELLS)
def test_resume_on_the_same_world_size_continues_exactly(trained, cell):
    r = _cell(trained, cell)
    assert r["loaded_diff"] == 0.0  # master weights and both Adam moments
    assert r["loaded_steps"] == [2] and r["client_step"] == 2
    assert r["resumed_diff"] == 0.0  # the next step is bit-identical to the uninterrupted one


# The 2 -> 1 step: 2 ranks all-reduce their two micro-batch gradients, 1 process accumulates the same two; a sum of
# two floats does not depend on the order, so the step is exact. DeepSpeedCPUAdam (offload) updates a partition in
# SIMD blocks plus a scalar tail, and the partition boundaries move with the world size: float rounding there.
AFTER_TOLERANCE = {"offload": 1e-8, "on_device": 0.0}


@pytest.mark.parametrize("cell", CELLS)
def test_resume_on_another_world_size_through_the_universal_checkpoint(resumed_on_one, cell):
    r = _cell(resumed_on_one, cell)
    assert r["needs"] and r["source"] == f"{TAG}_universal"
    assert r["loaded_diff"] == 0.0  # master weights and both Adam moments, merged from 2 shards
    assert r["loaded_steps"] == r["ref_steps"] == [2] and r["steps_after"] == [3] and r["client_step"] == 2
    tolerance = AFTER_TOLERANCE["offload" if "offload" in cell else "on_device"]
    assert r["after_diff"] <= tolerance, (r["after_diff"], r["worst"])


@pytest.mark.parametrize("cell", CELLS)
def test_export_equals_the_fp32_master_weights(trained, matrix_dir, tmp_path, monkeypatch, cell):
    """Also without the universal conversion the 1-process resume leaves beside the checkpoint (BF16_Optimizer
    checkpoints are read through one: export then makes its own in a temporary directory and removes it)."""
    from safetensors.torch import load_file

    _cell(trained, cell)
    run_dir = matrix_dir / cell
    saved = torch.load(run_dir / "reference.pt", weights_only=True)["saved"]
    master = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.") and ":" not in k}
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    exports = [load_file(export_student(run_dir, tmp_path / "export"))]
    universal = ck.universal_dir(run_dir / "checkpoints" / TAG)
    if universal.exists():
        shutil.rmtree(universal)
        exports.append(load_file(export_student(run_dir, tmp_path / "export_without_universal")))
    for exported in exports:
        assert exported.keys() == master.keys()
        unequal = [k for k in master if exported[k].dtype != torch.float32 or not torch.equal(exported[k], master[k])]
        assert unequal == []
    assert list((tmp_path / "tmp").glob("hybrid_distill_export_*")) == []  # no temporary conversion left behind


# ---------------------------------------------------------------------------------------------------------------
# stage 0: refused before training; its old checkpoints are refused with a message


def _write_ds(tmp_path: Path, zero) -> Path:
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    if zero is None:
        del ds["zero_optimization"]
    else:
        ds["zero_optimization"] = zero
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize("zero, needle", [
    ({"stage": 0}, r"ds\.json sets ZeRO stage 0, which is not supported: .*exported .*another world size"),
    ({"overlap_comm": True}, r"ds\.json sets ZeRO stage 0"),
    (None, r"ds\.json has no \"zero_optimization\" section, so DeepSpeed would run ZeRO stage 0"),
    ({"stage": 4}, r"zero_optimization\.stage=4 is not a ZeRO stage"),
    ({"stage": "2"}, r"zero_optimization\.stage=\"2\" is not a ZeRO stage.*JSON integer"),
    ({"stage": True}, r"zero_optimization\.stage=true is not a ZeRO stage"),
], ids=["stage_0", "no_stage_key", "no_section", "stage_4", "string", "bool"])
def test_resolve_ds_config_refuses_stage_0_and_non_stages(tmp_path, zero, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        resolve_ds_config(_write_ds(tmp_path, zero), tiny_config(), 1, "cpu")
    if "stage 0" in needle:
        assert "ds_configs/zero1.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resolve_ds_config_accepts_stages_1_2_3(tmp_path, stage):
    ds = resolve_ds_config(_write_ds(tmp_path, {"stage": stage}), tiny_config(), 1, "cpu")
    assert ds["zero_optimization"]["stage"] == stage


@pytest.mark.slow
def test_launch_with_stage_0_exits_2_before_training(tmp_path):
    """The issue's command: it used to train to the end and crash in the export (exit 1)."""
    out = tmp_path / "z0"
    result = launch(out, "--preset", "tiny", "run.max_steps=2", ds=_write_ds(tmp_path, {"stage": 0}))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ZeRO stage 0, which is not supported" in result.stderr and "ds_configs/zero1.json" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_export_refuses_a_stage_0_checkpoint_naming_where_its_weights_are(trained, matrix_dir, tmp_path, capsys):
    tag_dir = matrix_dir / STAGE0 / "checkpoints" / TAG
    assert ck.read_marker(tag_dir)["zero_stage"] == 0
    with pytest.raises(ExportError, match=r"saved without ZeRO \(stage 0\).*'module' entry of mp_rank_00"):
        export_student(tag_dir, tmp_path / "export")
    assert main([str(tag_dir), "--out", str(tmp_path / "export")]) == 2
    assert "stage 0" in capsys.readouterr().err


def test_resume_refuses_a_stage_0_checkpoint_without_pointing_to_a_stage_0_config(trained, matrix_dir, tmp_path):
    tag_dir = matrix_dir / STAGE0 / "checkpoints" / TAG
    ds = resolve_ds_config(REPO / "ds_configs" / "zero2.json", tiny_config(), 1, "cpu")
    with pytest.raises(ConfigError, match=r"saved without ZeRO \(stage 0\).*another --output-dir") as err:
        check_resume(tiny_config(), ds, tag_dir, on_purpose=True)
    assert "ds_configs/zero0" not in str(err.value)
