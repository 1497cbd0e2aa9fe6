"""runtime.checkpoint: markers, discovery, pruning, resume resolution, real DeepSpeed save/load, 2 -> 1."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ds_testlib import REPO, run_ranks, tiny_config, tiny_trainable, train_steps

from hybrid_distill.runtime import checkpoint as ck


def _fake(ckpt_dir: Path, step: int, complete: bool = True, world_size: int = 1) -> Path:
    tag_dir = ckpt_dir / ck.tag_name(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        ck.write_marker(tag_dir, {"step": step, "world_size": world_size})
    return tag_dir


# ---------------------------------------------------------------------------------------------------------------
# names, markers, discovery (no DeepSpeed)


def test_tag_names_and_marker(tmp_path):
    assert ck.tag_name(120) == "step_00000120"
    assert ck.tag_step(tmp_path / "step_00000120") == 120
    assert ck.tag_step("step_00000120_universal") is None and ck.tag_step("latest") is None
    tag_dir = _fake(tmp_path, 5)
    assert ck.read_marker(tag_dir) == {"step": 5, "world_size": 1}
    assert {p.name for p in tag_dir.iterdir()} == {"mp_rank_00_model_states.pt", "COMPLETE"}  # no temp file left
    (tag_dir / "COMPLETE").write_text("{trunc")  # a torn marker counts as incomplete
    assert ck.read_marker(tag_dir) is None


def test_find_latest_never_picks_incomplete(tmp_path):
    assert ck.find_latest(tmp_path / "missing") is None
    _fake(tmp_path, 10)
    newest = _fake(tmp_path, 20)
    _fake(tmp_path, 30, complete=False)  # half-written save
    (tmp_path / "step_00000040_universal").mkdir()
    (tmp_path / "latest").write_text("step_00000030")  # DeepSpeed's pointer is ignored
    assert ck.find_latest(tmp_path) == newest
    assert ck.find_latest(tmp_path / "step_00000030") is None


def test_prune_keeps_newest_complete_and_removes_stale(tmp_path):
    for step in (10, 20, 30, 40):
        _fake(tmp_path, step)
    _fake(tmp_path, 15, complete=False)  # interrupted, older than the newest complete: stale
    _fake(tmp_path, 50, complete=False)  # newer than every complete one: left alone
    (tmp_path / "step_00000010_universal").mkdir()  # its source goes away: orphan
    (tmp_path / "step_00000040_universal").mkdir()  # source kept: kept
    removed = ck.prune(tmp_path, keep_last=2, protect=tmp_path / "step_00000020")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step_00000020", "step_00000030", "step_00000040", "step_00000040_universal", "step_00000050"]
    assert {p.name for p in removed} == {"step_00000010", "step_00000015", "step_00000010_universal"}
    ck.prune(tmp_path, keep_last=2)
    assert ck.find_latest(tmp_path).name == "step_00000040"
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]


def test_resolve_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert ck.resolve_resume("none", run_dir) is None
    assert ck.resolve_resume("auto", run_dir) is None  # fresh run
    _fake(run_dir / "checkpoints", 4)
    latest = _fake(run_dir / "checkpoints", 8)
    partial = _fake(run_dir / "checkpoints", 12, complete=False)
    assert ck.resolve_resume("auto", run_dir) == latest
    assert ck.resolve_resume(str(run_dir), tmp_path / "other") == latest  # a run dir
    assert ck.resolve_resume(str(run_dir / "checkpoints"), tmp_path / "other") == latest
    older = run_dir / "checkpoints" / "step_00000004"
    assert ck.resolve_resume(str(older), run_dir) == older
    with pytest.raises(ck.CheckpointError, match="step_00000012.*incomplete"):
        ck.resolve_resume(str(partial), run_dir)
    with pytest.raises(ck.CheckpointError, match="nowhere.*does not exist"):
        ck.resolve_resume(str(tmp_path / "nowhere"), run_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint.*empty"):
        ck.resolve_resume(str(tmp_path / "empty"), run_dir)


def test_needs_universal_reads_marker(tmp_path):
    tag_dir = _fake(tmp_path, 1, world_size=2)
    assert ck.needs_universal(tag_dir, world_size=1) and not ck.needs_universal(tag_dir, world_size=2)
    assert ck.ensure_universal(tag_dir, world_size=2) == tag_dir  # same world size: nothing to convert
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.needs_universal(_fake(tmp_path, 2, complete=False))


def test_rng_state_round_trip():
    state = ck.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    ck.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert ck.restore_rng_states({"rng_states": [state]}) is True  # no process group: world size 1
    assert ck.restore_rng_states({"rng_states": [state, state]}) is False
    assert ck.restore_rng_states({}) is False


# ---------------------------------------------------------------------------------------------------------------
# real DeepSpeed (fresh processes)


def _build(stage: int, world_size: int, global_batch: int = 4, seed: int = 0, universal: bool = False):
    from hybrid_distill.runtime.engine import build_engine, resolve_ds_config

    cfg = tiny_config(batch_size=2, global_batch_size=global_batch)
    ds = resolve_ds_config(REPO / "ds_configs" / f"zero{stage}.json", cfg, world_size, "cpu")
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    return build_engine(tiny_trainable(seed=seed), cfg, ds)


def _full_state(engine) -> dict:
    """fp32 master weights and AdamW moments of every parameter (collective: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # DeepSpeed 0.19.8 ZeRO-1/2 links the optimizer-state views after the *first* param group's first step, so
    # safe_get_full_optimizer_state fails for parameters of later groups (our no-decay group); relink them.
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {}
    for name, p in engine.module.named_parameters():
        state[name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{name}:{key}"] = safe_get_full_optimizer_state(p, key).clone()
    return state


def _adam_steps(engine) -> list[int]:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted({int(s["step"]) for s in base.state.values() if "step" in s})


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _worst(a: dict, b: dict) -> list:
    """The keys that differ most, with the reference's scale, for failure messages."""
    rows = sorted(((a[k] - b[k]).abs().max().item(), k, a[k].abs().max().item()) for k in a)
    return rows[-3:]


def _scenario_round_trip(tmp: str, stage: int) -> dict:
    ckpt_dir = Path(tmp) / "checkpoints"
    engine = _build(stage=stage, world_size=1, global_batch=2)
    for step in (1, 2, 3):
        train_steps(engine, 1, seed=step)
        tag_dir = ck.save(engine, ckpt_dir, step, {"step": step, "data": {"position": 7 * step}}, keep_last=2)
    expected_rng = (torch.rand(2), random.random(), np.random.rand())  # drawn from the state saved at step 3
    saved, steps = _full_state(engine), _adam_steps(engine)
    continued = train_steps(engine, 2, seed=9)

    torch.manual_seed(999)  # different RNG and different initial weights in the new engine
    fresh = _build(stage=stage, world_size=1, global_batch=2, seed=5)
    client_state = ck.load(fresh, ck.find_latest(ckpt_dir), load_universal=False)
    restored_rng = ck.restore_rng_states(client_state)
    rng_ok = torch.equal(expected_rng[0], torch.rand(2)) and expected_rng[1:] == (random.random(), np.random.rand())
    return dict(
        tag=tag_dir.name, kept=sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()),
        marker=ck.read_marker(tag_dir), state_diff=_max_diff(saved, _full_state(fresh)),
        steps=steps, restored_steps=_adam_steps(fresh), client={k: client_state[k] for k in ("step", "data")},
        restored_rng=restored_rng, rng_ok=rng_ok,
        continued=continued, resumed=train_steps(fresh, 2, seed=9))


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_save_load_round_trip(tmp_path, stage):
    r = run_ranks(_scenario_round_trip, tmp=str(tmp_path), stage=stage)[0]
    assert r["tag"] == "step_00000003"
    assert r["kept"] == ["step_00000002", "step_00000003"]  # keep_last=2, no DeepSpeed 'latest' needed
    assert r["marker"]["step"] == 3 and r["marker"]["world_size"] == 1 and r["marker"]["zero_stage"] == stage
    assert r["state_diff"] == 0.0  # fp32 weights, exp_avg, exp_avg_sq bit-identical
    assert r["steps"] == r["restored_steps"] == [3]  # AdamW step count
    assert r["client"] == {"step": 3, "data": {"position": 21}}
    assert r["restored_rng"] and r["rng_ok"]
    assert r["resumed"] == r["continued"]  # the next two steps are bit-identical


def _scenario_save_two(tmp: str, stage: int) -> dict:
    engine = _build(stage=stage, world_size=2)  # micro 2 x 2 ranks = global 4, no accumulation
    train_steps(engine, 2)
    tag_dir = ck.save(engine, Path(tmp) / "checkpoints", 2, {"step": 2, "note": "two"}, keep_last=3)
    state, steps = _full_state(engine), _adam_steps(engine)
    train_steps(engine, 1, seed=7)  # one more step on 2 ranks: the reference for the 1-process resume
    after = _full_state(engine)
    if engine.global_rank == 0:
        torch.save({"state": state, "after": after, "steps": steps}, Path(tmp) / "reference.pt")
    return {"tag_dir": str(tag_dir)}


def _scenario_resume_one(tmp: str, stage: int, tag_dir: str) -> dict:
    import torch.distributed as dist

    tag_dir = Path(tag_dir)
    ref = torch.load(Path(tmp) / "reference.pt", weights_only=False)
    needs = ck.needs_universal(tag_dir)
    source = ck.ensure_universal(tag_dir)
    engine = _build(stage=stage, world_size=1, seed=3, universal=True)  # micro 2 x accumulation 2 = global 4
    client_state = ck.load(engine, tag_dir, load_universal=True)
    diff = _max_diff(ref["state"], _full_state(engine))
    steps = _adam_steps(engine)
    for rank in (0, 1):  # the 2-process step's two micro-batches, accumulated on one process
        g = torch.Generator().manual_seed(7 * 1000 + rank)
        loss = engine(torch.randn(2, 3, 32, 32, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    after = _full_state(engine)
    return dict(needs=needs, source=source.name, world=dist.get_world_size(),
                source_marker=ck.read_marker(source), diff=diff, steps=steps, ref_steps=ref["steps"],
                steps_after=_adam_steps(engine), client={k: client_state.get(k) for k in ("step", "note")},
                rng_restored=ck.restore_rng_states(client_state), after_diff=_max_diff(ref["after"], after),
                worst=_worst(ref["after"], after))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_checkpoint_resumes_on_one(tmp_path, stage):
    tag_dir = run_ranks(_scenario_save_two, world_size=2, tmp=str(tmp_path), stage=stage)[0]["tag_dir"]
    marker = json.loads((Path(tag_dir) / "COMPLETE").read_text())
    assert marker["world_size"] == 2 and marker["zero_stage"] == stage
    with pytest.raises(ck.CheckpointError, match="saved by 2 processes.*has 1.*ensure_universal"):
        ck.load(None, tag_dir)  # no process group here: world size 1; refused before the engine is touched
    r = run_ranks(_scenario_resume_one, tmp=str(tmp_path), stage=stage, tag_dir=tag_dir)[0]
    assert r["needs"] and r["world"] == 1
    assert r["source"] == "step_00000002_universal" and r["source_marker"]["universal"] is True
    assert r["diff"] == 0.0  # weights and both AdamW moments restored exactly
    assert r["steps"] == r["ref_steps"] == [2] and r["steps_after"] == [3]  # every group counts once per step
    assert r["client"] == {"step": 2, "note": "two"}
    assert r["rng_restored"] is False  # per-rank RNG does not carry over a world-size change
    # the next step on 1 process (2 micro-batches accumulated) matches the 2-process step up to summation order
    assert r["after_diff"] < 1e-6, r["worst"]


# ---------------------------------------------------------------------------------------------------------------
# waiting for rank 0's universal conversion (no collective, no deadline)


def test_waiting_ranks_return_once_the_conversion_is_marked_complete(tmp_path):
    import threading

    out, failed = tmp_path / "step_00000002_universal", tmp_path / "step_00000002_universal.failed"
    out.mkdir()
    timer = threading.Timer(0.3, ck.write_marker, args=(out, {"step": 2, "world_size": 2, "universal": True}))
    timer.start()
    ck._wait_for_conversion(out, failed, poll_s=0.02)
    timer.join()
    assert ck.read_marker(out)["universal"] is True


def test_waiting_ranks_raise_rank_0s_conversion_error(tmp_path):
    out, failed = tmp_path / "step_00000002_universal", tmp_path / "step_00000002_universal.failed"
    failed.write_text("ds_to_universal exited 1: bad shard")
    with pytest.raises(ck.CheckpointError, match="failed on rank 0: ds_to_universal exited 1: bad shard"):
        ck._wait_for_conversion(out, failed, poll_s=0.02)


def _scenario_failed_conversion(tmp: str) -> str:
    try:
        ck.ensure_universal(Path(tmp) / "checkpoints" / "step_00000002")
    except ck.CheckpointError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
def test_a_failed_conversion_fails_every_rank(tmp_path):
    _fake(tmp_path / "checkpoints", 2, world_size=3)  # not a DeepSpeed checkpoint: the converter fails
    (tmp_path / "checkpoints" / "step_00000002_universal.failed").write_text("stale note of an earlier attempt")
    errors = run_ranks(_scenario_failed_conversion, world_size=2, tmp=str(tmp_path))
    assert "universal conversion of" in errors[0] and "failed (exit" in errors[0]
    assert "failed on rank 0" in errors[1] and "stale note" not in errors[1]


# ---------------------------------------------------------------------------------------------------------------
# durability and refusals of a real save (fresh processes)


def _scenario_durable_save(tmp: str) -> dict:
    """Save once on 2 ranks, recording every fsync (by path) and the moment COMPLETE is renamed into place."""
    import os
    import time

    synced: list[tuple[float, str]] = []
    renamed: list[tuple[float, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append((time.time(), os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        renamed.append((time.time(), str(dst)))

    engine = _build(stage=2, world_size=2)
    train_steps(engine, 1)
    os.fsync, os.replace = fsync, replace
    try:
        tag_dir = ck.save(engine, Path(tmp) / "checkpoints", 1, {"step": 1}, keep_last=2)
    finally:
        os.fsync, os.replace = real_fsync, real_replace
    return {"synced": synced, "renamed": renamed, "tag_dir": str(tag_dir)}


@pytest.mark.slow
def test_every_file_and_directory_is_fsynced_before_complete_is_renamed_in(tmp_path):
    """A node losing power right after the save must not leave a COMPLETE marker vouching for files still in its
    page cache (DeepSpeed's torch.save does not fsync)."""
    results = run_ranks(_scenario_durable_save, world_size=2, tmp=str(tmp_path))
    tag_dir = Path(results[0]["tag_dir"])
    marker_time = next(t for t, dst in results[0]["renamed"] if dst == str(tag_dir / "COMPLETE"))
    synced_before = {path for r in results for t, path in r["synced"] if t <= marker_time}
    files = {str(p) for p in tag_dir.iterdir() if p.name != "COMPLETE"}
    assert files and files <= synced_before, sorted(files - synced_before)
    assert str(tag_dir) in synced_before  # the directory naming them
    synced_after = {path for t, path in results[0]["synced"] if t >= marker_time}
    assert str(tag_dir) in synced_after  # the marker's own directory entry
    assert (tag_dir.parent / "latest").read_text() == tag_dir.name  # DeepSpeed's pointer, after COMPLETE


def _scenario_poisoned_save(tmp: str) -> dict:
    import torch

    ckpt_dir = Path(tmp) / "checkpoints"
    engine = _build(stage=2, world_size=1, global_batch=2)
    train_steps(engine, 1)
    ck.save(engine, ckpt_dir, 1, {"step": 1}, keep_last=1)
    with torch.no_grad():
        next(engine.module.parameters()).view(-1)[0] = float("nan")  # what an inf lr does to the weights
    try:
        ck.save(engine, ckpt_dir, 2, {"step": 2}, keep_last=1)
        error = None
    except ck.NonFiniteWeights as e:
        error = str(e)
    return {"error": error, "left": sorted(p.name for p in ckpt_dir.iterdir())}


@pytest.mark.slow
def test_non_finite_weights_are_never_saved_and_prune_nothing(tmp_path):
    r = run_ranks(_scenario_poisoned_save, tmp=str(tmp_path))[0]
    assert r["error"] and "step 2 hold NaN or inf" in r["error"]
    assert [n for n in r["left"] if n.startswith("step_")] == ["step_00000001"]  # keep_last=1 pruned nothing
