"""End-to-end runs of the real ``main(argv)`` (through ``launch.py``) under the real DeepSpeed on CPU.

Every run is a fresh process (DeepSpeed and torch.distributed keep global state), started the way users start
it: ``python launch.py``, or ``deepspeed --num_gpus 2 launch.py`` for two processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_testlib import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "run.log_every=1", "data.synthetic_size=32"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HD_RELATION_IMPL"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launch(out: Path, *args: str, procs: int = 1, ds: str | Path = "ds_configs/zero2.json", timeout: int = 600
           ) -> subprocess.CompletedProcess:
    """Run the trainer on ``out``; 1 process via ``python launch.py``, more via the deepspeed launcher."""
    argv = ["launch.py", "--ds_config", str(ds), "--output-dir", str(out), *args]
    if procs == 1:
        cmd = [sys.executable, *argv]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
               "--master_port", str(free_port()), *argv]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    (out.parent / f"{out.name}.log").write_text(result.stdout + result.stderr)
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _ok(result: subprocess.CompletedProcess, code: int = 0) -> None:
    assert result.returncode == code, f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """One process, ZeRO-2, 8 steps on a fixed small synthetic set (an overfit run)."""
    out = tmp_path_factory.mktemp("e2e") / "zero2"
    _ok(launch(out, *TINY, "run.max_steps=8", "run.ckpt_every=4"))
    return out


@pytest.mark.slow
def test_single_process_zero2_run_leaves_a_complete_run_directory(single_run):
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "train.log", "loss.png", "export/model.safetensors"):
        assert (single_run / name).exists(), name
    assert any((single_run / "tensorboard").rglob("events.out.tfevents.*"))
    rows = metrics(single_run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for key in ("feature_loss", "relation_loss", "keep_ratio", "lr", "grad_norm", "skipped_steps", "images_per_s",
                "images_per_s_per_device", "time_data", "time_teachers", "time_student", "time_optimizer"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]
    ds = json.loads((single_run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 3.0 and "auto" not in json.dumps(ds)
    tags = sorted(p.name for p in (single_run / "checkpoints").glob("step_*"))
    assert tags == ["step_00000004", "step_00000008"]


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_losses(single_run, tmp_path):
    """Stop after step 3 (exit 75), resume with --resume auto: steps 4..8 match the uninterrupted run.

    Exact equality is expected up to float32 reduction order; we allow 1e-5 relative because DeepSpeed
    re-flattens the fp32 parameters on load (same values, possibly another summation order in clipping).
    """
    out = tmp_path / "stopped"
    _ok(launch(out, *TINY, "run.max_steps=8", "run.ckpt_every=4", "run.stop_after_steps=3"), code=75)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    _ok(launch(out, *TINY, "run.max_steps=8", "run.ckpt_every=4", "--resume", "auto"))
    resumed, reference = metrics(out), metrics(single_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for got, want in zip(resumed[3:], reference[3:], strict=True):
        for key in ("loss", "feature_loss", "relation_loss", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


@pytest.mark.slow
def test_two_process_zero3_then_one_process_resume_reproduce_the_single_process_losses(single_run, tmp_path):
    """2 processes, ZeRO-3 with every parameter partitioned (persistence threshold 0: cls_token/pos_embed exist only
    through the engine's gathering hooks) train steps 1-4 and stop; 1 process resumes the ZeRO-3 checkpoint through
    DeepSpeed's universal checkpoint for steps 5-8. The global batches are the same as in the 1-process ZeRO-2 run,
    so every loss matches it (1e-4 relative: other reduction orders across ranks and ZeRO stages)."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    partitioned = tmp_path / "zero3_all_partitioned.json"
    partitioned.write_text(json.dumps(ds))
    out = tmp_path / "zero3"
    argv = [*TINY, "run.max_steps=8", "run.ckpt_every=4", "run.export_at_end=false"]
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    _ok(launch(out, *argv, "run.stop_after_steps=4", procs=2, ds=partitioned), code=75)
    assert [r["world_size"] for r in metrics(out)] == [2] * 4
    # DeepSpeed's CPU all-reduce buffers (66 MiB of RAM per rank) do not outlive the run
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    _ok(launch(out, *argv, "--resume", "auto", ds=partitioned))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["world_size"] for r in rows] == [2] * 4 + [1] * 4
    assert (out / "checkpoints" / "step_00000004_universal").is_dir()
    for got, want in zip(rows, metrics(single_run), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), got["step"]


