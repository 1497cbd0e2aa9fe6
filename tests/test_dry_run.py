"""launch.py --dry-run: the plan of a run without building anything, and the memory model behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_distill.config import load_config
from hybrid_distill.model import flops
from hybrid_distill.model.task import HybridDistillTask
from hybrid_distill.runtime import plan

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _dry_run(*args: str, world_size: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO)
    if world_size is not None:
        env["WORLD_SIZE"] = str(world_size)
    code = ("import sys; from hybrid_distill.train import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, "--dry-run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def test_dry_run_of_the_vitl_recipe_prints_the_plan_without_torch_or_models():
    result = _dry_run("--preset", "vitl_in21k_clip_mae")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.strip().endswith("no torch")
    cfg = load_config("vitl_in21k_clip_mae")
    shapes = flops.config_shapes(cfg)
    per_image = flops.step_flops(shapes)
    assert flops.keep_schedule(196, 0.3, 3) == [137, 96, 67]
    assert "196 -> 137 -> 96 -> 67 patches (block 0: 196 -> 137, block 8: 137 -> 96, block 16: 96 -> 67)" in out
    assert "N' = 68 tokens" in out
    for name, part in plan.PART_NAMES.items():
        assert f"{part} {per_image[name] / 1e9:.2f}" in out
    assert f"total {sum(per_image.values()) / 1e9:.2f}" in out
    assert "MIM teacher 114.11, feature teacher 123.04, student forward 41.98, student backward 83.64" in out
    assert "global 1024 = micro 64 x world 1 x accumulation 16" in out and "warmup 2 epochs" in out
    assert "peak 0.0006" in out and "min 1e-06" in out
    assert "GPU memory per device" in out and "ZeRO-2" in out


def test_dry_run_takes_the_world_size_from_the_environment():
    out = _dry_run("--preset", "vitl_in21k_clip_mae", world_size=8).stdout
    assert "world size 8 (from WORLD_SIZE)" in out and "micro 64 x world 8 x accumulation 2" in out


def test_dry_run_states_the_warmup_steps_of_a_sized_source():
    out = _dry_run("--preset", "tiny", "data.synthetic_size=96").stdout
    # 96 samples / (8 x 1) = 12 micro-batches, accumulation 2: 6 steps per epoch, 4 epochs, warmup 0.5 epochs
    assert "6 steps per epoch, total 24 steps, warmup 3 steps (0.5 epochs)" in out


def test_dry_run_refuses_a_deepspeed_json_the_trainer_would_refuse_before_planning(tmp_path):
    (tmp_path / "typo.json").write_text('{"zero_optimisation": {"stage": 2}}')
    (tmp_path / "broken.json").write_text('{"zero_optimization": ')
    for name, needle in (("typo.json", "did you mean 'zero_optimization'"), ("broken.json", "is not valid JSON")):
        result = _dry_run("--preset", "tiny", "--ds_config", str(tmp_path / name))
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "keep schedule" not in result.stdout


def test_dry_run_refuses_the_resume_arguments_a_real_start_refuses(tmp_path):
    result = _dry_run("--preset", "tiny", "--overwrite", "--resume", str(tmp_path))
    assert result.returncode == 2 and "--overwrite starts a fresh run" in result.stderr, result.stderr


def test_dry_run_plans_even_when_the_data_is_not_there_then_exits_2():
    result = _dry_run("--preset", "vitb_in1k_deit_mae")
    assert "keep schedule" in result.stdout
    assert result.returncode == 2 and "data/imagenet-1k/train" in result.stderr


def test_plan_schedule_equals_the_loops_arithmetic():
    """Steps per epoch, total and warmup as loop.build_run computes them from the real loader and DeepSpeed JSON."""
    from hybrid_distill.data import build_loader
    from hybrid_distill.runtime.engine import resolve_ds_config

    cfg = load_config("tiny", overrides=["data.synthetic_size=100", "run.epochs=3", "optim.warmup_epochs=1.5"])
    for world_size in (1, 2):
        accum = resolve_ds_config(REPO / "ds_configs" / "zero2.json", cfg, world_size, "cpu")[
            "gradient_accumulation_steps"]
        loader = build_loader(cfg.data, img_size=64, rank=0, world_size=world_size)
        per_epoch = max(1, len(loader) // accum)
        want = {"accumulation": accum, "steps_per_epoch": per_epoch, "total_steps": 3 * per_epoch,
                "warmup_steps": round(1.5 * per_epoch)}
        got = plan.schedule(cfg, world_size)
        assert {k: got[k] for k in want} == want


@pytest.mark.parametrize("world_size", [1, 4, 64])
def test_model_states_are_deepspeeds_own_estimates(world_size):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    psi, largest = 304_000_000, 4_200_000
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    _, gpu2 = estimate_zero2_model_states_mem_needs(psi, world_size, 1, cpu_offload=False)
    _, gpu3, _ = estimate_zero3_model_states_mem_needs(psi, largest, world_size, 1, cpu_offload=False)
    offload_param = (offload["zero_optimization"].get("offload_param") or {}).get("device", "none") != "none"
    _, gpu3_off, _ = estimate_zero3_model_states_mem_needs(psi, largest, world_size, 1, cpu_offload=True,
                                                            cpu_offload_params=offload_param)
    assert plan.model_state_bytes(psi, largest, zero2, world_size)["model_states"] == pytest.approx(gpu2, abs=2)
    assert plan.model_state_bytes(psi, largest, zero3, world_size)["model_states"] == pytest.approx(gpu3, abs=2)
    assert plan.model_state_bytes(psi, largest, offload, world_size)["model_states"] == pytest.approx(gpu3_off, abs=2)


def _saved_bytes(task: HybridDistillTask, batch: int) -> int:
    """Bytes of the distinct storages the student + head forward saves for its backward, parameters excluded."""
    images = torch.randint(0, 256, (batch, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    targets = task.targets(images)
    params = {p.untyped_storage().data_ptr() for p in task.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task.trainable((images.float() - task.mean) / task.std, targets.keep_idx)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("dtype", "student"), [
    (torch.float32, []), (torch.float32, ["student.embed_dim=128", "student.num_heads=4"]), (torch.bfloat16, []),
], ids=["fp32", "fp32-wide", "bf16"])
def test_student_activation_model_equals_the_saved_tensors(checkpointing, dtype, student):
    """Measured on the CPU by saved-tensor accounting (no allocator): exact in fp32; in bf16 within 1% (the CPU
    keeps LayerNorm statistics in bf16, CUDA and the model in fp32)."""
    cfg = load_config("tiny", overrides=[f"student.grad_checkpointing={checkpointing}", *student])
    torch.manual_seed(0)
    task = HybridDistillTask(cfg)
    task.trainable.to(dtype)
    shapes = flops.task_shapes(task)
    B = 8
    model = plan.student_activation_bytes(shapes.student, shapes.n_kept, B, dtype_bytes=dtype.itemsize,
                                          checkpointing=checkpointing)
    measured = _saved_bytes(task, B)
    assert model["saved"] == pytest.approx(measured, rel=0 if dtype == torch.float32 else 0.01)


def test_memory_estimate_is_monotone_in_the_levers():
    cfg = load_config("vitl_in21k_clip_mae")
    shapes = flops.config_shapes(cfg)
    zero2 = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    base = plan.memory_estimate(cfg, shapes, zero2, world_size=8)
    cfg.student.grad_checkpointing = True
    ckpt = plan.memory_estimate(cfg, shapes, zero2, world_size=8)
    assert ckpt["activations"] < 0.3 * base["activations"] and ckpt["model_states"] == base["model_states"]
    assert plan.memory_estimate(cfg, shapes, zero2, world_size=1)["model_states"] > base["model_states"]
    assert base["trainable_params"] == pytest.approx(304.4e6, rel=1e-3)  # ViT-L/16 + the 1024 -> 1024 feature head
