"""benchmarks/train_throughput.py: config building, marked steps, the variants in a CPU smoke run, the FLOP table.

The FLOP model itself is tested against torch's counter in tests/test_flops.py."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_throughput", module)
    spec.loader.exec_module(module)
    return module


tt = _load_bench()
CPU = torch.device("cpu")


def test_bench_config_uses_random_timm_teachers():
    cfg = tt.bench_config("vitl_in21k_clip_mae", 64, [], keep_open_clip=False)
    assert (cfg.mim_teacher.weights, cfg.feature_teacher.weights) == ("random", "random")
    assert cfg.feature_teacher.library == "timm"
    assert cfg.feature_teacher.model == "vit_large_patch14_clip_224.openai"
    assert cfg.data.batch_size == 64 and cfg.optim.global_batch_size % 64 == 0
    assert tt.bench_config("vitb_in1k_deit_mae", 96, [], False).optim.global_batch_size == 1056


def test_marked_targets_equal_task_targets():
    cfg = tt.bench_config("tiny", 2, [], keep_open_clip=False)
    task = tt.build_task(cfg, CPU)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    marks = tt.Marks(cuda=False)
    marks.mark("start")
    ours, theirs = tt.targets_marked(task, images, marks), task.targets(images)
    assert [name for name, _ in marks.points] == ["start", "teacher_mim", "teacher_feature"]
    assert torch.equal(ours.keep_idx, theirs.keep_idx)
    assert torch.equal(ours.features, theirs.features)


def test_cpu_small_smoke(tmp_path, capsys):
    """Every kind of variant runs; ``compiled`` on the aot_eager backend (graph capture without C++ codegen)."""
    out = tmp_path / "train.json"
    report = tt.main(["--cpu-small", "--steps", "1", "--warmup", "1", "--variants", "fast,naive,grad_ckpt,compiled",
                      "--override", "run.compile_backend=aot_eager", "--data-batches", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["runs"][0]["preset"] == "tiny"
    run = saved["runs"][0]
    assert run["batch"] == 8 and run["data_synthetic_images_per_s"] > 0
    rows = {v["variant"]: v for v in run["variants"]}
    assert rows["fast"]["n_kept"] == 23 and rows["naive"]["n_kept"] == 65  # 64 patches: 45 -> 32 -> 22 kept
    assert rows["naive"]["relation_impl"] == "torch"
    for row in rows.values():
        assert row["images_per_s"] > 0 and math.isfinite(row["loss_last"]) and 0 < row["mfu"]
        assert set(row["parts_ms"]) == set(tt.PARTS) and all(v >= 0 for v in row["parts_ms"].values())
        assert sum(row["parts_ms"].values()) == pytest.approx(row["step_ms"], rel=0.05)
        assert row["peak_mib"] > 0 and row["peak_method"].startswith("MemTracker")
    assert rows["grad_ckpt"]["peak_mib"] < rows["fast"]["peak_mib"]  # same step, activations checkpointed
    assert rows["grad_ckpt"]["peak_activation_mib"] < 0.5 * rows["fast"]["peak_activation_mib"]
    assert rows["compiled"]["flops_per_image"] == rows["fast"]["flops_per_image"]
    assert report["runs"][0]["variants"][0]["variant"] == "fast"
    capsys.readouterr()
    tt.main(["--table", str(out)])
    printed = capsys.readouterr().out
    assert "| tiny | 8 | fast | 23 |" in printed and "| tiny | 8 | naive | 65 |" in printed


def test_compiled_variant_leaves_the_task_eager():
    cfg = tt.bench_config("tiny", 2, ["run.compile_backend=aot_eager"], keep_open_clip=False)
    task = tt.build_task(cfg, CPU)
    tt.apply_variant(task, tt.VARIANTS["compiled"], CPU)
    with tt.variant_student(task, CPU) as student:
        assert "targets" not in vars(task) and "mim_targets" in vars(task.mim_teacher)
        assert student.inner._compiled_call_impl is not None
    assert not {"mim_targets", "feature_targets", "loss_terms"} & (set(vars(task)) | set(vars(task.mim_teacher))
                                                                 | set(vars(task.feature_teacher)))


def test_grad_ckpt_variant_switches_checkpointing_on_and_back_off():
    task = tt.build_task(tt.bench_config("tiny", 2, [], keep_open_clip=False), CPU)
    tt.apply_variant(task, tt.VARIANTS["grad_ckpt"], CPU)
    assert task.trainable.student.grad_checkpointing
    tt.apply_variant(task, tt.VARIANTS["fast"], CPU)
    assert not task.trainable.student.grad_checkpointing


def test_flops_table_comes_from_the_config_alone(capsys):
    from hybrid_distill.model import flops

    tt.main(["--flops-only", "--preset", "vitl_in21k_clip_mae", "--variants", "fast,naive"])
    printed = capsys.readouterr().out
    cfg = tt.bench_config("vitl_in21k_clip_mae", None, [], keep_open_clip=True)
    total = sum(flops.step_flops(flops.config_shapes(cfg)).values()) / 1e9
    assert f"| vitl_in21k_clip_mae | fast | 68 | 114.11 | 123.04 | 41.98 | 83.64 | 0.08 | {total:.1f} |" in printed
    assert "| vitl_in21k_clip_mae | naive | 197 |" in printed


def test_unknown_variant_is_an_error():
    with pytest.raises(SystemExit):
        tt.parse_args(["--variants", "fast,turbo"])


def _load_data_bench():
    spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "benchmarks" / "data_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_throughput_measures_ours_beside_torchvision(tmp_path, capsys):
    """One run, the same JPEG corpus, the same workers, batch and crop: both loaders' images/s and their ratio."""
    dt = _load_data_bench()
    out = tmp_path / "data.json"
    dt.main(["--make-corpus", "24", "--corpus-dir", str(tmp_path / "corpus"), "--workers", "0", "--seconds", "0.5",
             "--warmup", "1", "--batch-size", "8", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"ours", "torchvision"} and report["corpus"]["images"] == 24
    assert all(r["images_per_s"] > 0 and r["images_per_s_per_core"] == r["images_per_s"] for r in rows.values())
    ratio = rows["ours"]["images_per_s"] / rows["torchvision"]["images_per_s"]
    assert f"| 0 | {rows['ours']['images_per_s']} | {rows['torchvision']['images_per_s']} | {ratio:.2f} |" in (
        capsys.readouterr().out)