@pytest.mark.slow
def test_exported_student_loads_in_timm_with_the_trained_outputs(single_run):
    import timm
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hybrid_distill.config import config_from_dict, load_config
    from hybrid_distill.model.student import build_student, student_kwargs

    cfg = load_config("tiny")
    saved = config_from_dict(__import__("yaml").safe_load((single_run / "config.yaml").read_text()))
    assert saved.student == cfg.student
    model = timm.create_model(cfg.student.model, pretrained=True, **student_kwargs(cfg.student),
                              pretrained_cfg_overlay=dict(file=str(single_run / "export" / "model.safetensors")))
    trained = get_fp32_state_dict_from_zero_checkpoint(str(single_run / "checkpoints"), tag="step_00000008")
    assert not any(k.startswith("head.") for k in model.state_dict())
    student = build_student(cfg.student)
    student.load_state_dict({k.removeprefix("student."): v for k, v in trained.items() if k.startswith("student.")})
    x = torch.randn(2, 3, 64, 64)
    model.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), student.forward_features(x), rtol=0, atol=0)


BAD_INPUTS = [
    (["optim.lr_typo=1"], "optim.lr_typo"),
    (["run.max_steps=abc"], "run.max_steps"),
    (["--ds_config", "ds_configs/nope.json"], "nope.json"),
    (["data.source=folder:/no/such/dir"], "/no/such/dir"),
    (["student.num_heads=2"], "loss.head_reduce"),
    (["mim_teacher.weights=/no/such/mae.pth"], "/no/such/mae.pth"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_bad_input_fails_fast_with_a_message_naming_it(tmp_path, args, needle):
    ds = [] if "--ds_config" in args else ["--ds_config", "ds_configs/zero2.json"]
    cmd = [sys.executable, "launch.py", *ds, "--output-dir", str(tmp_path / "bad"), "--preset", "tiny", *args]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_non_finite_losses_stop_with_a_clear_message_and_save_nothing(tmp_path):
    """Those weights are not resumable (tests/test_faults.py: the last good checkpoint stays the newest)."""
    out = tmp_path / "nan"
    result = launch(out, *TINY, "run.max_steps=8", "run.max_nonfinite=2", "optim.lr=1e30", "optim.clip_grad=1e30",
                    "optim.warmup_epochs=0")
    _ok(result, code=3)
    assert "non-finite" in result.stderr and "the newest checkpoint is none" in result.stderr
    assert not any((out / "checkpoints").glob("step_*/COMPLETE"))


# ----------------------------------------------------------------------------------------------------------------
# resuming into a run directory that does not fit


def _copy_run(single_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(single_run, out, ignore=shutil.ignore_patterns("*_universal"))
    return out


@pytest.mark.slow
def test_resume_auto_refuses_another_recipe_and_keeps_the_runs_config(single_run, tmp_path):
    """A resubmission with changed overrides into the same --output-dir must not silently continue the old run."""
    out = _copy_run(single_run, tmp_path)
    before = (out / "config.yaml").read_text()
    result = launch(out, *TINY, "run.max_steps=10", "masking.drop_ratio=0.5", "student.depth=5")
    _ok(result, code=2)
    assert "masking.drop_ratio: 0.3 -> 0.5" in result.stderr and "student.depth: 6 -> 5" in result.stderr
    assert "--resume PATH" in result.stderr and "--output-dir" in result.stderr
    assert (out / "config.yaml").read_text() == before


@pytest.mark.slow
def test_resume_on_purpose_with_a_new_recipe_warns_and_exports_its_own_checkpoint(single_run, tmp_path):
    """--resume PATH continues an older checkpoint with changed keys (warned); the end-of-run export is the
    checkpoint this run saved (step 5), not the newest one in the directory (step 8)."""
    out = _copy_run(single_run, tmp_path)
    old = out / "checkpoints" / "step_00000004"
    result = launch(out, *TINY, "run.max_steps=5", "masking.drop_ratio=0.5", "--resume", str(old))
    _ok(result)
    assert "changed config keys: masking.drop_ratio" in result.stderr
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["step"] == 5 and info["source"].endswith("step_00000005")


@pytest.mark.slow
def test_unloadable_checkpoint_exits_2_naming_the_older_ones(single_run, tmp_path):
    out = _copy_run(single_run, tmp_path)
    shard = next((out / "checkpoints" / "step_00000008").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])  # torn by a crash after the marker was written
    result = launch(out, *TINY, "run.max_steps=10")
    _ok(result, code=2)
    assert "cannot resume" in result.stderr and "step_00000008" in result.stderr
    assert str(out / "checkpoints" / "step_00000004") in result.stderr  # the older complete checkpoint to use


@pytest.mark.slow
def test_resume_with_another_zero_stage_names_the_matching_ds_config(single_run, tmp_path):
    out = _copy_run(single_run, tmp_path)
    result = launch(out, *TINY, "run.max_steps=10", ds="ds_configs/zero3.json")
    _ok(result, code=2)
    assert "ZeRO stage 2" in result.stderr and "ds_configs/zero2.json" in result.stderr
