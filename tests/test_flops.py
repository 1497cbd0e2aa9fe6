"""The FLOP model (hybrid_distill.model.flops) against torch's FlopCounterMode, and its two shape sources."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from hybrid_distill.config import load_config
from hybrid_distill.model import flops
from hybrid_distill.model.task import HybridDistillTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_OPEN_CLIP = "hd-flops-tiny-clip"  # open_clip tower on the tiny preset's grid: 64 px, /8, width 64, 4 heads
TINY_DIMS = ["embed_dim=64", "depth=6", "num_heads=4", "patch_size=8"]


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_config(tmp_path_factory):
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    config = {"embed_dim": 48, "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "head_width": 16,
                                              "patch_size": 8}, "text_cfg": text}
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def count_cpu_attention():
    """FlopCounterMode has no formula for the CPU's fused attention kernel: torch's own SDPA forward formula is
    registered for it (nn.MultiheadAttention calls it), and MHA's inference fast path (one opaque fused op) is off.
    timm modules take their explicit attention path (``fused_attn=False``): plain matmuls forward and backward (the
    fused backward would also count the recomputed scores, which model FLOPs leave out)."""
    from torch.utils import flop_counter as fc

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in fc.flop_registry:
        fc.register_flop_formula(op)(_sdpa_cpu_flop)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield lambda task: [setattr(m, "fused_attn", False) for m in task.modules() if hasattr(m, "fused_attn")]
    torch.backends.mha.set_fastpath_enabled(before)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


EVA_MIM = ["mim_teacher.model=eva02_base_patch14_224.mim_in22k", *(f"mim_teacher.{d}" for d in TINY_DIMS)]
OPEN_CLIP_MIM = ["mim_teacher.library=open_clip", f"mim_teacher.model={TINY_OPEN_CLIP}",
                 *(f"mim_teacher.{k}=null" for k in ("embed_dim", "depth", "num_heads", "patch_size"))]


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="default: L-2 is a masking block"),
    pytest.param(["masking.drop_ratio=0"], id="no dropping"),
    pytest.param(["masking.layers=[0,1,2]"], id="L-2 not a masking block: q, k only"),
    pytest.param(["masking.layers=[0,1,2]", "masking.teacher_prunes=true"], id="pruning, q, k only at L-2"),
    pytest.param(["masking.teacher_prunes=true"], id="pruning"),
    pytest.param(["masking.layers=[1,3,5]"], id="a masking block after L-2"),
    pytest.param(["feature_teacher.feature=proj"], id="feature=proj"),
    pytest.param([*EVA_MIM, "masking.layers=[0,1,2]"], id="EVA-02 MIM teacher (RoPE q/k recomputed, SwiGLU)"),
    pytest.param([*OPEN_CLIP_MIM, "masking.layers=[0,1,2]"], id="open_clip MIM teacher (MHA q/k recomputed)"),
])
def test_flop_model_equals_torch_flop_counter(overrides, count_cpu_attention):
    """Teachers, student forward + loss and backward, each exactly what FlopCounterMode counts."""
    cfg = load_config("tiny", overrides=["loss.relation_impl=torch", *overrides])
    torch.manual_seed(0)
    task = HybridDistillTask(cfg)
    count_cpu_attention(task)
    B = 4
    images = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8)
    shapes = flops.task_shapes(task)
    want = {k: B * v for k, v in flops.step_flops(shapes).items()}
    holder = {}
    teachers = _counted(lambda: holder.update(t=task.targets(images)))
    forward = _counted(lambda: holder.update(out=task.losses(images, holder["t"])))
    backward = _counted(lambda: holder["out"]["loss"].backward())
    assert holder["t"].keep_idx.shape[1] == shapes.n_kept
    assert teachers == want["teacher_mim"] + want["teacher_feature"]
    assert forward == want["student_fwd"] + want["relation_loss"] / 2
    assert backward == want["student_bwd"] + want["relation_loss"] / 2


def test_mim_teacher_computes_only_q_k_of_block_l_minus_2_when_it_is_not_a_masking_block():
    """The old model counted block L-2 in full: 1.18x the teacher FLOPs that run with masking.layers=[0,1,2]."""
    cfg = load_config("tiny", overrides=["masking.layers=[0,1,2]"])
    s = flops.config_shapes(cfg).mim
    full = flops.embed_flops(s) + 5 * flops.block_flops(s, s.tokens)  # blocks 0..4 = L-2 in full
    qk_only = flops.mim_teacher_flops(s, 0.3, [0, 1, 2], prunes=False)
    assert qk_only == full - flops.block_flops(s, s.tokens) + 2 * s.tokens * s.qk_weights
    assert full / qk_only == pytest.approx(1.18, abs=0.01)


def test_standard_block_is_24nd2_plus_4n2d():
    s = flops.vit_shape(dim=1024, depth=24, heads=16, hidden=4096, patch=16, img_size=224, head_out=0)
    n, d = 197, 1024
    assert flops.block_flops(s, n) == 24 * n * d * d + 4 * n * n * d


@pytest.mark.parametrize("preset", ["tiny", "vitb_in1k_deit_mae", "vitl_in21k_clip_mae"])
def test_shapes_from_names_equal_the_built_models(preset):
    """The dry run reads shapes off the config; the trainer off the modules: the same numbers (timm teachers on the
    meta device; the open_clip tower's name-based shape against its model config's build on CPU is in the next test)."""
    cfg = load_config(preset, overrides=["mim_teacher.weights=random", "feature_teacher.weights=random"])
    planned = flops.config_shapes(cfg)
    student = timm.create_model(cfg.student.model, pretrained=False, num_classes=0, img_size=cfg.student.img_size,
                                **{k: v for k in ("embed_dim", "depth", "num_heads", "patch_size")
                                   if (v := getattr(cfg.student, k)) is not None}, device="meta")
    assert flops.shape_of(student) == planned.student
    if cfg.feature_teacher.library == "timm":
        with torch.device("meta"):
            task = HybridDistillTask(cfg)
        assert flops.task_shapes(task) == planned


def test_open_clip_shape_from_its_model_config_equals_the_built_tower():
    cfg = load_config("tiny", overrides=OPEN_CLIP_MIM)
    visual = open_clip.create_model(TINY_OPEN_CLIP).visual
    assert flops.shape_of(visual) == flops.shape_from_config(cfg.mim_teacher, 64)
    assert flops.shape_from_config(load_config("vitl_in21k_clip_mae").feature_teacher, 196).params == 303_904_768


def test_unknown_names_raise_unless_a_fallback_builds_them():
    cfg = load_config("tiny", overrides=["mim_teacher.model=eva02_base_patch14_224.mim_in22k",
                                         *(f"mim_teacher.{d}" for d in TINY_DIMS)])
    with pytest.raises(flops.UnknownModel, match="eva02_base_patch14_224"):
        flops.config_shapes(cfg)
    seen = []
    with torch.device("meta"):
        task = HybridDistillTask(cfg)

    def fallback(section, img_size, head_out):
        seen.append((section.model, img_size))
        return flops.shape_of(task.mim_teacher.backbone.model)

    assert flops.config_shapes(cfg, fallback=fallback) == flops.task_shapes(task)
    assert seen[0][0] == "eva02_base_patch14_224.mim_in22k"


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA GeForce RTX 4090", None), (None, None),
])
def test_device_peak_table(name, peak):
    assert flops.peak_tflops(name) == peak


def test_flop_module_imports_no_torch():
    """The dry run plans without torch: the FLOP model and the plan are plain Python."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; import hybrid_distill.model.flops, hybrid_distill.runtime.plan; "
            "sys.exit(int('torch' in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(repo))
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, check=False).returncode == 0
