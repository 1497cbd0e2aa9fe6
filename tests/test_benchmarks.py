"""benchmarks/train_throughput.py: analytic FLOPs against torch's counter, config building, a CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

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


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides", [
    [],
    ["masking.drop_ratio=0"],
    ["masking.teacher_prunes=true"],
    ["feature_teacher.feature=proj"],
])
def test_flops_match_torch_counter(overrides):
    """Teachers, student forward (+ loss) and backward each within 5% of FlopCounterMode (exact in practice)."""
    cfg = tt.bench_config("tiny", 4, ["loss.relation_impl=torch", *overrides], keep_open_clip=False)
    task = tt.build_task(cfg, CPU)
    for module in task.modules():  # SDPA on CPU is not counted by FlopCounterMode; the explicit path is
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    flops = {k: 4 * v for k, v in tt.step_flops(task, cfg.masking.drop_ratio).items()}
    holder = {}
    teachers = _counted(lambda: holder.update(t=task.targets(images)))
    forward = _counted(lambda: holder.update(out=task.losses(images, holder["t"])))
    backward = _counted(lambda: holder["out"]["loss"].backward())
    assert holder["t"].keep_idx.shape[1] == tt.n_kept(task, cfg.masking.drop_ratio)
    assert teachers == pytest.approx(flops["teacher_mim"] + flops["teacher_feature"], rel=0.05)
    assert forward == pytest.approx(flops["student_fwd"] + flops["relation_loss"] / 2, rel=0.05)
    assert backward == pytest.approx(flops["student_bwd"] + flops["relation_loss"] / 2, rel=0.05)


def test_block_flops_closed_form():
    """For a standard ViT block (I = D, H = 4D) the count is 24nD² + 4n²D."""
    s = tt.ViTShape(dim=1024, inner=1024, hidden=4096, depth=24, patch_in=768, num_patches=196, num_prefix=1)
    n, d = 197, 1024
    assert tt.block_flops(s, n) == 24 * n * d * d + 4 * n * n * d


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
    out = tmp_path / "train.json"
    report = tt.main(["--cpu-small", "--steps", "1", "--warmup", "1", "--variants", "fast,naive",
                      "--data-batches", "1", "--out", str(out)])
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
    assert report["runs"][0]["variants"][0]["variant"] == "fast"
    capsys.readouterr()
    tt.main(["--table", str(out)])
    printed = capsys.readouterr().out
    assert "| tiny | 8 | fast | 23 |" in printed and "| tiny | 8 | naive | 65 |" in printed


def test_unknown_variant_is_an_error():
    with pytest.raises(SystemExit):
        tt.parse_args(["--variants", "fast,turbo"])
