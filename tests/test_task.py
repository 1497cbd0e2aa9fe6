"""The Hybrid Distillation task (docs/algorithm.md): loss dict, frozen teachers, per-teacher inputs, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybrid_distill.config import ConfigError, load_config
from hybrid_distill.model.task import HybridDistillTask, default_mask_layers

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


pytestmark = pytest.mark.usefixtures("one_thread")


def _task(*overrides):
    torch.manual_seed(0)
    return HybridDistillTask(load_config(preset="tiny", overrides=list(overrides)))


def _images(B=8, seed=0):
    return torch.randint(0, 256, (B, 3, 64, 64), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _normalise(images, mean, std, size=None):
    x = images.float()
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    return (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _smooth_l1(x, beta):
    a = x.abs()
    return torch.where(a < beta, 0.5 * x * x / beta, a - 0.5 * beta)


def feature_loss_by_hand(pred, tokens, keep_idx, beta):
    total = 0.0
    for b in range(pred.shape[0]):
        t = tokens[b, keep_idx[b]].double()
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
        total += float(_smooth_l1(pred[b].double() - t, beta).sum())
    return total / pred.numel()


def relation_loss_by_hand(student_qk, teacher_qk, indices, beta, scaled=True):
    pairs = []
    for (q_s, k_s), (q_t, k_t), index in zip(student_qk, teacher_qk, indices, strict=True):
        total, count = 0.0, 0
        c_s, c_t = (math.sqrt(q_s.shape[-1]), math.sqrt(q_t.shape[-1])) if scaled else (1.0, 1.0)
        for b in range(q_s.shape[0]):
            rows = index[b].tolist()
            r_s = q_s[b].double() @ k_s[b].double().transpose(-1, -2) / c_s
            r_t = q_t[b].double()[:, rows] @ k_t[b].double()[:, rows].transpose(-1, -2) / c_t
            diff = _smooth_l1(r_s - r_t, beta)
            total, count = total + float(diff.sum()), count + diff.numel()
        pairs.append(total / count)
    return sum(pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------------------------
# loss dict


def test_loss_dict_has_the_four_entries_and_loss_is_feature_plus_alpha_relation():
    task = _task("loss.alpha=0.5")
    out = task(_images())
    assert set(out) == {"loss", "feature_loss", "relation_loss", "keep_ratio"}
    for value in out.values():
        assert value.dim() == 0 and torch.isfinite(value)
    assert out["feature_loss"] > 0 and out["relation_loss"] > 0
    assert torch.equal(out["loss"], out["feature_loss"] + 0.5 * out["relation_loss"])


def test_keep_ratio_of_the_tiny_preset_is_22_of_64():
    task = _task()
    assert task.mask_layers == [0, 2, 4]  # I = [0, L/3, 2L/3] of the 6-block MIM teacher
    targets = task.targets(_images())
    assert targets.keep_idx.shape == (8, 1 + 22)  # 64 -> 45 -> 32 -> 22
    assert task(_images())["keep_ratio"].item() == pytest.approx(22 / 64)


def test_default_mask_layers_are_0_third_two_thirds():
    assert default_mask_layers(24) == [0, 8, 16]  # ViT-L (PCAE's blocks)
    assert default_mask_layers(12) == [0, 4, 8]


def test_loss_terms_equal_an_independent_computation_with_their_own_betas():
    task = _task("loss.feature_beta=0.7", "loss.relation_beta=0.003")
    images = _images(4, seed=1)
    targets = task.targets(images)
    out = task.losses(images, targets)
    s = task.trainable.student.pretrained_cfg  # the student normalises with its own timm mean/std
    with torch.no_grad():
        pred, qk = task.trainable(_normalise(images, s["mean"], s["std"]), targets.keep_idx)
    feat = feature_loss_by_hand(pred, targets.features, targets.keep_idx, 0.7)
    rel = relation_loss_by_hand(qk, targets.mim.qk, targets.mim.qk_index, 0.003)
    assert out["feature_loss"].item() == pytest.approx(feat, rel=1e-4)
    assert out["relation_loss"].item() == pytest.approx(rel, rel=1e-4)
    # the betas matter for this data (each term has elements on both sides of its beta)
    assert out["relation_loss"].item() != pytest.approx(relation_loss_by_hand(qk, targets.mim.qk,
                                                                              targets.mim.qk_index, 1.0), rel=1e-2)


@pytest.mark.parametrize("scale, scaled", [("sqrt_d", True), ("none", False)])
def test_loss_relation_scale_selects_the_relation_that_is_distilled(scale, scaled):
    task = _task(f"loss.relation_scale={scale}")
    images = _images(4, seed=2)
    targets = task.targets(images)
    out = task.losses(images, targets)
    s = task.trainable.student.pretrained_cfg
    with torch.no_grad():
        _, qk = task.trainable(_normalise(images, s["mean"], s["std"]), targets.keep_idx)
    want = relation_loss_by_hand(qk, targets.mim.qk, targets.mim.qk_index, task.cfg.loss.relation_beta, scaled)
    assert out["relation_loss"].item() == pytest.approx(want, rel=1e-4)
    other = relation_loss_by_hand(qk, targets.mim.qk, targets.mim.qk_index, task.cfg.loss.relation_beta, not scaled)
    assert out["relation_loss"].item() != pytest.approx(other, rel=1e-2)


def test_student_argument_runs_the_student_forward():
    task = _task()
    calls = []

    def engine(x, keep_idx):
        calls.append(keep_idx.shape)
        return task.trainable(x, keep_idx)

    out = task(_images(2), student=engine)
    assert calls == [(2, 23)] and torch.isfinite(out["loss"])


def test_teacher_prunes_option_runs_with_the_same_keep_ratio():
    out = _task("masking.teacher_prunes=true")(_images(2))
    assert out["keep_ratio"].item() == pytest.approx(22 / 64) and torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------------------------------------------
# frozen teachers, trainable student + head


def test_only_student_and_head_are_trainable():
    task = _task()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable == {f"trainable.{n}" for n, _ in task.trainable.named_parameters()}
    assert all(n.startswith(("trainable.student.", "trainable.head.")) for n in trainable)
    assert {"trainable.head.weight", "trainable.head.bias", "trainable.student.pos_embed"} <= trainable
    assert task.trainable.head.out_features == 96  # the CLIP tower's width
    for teacher in (task.mim_teacher, task.feature_teacher):
        assert all(not p.requires_grad for p in teacher.parameters())


def test_train_keeps_teachers_in_eval():
    task = _task("student.drop_path_rate=0.1")
    task.train()
    assert task.trainable.training and task.trainable.student.blocks[0].training
    for teacher in (task.mim_teacher, task.feature_teacher):
        assert not teacher.training and not any(m.training for m in teacher.modules())
    task.eval()
    task.train(True)
    assert not task.mim_teacher.training and not task.feature_teacher.training


def test_teachers_are_bit_identical_after_an_optimizer_step():
    task = _task()
    task.train()
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    out = task(_images(4))
    out["loss"].backward()
    for teacher in (task.mim_teacher, task.feature_teacher):
        assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    for name, p in task.named_parameters():
        if name.startswith(("mim_teacher.", "feature_teacher.")):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(task.trainable.student.patch_embed.proj.weight,
                           before["trainable.student.patch_embed.proj.weight"])
    assert not torch.equal(task.trainable.head.weight, before["trainable.head.weight"])


def test_relation_loss_alone_trains_the_student():
    task = _task()
    out = task(_images(2))
    out["relation_loss"].backward()
    blocks = task.trainable.student.blocks
    assert blocks[3].attn.qkv.weight.grad.abs().sum() > 0  # relation block L-3 of the 6-block student
    assert task.trainable.head.weight.grad is None or not task.trainable.head.weight.grad.any()


def test_each_teacher_receives_its_own_normalisation_and_size():
    task = _task()
    assert task.feature_teacher.img_size == 56  # CLIP-style /7 tower: 8x8 grid at 56 px, like CLIP-L/14 at 196
    seen = {}

    def grab(name):
        return lambda module, args: seen.setdefault(name, args[0])

    modules = {"mim": task.mim_teacher.backbone.model.patch_embed.proj,
               "feature": task.feature_teacher.backbone.model.patch_embed.proj,
               "student": task.trainable.student.patch_embed.proj}
    handles = [m.register_forward_pre_hook(grab(name)) for name, m in modules.items()]
    images = _images(2, seed=2)
    try:
        task(images)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(seen["mim"], _normalise(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)  # MAE
    assert seen["feature"].shape == (2, 3, 56, 56)
    assert torch.allclose(seen["feature"], _normalise(images, OPENAI_MEAN, OPENAI_STD, size=56), atol=1e-4)
    # the student: student.mean/std, ImageNet's by default (timm's vit_*_224 tag would say 0.5/0.5)
    assert torch.allclose(seen["student"], _normalise(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
    assert not torch.allclose(seen["mim"], _normalise(images, OPENAI_MEAN, OPENAI_STD), atol=1e-3)


def test_teachers_placed_in_bf16_normalise_with_the_exact_fp32_mean_and_std():
    """Only teacher weights are cast: in bf16 the MAE mean 123.675 would become 123.5, biasing every input."""
    task = _task()
    task.place_teachers(torch.device("cpu"), torch.bfloat16)
    teacher = task.mim_teacher
    assert teacher.backbone.model.patch_embed.proj.weight.dtype == torch.bfloat16
    assert teacher.mean.dtype == teacher.std.dtype == torch.float32
    images = _images(2, seed=3)
    expected = _normalise(images, IMAGENET_MEAN, IMAGENET_STD).to(torch.bfloat16)
    assert torch.equal(teacher.prepare(images), expected)


# ----------------------------------------------------------------------------------------------------------------
# start-up errors


def test_head_count_mismatch_is_a_config_error_mentioning_head_reduce():
    with pytest.raises(ConfigError, match=r"loss\.head_reduce"):
        _task("student.num_heads=2")
    task = _task("student.num_heads=2", "loss.head_reduce=mean")
    out = task(_images(2))
    assert torch.isfinite(out["loss"]) and out["relation_loss"] > 0


def test_unalignable_feature_teacher_is_a_start_up_error():
    with pytest.raises(ConfigError, match=r"feature_teacher\.img_size"):
        _task("feature_teacher.img_size=64")  # /7 patches at 64 px: a 9x9 grid for an 8x8 student


@pytest.mark.parametrize("layers", ["[0,9]", "[4,2]"])
def test_bad_masking_layers_are_a_start_up_error(layers):
    with pytest.raises(ConfigError, match=r"masking\.layers"):
        _task(f"masking.layers={layers}")


# ----------------------------------------------------------------------------------------------------------------
# a real learning signal


def test_overfitting_one_batch_lowers_both_loss_terms():
    """50 AdamW steps on one fixed batch of the tiny preset.

    Measured (torch 2.14, CPU, lr 3e-3): feature 0.320 -> 0.029 (9%), relation 6.3e-4 -> 1.5e-4 (24%), where a
    student with all-zero relations would score 3.2e-4 (relations of random-init teachers are small). Thresholds
    leave about 2x margin.
    """
    task = _task()
    task.train()
    images = _images(8, seed=0)
    targets = task.targets(images)  # teachers are frozen and deterministic: one forward serves every step
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(50):
        out = task.losses(images, targets)
        first = first or {k: v.item() for k, v in out.items()}
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = task.losses(images, targets)
        _, qk = task.trainable(_normalise(images, *(task.trainable.student.pretrained_cfg[k] for k in ("mean", "std"))),
                               targets.keep_idx)
        zero = relation_loss_by_hand([(torch.zeros_like(q), torch.zeros_like(k)) for q, k in qk], targets.mim.qk,
                                     targets.mim.qk_index, task.cfg.loss.relation_beta)
    assert last["feature_loss"].item() < 0.25 * first["feature_loss"]
    assert last["relation_loss"].item() < 0.5 * first["relation_loss"]
    assert last["relation_loss"].item() < 0.8 * zero  # it learned the teacher's relations, not just to shrink its own


# The paper's recipes, built on the meta device (no weights, no download): architecture, grid alignment, masking
# layers and the relation blocks come out as the paper states them.
PAPER_RECIPES = [
    # preset, student (width, depth, heads), MIM depth, masking layers, feature teacher px, feature width
    ("vitb_in1k_deit_mae", (768, 12, 12), 12, [0, 4, 8], 224, 768),
    ("vitb_in1k_clip_mae", (768, 12, 12), 12, [0, 4, 8], 224, 768),
    ("vitl_in21k_clip_mae", (1024, 24, 16), 24, [0, 8, 16], 196, 1024),  # CLIP-L/14 at 196 px: a 14x14 grid
]


@pytest.mark.parametrize("preset, student, mim_depth, layers, feature_px, feature_dim", PAPER_RECIPES)
def test_paper_presets_build_on_the_meta_device(preset, student, mim_depth, layers, feature_px, feature_dim):
    cfg = load_config(preset=preset, overrides=["mim_teacher.weights=random", "feature_teacher.weights=random"])
    with torch.device("meta"):
        task = HybridDistillTask(cfg)
    s = task.trainable.student
    assert (s.embed_dim, len(s.blocks), task.trainable.num_heads) == student
    assert task.trainable.grid_size == (14, 14) and task.feature_teacher.backbone.grid_size == (14, 14)
    assert task.mim_teacher.depth == mim_depth and task.mask_layers == layers
    assert task.trainable.relation_blocks == (student[1] - 3, student[1] - 2)
    assert task.feature_teacher.img_size == feature_px
    assert task.trainable.head.out_features == feature_dim
    assert task.mim_teacher.num_heads == task.trainable.num_heads
