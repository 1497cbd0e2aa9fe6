"""Frozen teachers (docs/algorithm.md): relation targets, masking, grid alignment, features, checkpoints.

Every expected value is computed here from the module's own weights (patch conv, position embeddings, pre-norm,
qkv / in_proj weights) or with timm's / open_clip's own forward, never through ``hybrid_distill.model.teachers``.
"""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from model_testlib import liven, random_images
from safetensors.torch import save_file

from hybrid_distill.config import ConfigError, TeacherConfig
from hybrid_distill.errors import WeightsError
from hybrid_distill.model.masking import progressive_keep_indices
from hybrid_distill.model.teachers import build_teacher, open_clip_mean_std

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

MAE = dict(model="vit_base_patch16_224.mae", embed_dim=32, depth=6, num_heads=2, patch_size=8)
CLIP_TOWER = dict(model="vit_base_patch16_clip_224.openai", embed_dim=32, depth=2, num_heads=2)
TINY_CLIP = "hd-tiny-clip"  # open_clip: 64 px, /8, width 64, 4 heads of 16, depth 6
TINY_CLIP14 = "hd-tiny-clip14"  # open_clip: 224 px, /14, width 32, 2 heads, depth 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_configs(tmp_path_factory):
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    configs = {
        TINY_CLIP: {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 6, "width": 64, "head_width": 16,
                                                     "patch_size": 8}, "text_cfg": text},
        TINY_CLIP14: {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
                                                       "patch_size": 14}, "text_cfg": text},
    }
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    assert TINY_CLIP in open_clip.list_models()


def _normalise(images, mean, std, size=None):
    x = images.float()
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# by-hand forward passes


def timm_embed(model, x):
    p = model.patch_embed.proj
    t = F.conv2d(x, p.weight, p.bias, stride=p.stride).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + model.pos_embed
    return model.norm_pre(t)


def open_clip_embed(visual, x):
    t = F.conv2d(x, visual.conv1.weight, visual.conv1.bias, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls, t], dim=1) + visual.positional_embedding)


def timm_qk(block, x_in):
    h = block.norm1(x_in)
    D, H = h.shape[-1], block.attn.num_heads
    W, b = block.attn.qkv.weight, block.attn.qkv.bias
    q = (h @ W[:D].T + b[:D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
    k = (h @ W[D:2 * D].T + b[D:2 * D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
    return q, k


def open_clip_qk(block, x_in):
    h = block.ln_1(x_in)
    D, H = h.shape[-1], block.attn.num_heads
    W, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = (h @ W[:D].T + b[:D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
    k = (h @ W[D:2 * D].T + b[D:2 * D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
    return q, k


def run_blocks(blocks, x):
    inputs, outputs = [], []
    for blk in blocks:
        inputs.append(x)
        x = blk(x)
        outputs.append(x)
    return inputs, outputs


def relations(q, k, rows):
    """(H, n, n) float64 q[rows] k[rows]^T / sqrt(d) for one image."""
    q, k = q.double()[:, rows], k.double()[:, rows]
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def _mim_teacher(library):
    if library == "timm":
        teacher = build_teacher(TeacherConfig(**MAE), "mim_teacher", (8, 8), 64)
        liven(teacher.backbone.model, seed=1)
        model = teacher.backbone.model
        return teacher, model, model.blocks, IMAGENET_MEAN, IMAGENET_STD, timm_embed, timm_qk
    teacher = build_teacher(TeacherConfig(library="open_clip", model=TINY_CLIP), "mim_teacher", (8, 8), 64)
    liven(teacher.backbone.model, seed=2)
    visual = teacher.backbone.model
    return teacher, visual, visual.transformer.resblocks, OPENAI_MEAN, OPENAI_STD, open_clip_embed, open_clip_qk


# ----------------------------------------------------------------------------------------------------------------
# relation targets and masking


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_relation_targets_and_mask_equal_a_by_hand_forward(library):
    teacher, model, blocks, mean, std, embed, qk_fn = _mim_teacher(library)
    assert teacher.img_size == 64 and teacher.depth == 6
    images = random_images(2, 64, seed=3)
    targets = teacher.mim_targets(images, 0.3, [0, 2, 4])
    with torch.no_grad():
        inputs, outputs = run_blocks(blocks, embed(model, _normalise(images, mean, std)))
        # Eq. 4 scores the full-sequence *outputs* of the masking blocks
        keep = progressive_keep_indices([outputs[0], outputs[2], outputs[4]], 0.3)
        assert keep.shape == (2, 1 + 22)  # 64 -> 45 -> 32 -> 22 patches + CLS
        assert torch.equal(targets.keep_idx, keep)
        # the scoring was not a no-op: other layers would choose other tokens
        assert not torch.equal(progressive_keep_indices([outputs[1], outputs[3], outputs[5]], 0.3), keep)
        assert len(targets.qk) == 2
        for (q_t, k_t), index, block in zip(targets.qk, targets.qk_index, (3, 4), strict=True):  # blocks L-3, L-2
            q, k = qk_fn(blocks[block], inputs[block])
            assert q_t.shape == q.shape == (2, teacher.num_heads, 65, teacher.head_dim)
            assert torch.allclose(q_t, q, atol=1e-4, rtol=1e-4) and torch.allclose(k_t, k, atol=1e-4, rtol=1e-4)
            assert torch.equal(index, keep)
            for b in range(2):
                want = relations(q[b], k[b], keep[b].tolist())  # R[keep][:, keep] over CLS + patches
                got = relations(q_t[b], k_t[b], index[b].tolist())
                assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_relation_blocks_differ_from_neighbouring_blocks():
    teacher, model, blocks, mean, std, embed, qk_fn = _mim_teacher("timm")
    images = random_images(1, 64, seed=4)
    targets = teacher.mim_targets(images, 0.3, [0, 2, 4])
    with torch.no_grad():
        inputs, _ = run_blocks(blocks, embed(model, _normalise(images, mean, std)))
        q5, _ = qk_fn(blocks[5], inputs[5])  # the last block is not a relation block
        q2, _ = qk_fn(blocks[2], inputs[2])
    assert not torch.allclose(targets.qk[1][0], q5, atol=1e-3)
    assert not torch.allclose(targets.qk[0][0], q2, atol=1e-3)


def test_teacher_prunes_continues_on_kept_tokens_only():
    teacher, model, blocks, mean, std, embed, qk_fn = _mim_teacher("timm")
    images = random_images(2, 64, seed=5)
    full = teacher.mim_targets(images, 0.3, [0, 2, 4], prunes=False)
    pruned = teacher.mim_targets(images, 0.3, [0, 2, 4], prunes=True)
    assert pruned.keep_idx.shape == full.keep_idx.shape == (2, 23)
    with torch.no_grad():  # PCAE-style by hand: after each masking block the sequence is CLS + kept patches
        x = embed(model, _normalise(images, mean, std))
        seq = torch.arange(65).expand(2, -1)  # full-sequence position of each token of x
        seen = {}
        for i, blk in enumerate(blocks[:5]):
            if i in (3, 4):
                seen[i] = (seq, qk_fn(blk, x))
            x = blk(x)
            if i in (0, 2, 4):
                local = progressive_keep_indices([x], 0.3)  # (B, 1 + n') positions within the current sequence
                x = torch.stack([x[b, local[b]] for b in range(2)])
                seq = torch.stack([seq[b, local[b]] for b in range(2)])
    assert torch.equal(pruned.keep_idx, seq)
    for (q_t, k_t), index, block in zip(pruned.qk, pruned.qk_index, (3, 4), strict=True):
        seq_in, (q, k) = seen[block]
        assert q_t.shape == q.shape and q_t.shape[2] == seq_in.shape[1]
        assert torch.allclose(q_t, q, atol=1e-4, rtol=1e-4) and torch.allclose(k_t, k, atol=1e-4, rtol=1e-4)
        assert (index >= 0).all() and (index < q_t.shape[2]).all()
        assert torch.equal(torch.stack([seq_in[b, index[b]] for b in range(2)]), pruned.keep_idx)
        rel = torch.stack([relations(q_t[b], k_t[b], index[b].tolist()) for b in range(2)])
        assert rel.shape == (2, 2, 23, 23)


def test_register_tokens_are_never_scored_and_are_left_out_of_keep_idx_and_relations():
    """A DINOv2-style teacher with 4 registers: keep_idx and relations live on CLS + patches (the student's grid)."""
    cfg = TeacherConfig(model="vit_small_patch14_reg4_dinov2.lvd142m", embed_dim=32, depth=6, num_heads=2,
                        patch_size=8)
    teacher = build_teacher(cfg, "mim_teacher", (8, 8), 64)
    model = teacher.backbone.model
    liven(model, seed=14)
    P = model.num_prefix_tokens
    assert P == 5
    images = random_images(2, 64, seed=15)
    inputs, outputs = {}, {}

    def record(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[0], out
        return hook

    handles = [blk.register_forward_hook(record(i)) for i, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model.forward_features(_normalise(images, IMAGENET_MEAN, IMAGENET_STD))  # timm's own forward
    finally:
        for h in handles:
            h.remove()
    targets = teacher.mim_targets(images, 0.3, [0, 2, 4])
    full = progressive_keep_indices([outputs[0], outputs[2], outputs[4]], 0.3, num_prefix_tokens=P)  # (B, P + 22)
    want_keep = torch.cat([full[:, :1], full[:, P:] - (P - 1)], dim=1)  # CLS, then patch j at 1 + j
    assert torch.equal(targets.keep_idx, want_keep)
    cls_and_patches = [0] + list(range(P, P + 64))
    with torch.no_grad():
        for (q_t, k_t), index, block in zip(targets.qk, targets.qk_index, (3, 4), strict=True):
            q, k = timm_qk(model.blocks[block], inputs[block])
            assert q_t.shape == (2, 2, 65, 16)
            for b in range(2):
                rows = [cls_and_patches[j] for j in want_keep[b].tolist()]
                want = relations(q[b], k[b], rows)
                assert torch.allclose(relations(q_t[b], k_t[b], index[b].tolist()), want, atol=1e-4, rtol=1e-4)


def test_mim_teacher_defaults_to_all_patches_when_nothing_is_dropped():
    teacher, *_ = _mim_teacher("timm")
    targets = teacher.mim_targets(random_images(1, 64), 0.0, [0, 2, 4])
    assert targets.keep_idx.tolist() == [list(range(65))]


# ----------------------------------------------------------------------------------------------------------------
# freezing and normalisation


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_teacher_is_frozen_and_stays_in_eval(library):
    teacher, *_ = _mim_teacher(library)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    targets = teacher.mim_targets(random_images(1, 64), 0.3, [0, 2, 4])
    assert not targets.qk[0][0].requires_grad


@pytest.mark.parametrize("library, first, mean, std", [
    ("timm", "patch_embed.proj", IMAGENET_MEAN, IMAGENET_STD),
    ("open_clip", "conv1", OPENAI_MEAN, OPENAI_STD),
])
def test_teacher_normalises_with_its_own_mean_and_std(library, first, mean, std):
    teacher, model, *_ = _mim_teacher(library)
    seen = []
    handle = model.get_submodule(first).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = random_images(2, 64, seed=6)
    try:
        teacher.mim_targets(images, 0.3, [0, 2, 4])
    finally:
        handle.remove()
    assert torch.allclose(seen[0], _normalise(images, mean, std), atol=1e-5)


def _tiny_visual():
    return open_clip.create_model(TINY_CLIP).visual


def test_open_clip_mean_and_std_follow_the_pretrained_tag():
    """open_clip normalises per (model, tag): LAION ViT-L-14 uses 0.5/0.5, not OpenAI's values."""
    cfg = TeacherConfig(library="open_clip", model="ViT-L-14", pretrained_tag="laion2b_s32b_b82k")  # a local copy
    assert open_clip_mean_std(cfg, _tiny_visual()) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    openai = TeacherConfig(library="open_clip", model="ViT-L-14", pretrained_tag="openai")
    assert open_clip_mean_std(openai, _tiny_visual()) == (OPENAI_MEAN, OPENAI_STD)
    assert open_clip_mean_std(TeacherConfig(library="open_clip", model=TINY_CLIP), _tiny_visual()) == (
        OPENAI_MEAN, OPENAI_STD)  # no tag, random weights: open_clip's default


def test_open_clip_downloaded_weights_use_the_normalisation_open_clip_attached():
    visual = _tiny_visual()
    open_clip.set_model_preprocess_cfg(visual, {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)})  # as create_model
    cfg = TeacherConfig(library="open_clip", model=TINY_CLIP, weights="pretrained", pretrained_tag="hub-tag")
    assert open_clip_mean_std(cfg, visual) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    explicit = TeacherConfig(library="open_clip", model=TINY_CLIP, mean=(0.7, 0.7, 0.7), std=(0.2, 0.2, 0.2))
    assert open_clip_mean_std(explicit, visual) == ((0.7, 0.7, 0.7), (0.2, 0.2, 0.2))


def test_unknown_open_clip_tag_is_a_config_error_listing_the_known_tags():
    cfg = TeacherConfig(library="open_clip", model="ViT-L-14", pretrained_tag="laion9b")
    with pytest.raises(ConfigError, match=r"laion9b.*ViT-L-14.*laion2b_s32b_b82k"):
        open_clip_mean_std(cfg, _tiny_visual())


# ----------------------------------------------------------------------------------------------------------------
# grid alignment


def _clip14_teacher(library, **kwargs):
    if library == "timm":
        cfg = TeacherConfig(**CLIP_TOWER, patch_size=14, **kwargs)
    else:
        cfg = TeacherConfig(library="open_clip", model=TINY_CLIP14, **kwargs)
    return build_teacher(cfg, "feature_teacher", (14, 14), 224)


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_patch14_teacher_for_a_16px_student_at_224_sees_196px_on_a_14x14_grid(library):
    teacher = _clip14_teacher(library)
    assert teacher.img_size == 196
    assert tuple(teacher.backbone.grid_size) == (14, 14)
    model = teacher.backbone.model
    pos = model.pos_embed if library == "timm" else model.positional_embedding
    assert pos.shape[-2] == 1 + 14 * 14  # position embedding built for the 196 px grid
    feats = teacher.feature_targets(random_images(1, 224))
    assert feats.shape == (1, 1 + 196, teacher.feature_dim())


@pytest.mark.parametrize("library", ["timm", "open_clip"])
def test_teacher_tokens_line_up_with_the_student_grid(library):
    """Changing the pixels of student patch (r, c) changes only teacher patch token (r, c)."""
    teacher = _clip14_teacher(library)
    model = teacher.backbone.model
    embed = model.patch_embed if library == "timm" else model.conv1
    seen = []
    handle = embed.register_forward_hook(lambda m, args, out: seen.append(out.flatten(2).transpose(1, 2)
                                                                        if out.dim() == 4 else out))
    images = random_images(1, 224, seed=7)
    r, c = 3, 9
    other = images.clone()
    other[..., 16 * r + 4:16 * r + 12, 16 * c + 4:16 * c + 12] = 255 - other[..., 16 * r + 4:16 * r + 12,
                                                                            16 * c + 4:16 * c + 12]
    try:
        teacher.feature_targets(images)
        teacher.feature_targets(other)
    finally:
        handle.remove()
    changed = (seen[0] - seen[1]).abs().amax(-1)[0]  # (196,) patch tokens
    assert changed.shape == (196,)
    assert changed.nonzero().flatten().tolist() == [r * 14 + c]


def test_explicit_mismatching_img_size_is_a_start_up_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"feature_teacher\.img_size"):
        _clip14_teacher("timm", img_size=224)
    assert _clip14_teacher("timm", img_size=196).img_size == 196  # the aligned size is accepted


def test_mim_teacher_cannot_resample():
    from hybrid_distill.config import load_config

    with pytest.raises(ConfigError, match=r"mim_teacher\.grid_align"):
        load_config("tiny", overrides=["mim_teacher.grid_align=resample"])


@pytest.mark.parametrize("patch, antialias", [(16, False), (4, True)])  # 4x4 -> 8x8 and 16x16 -> 8x8
def test_resample_maps_the_teacher_token_map_onto_the_student_grid(patch, antialias):
    cfg = TeacherConfig(model="vit_base_patch16_224.augreg_in21k", embed_dim=32, depth=2, num_heads=2,
                        patch_size=patch, grid_align="resample")
    teacher = build_teacher(cfg, "feature_teacher", (8, 8), 64)
    model = teacher.backbone.model
    liven(model, seed=8)
    assert teacher.img_size == 64
    grid = 64 // patch
    images = random_images(2, 64, seed=9)
    with torch.no_grad():
        tokens = model.forward_features(_normalise(images, model.pretrained_cfg["mean"], model.pretrained_cfg["std"]))
    maps = tokens[:, 1:].transpose(1, 2).reshape(2, 32, grid, grid)
    # upsampling: plain bilinear (antialias changes nothing); downsampling: antialiased bilinear
    want = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False, antialias=antialias)
    got = teacher.feature_targets(images)
    assert got.shape == (2, 65, 32)
    assert torch.allclose(got[:, 0], tokens[:, 0], atol=1e-5)  # CLS untouched
    assert torch.allclose(got[:, 1:], want.flatten(2).transpose(1, 2), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# feature targets


def test_feature_targets_after_norm_before_norm_and_after_projection_timm():
    teacher = build_teacher(TeacherConfig(**CLIP_TOWER, patch_size=8), "feature_teacher", (8, 8), 64)
    model = teacher.backbone.model
    liven(model, seed=10)
    images = random_images(2, 64, seed=11)
    x = _normalise(images, OPENAI_MEAN, OPENAI_STD)
    with torch.no_grad():
        _, outputs = run_blocks(model.blocks, timm_embed(model, x))
        last = outputs[-1]
        pooled = model(x)  # timm's own CLIP image embedding: head(norm(tokens))[CLS]
    assert torch.allclose(teacher.feature_targets(images, "prenorm"), last, atol=1e-5)
    assert torch.allclose(teacher.feature_targets(images, "norm"), model.norm(last), atol=1e-5)
    proj = teacher.feature_targets(images, "proj")
    assert proj.shape == (2, 65, model.head.out_features) and teacher.feature_dim("proj") == model.head.out_features
    assert torch.allclose(proj[:, 0], pooled, atol=1e-4, rtol=1e-4)


def test_feature_targets_after_norm_before_norm_and_after_projection_open_clip():
    teacher = build_teacher(TeacherConfig(library="open_clip", model=TINY_CLIP), "feature_teacher", (8, 8), 64)
    visual = teacher.backbone.model
    liven(visual, seed=12)
    images = random_images(2, 64, seed=13)
    x = _normalise(images, OPENAI_MEAN, OPENAI_STD)
    with torch.no_grad():
        _, outputs = run_blocks(visual.transformer.resblocks, open_clip_embed(visual, x))
        last = outputs[-1]
        pooled = visual(x)  # open_clip's own image embedding: ln_post(CLS) @ proj
    assert torch.allclose(teacher.feature_targets(images, "prenorm"), last, atol=1e-5)
    assert torch.allclose(teacher.feature_targets(images, "norm"), visual.ln_post(last), atol=1e-5)
    proj = teacher.feature_targets(images, "proj")
    assert proj.shape == (2, 65, 32) and teacher.feature_dim("proj") == 32 and teacher.feature_dim() == 64
    assert torch.allclose(proj[:, 0], pooled, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints in upstream formats


def _random_state_dict(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def _timm_mae(depth=3, img_size=64):
    kwargs = {**MAE, "depth": depth}
    name = kwargs.pop("model")
    return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)


def _loaded(cfg, role="mim_teacher", grid=(8, 8), img=64):
    return build_teacher(cfg, role, grid, img).backbone.model.state_dict()


def _assert_state_equal(loaded, saved):
    assert set(loaded) <= set(saved)
    for k, v in loaded.items():
        assert torch.equal(v, saved[k]), k


def test_official_mae_release_checkpoint_loads_ignoring_the_decoder(tmp_path):
    sd = _random_state_dict(_timm_mae(), seed=20)
    g = torch.Generator().manual_seed(21)
    decoder = {"mask_token": torch.randn(1, 1, 16, generator=g), "decoder_embed.weight": torch.randn(16, 32),
               "decoder_embed.bias": torch.randn(16), "decoder_pos_embed": torch.randn(1, 65, 16),
               "decoder_blocks.0.norm1.weight": torch.randn(16),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
               "decoder_norm.weight": torch.randn(16), "decoder_pred.weight": torch.randn(192, 16)}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**sd, **decoder}, "epoch": 799}, path)
    loaded = _loaded(TeacherConfig(**{**MAE, "depth": 3}, weights=str(path)))
    assert set(loaded) == set(sd)
    _assert_state_equal(loaded, sd)


def test_mae_training_checkpoint_with_its_argparse_namespace_loads(tmp_path):
    import argparse

    sd = _random_state_dict(_timm_mae(), seed=22)
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4)}, path)
    _assert_state_equal(_loaded(TeacherConfig(**{**MAE, "depth": 3}, weights=str(path))), sd)


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "ddp", "safetensors"])
def test_timm_state_dict_checkpoints_load_bit_identically(tmp_path, fmt):
    sd = _random_state_dict(_timm_mae(), seed=22)
    if fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "model.pth"
        payload = {"pth": sd, "wrapped": {"state_dict": sd}, "ddp": {f"module.{k}": v for k, v in sd.items()}}[fmt]
        torch.save(payload, path)
    _assert_state_equal(_loaded(TeacherConfig(**{**MAE, "depth": 3}, weights=str(path))), sd)


def test_timm_checkpoint_at_another_resolution_gets_its_position_embedding_resampled(tmp_path):
    name, kwargs = CLIP_TOWER["model"], {k: v for k, v in CLIP_TOWER.items() if k != "model"}
    sd = _random_state_dict(timm.create_model(name, pretrained=False, img_size=64, patch_size=8, **kwargs), 23)
    path = tmp_path / "clip_tower.pth"
    torch.save(sd, path)
    loaded = _loaded(TeacherConfig(**CLIP_TOWER, patch_size=8, weights=str(path)), "feature_teacher", (4, 4), 32)
    pos = sd["pos_embed"]  # (1, 1 + 64, D) -> (1, 1 + 16, D)
    grid = F.interpolate(pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                         antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    assert loaded["pos_embed"].shape == (1, 17, 32)
    assert torch.equal(loaded["pos_embed"][:, :1], pos[:, :1])
    assert torch.allclose(loaded["pos_embed"][:, 1:], grid, atol=1e-5)
    _assert_state_equal({k: v for k, v in loaded.items() if k != "pos_embed"}, sd)


def _open_clip_state_dict(seed, image_size=None):
    kwargs = {"force_image_size": image_size} if image_size else {}
    return _random_state_dict(open_clip.create_model(TINY_CLIP, **kwargs), seed)


@pytest.mark.parametrize("wrapped", [True, False])
def test_open_clip_checkpoint_loads(tmp_path, wrapped):
    sd = _open_clip_state_dict(24)
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": sd, "epoch": 32} if wrapped else sd, path)
    loaded = _loaded(TeacherConfig(library="open_clip", model=TINY_CLIP, weights=str(path)))
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    assert set(loaded) == set(visual)
    _assert_state_equal(loaded, visual)


def test_open_clip_checkpoint_at_another_image_size_resizes_the_position_embedding(tmp_path):
    sd = _open_clip_state_dict(25)  # 64 px: 8x8 grid
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": sd}, path)
    loaded = _loaded(TeacherConfig(library="open_clip", model=TINY_CLIP, weights=str(path)), grid=(4, 4), img=32)
    pos = sd["visual.positional_embedding"]  # (1 + 64, D) -> (1 + 16, D)
    grid = F.interpolate(pos[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                         antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(16, -1)
    assert loaded["positional_embedding"].shape == (17, 64)
    assert torch.equal(loaded["positional_embedding"][:1], pos[:1])
    assert torch.allclose(loaded["positional_embedding"][1:], grid, atol=1e-5)
    assert torch.equal(loaded["conv1.weight"], sd["visual.conv1.weight"])


def test_open_clip_force_quick_gelu_is_passed_through():
    teacher = build_teacher(TeacherConfig(library="open_clip", model=TINY_CLIP, force_quick_gelu=True),
                            "feature_teacher", (8, 8), 64)
    act = teacher.backbone.model.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsError) as e:
        build_teacher(TeacherConfig(**MAE, weights=str(path)), "mim_teacher", (8, 8), 64)
    assert str(path) in str(e.value)


def test_missing_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError) as e:
        build_teacher(TeacherConfig(**MAE, weights=str(path)), "mim_teacher", (8, 8), 64)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("saved_depth, built_depth, named", [(4, 3, "unexpected"), (3, 4, "missing")])
def test_wrong_depth_checkpoint_names_the_file_and_the_keys(tmp_path, saved_depth, built_depth, named):
    path = tmp_path / "mae.pth"
    torch.save({"model": _timm_mae(depth=saved_depth).state_dict()}, path)
    with pytest.raises(WeightsError) as e:
        build_teacher(TeacherConfig(**{**MAE, "depth": built_depth}, weights=str(path)), "mim_teacher", (8, 8), 64)
    message = str(e.value)
    assert str(path) in message and named in message
    assert "blocks.3.attn.qkv.weight" in message


def test_wrong_width_checkpoint_names_the_shape_mismatches(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save(timm.create_model("vit_base_patch16_224.mae", embed_dim=48, depth=3, num_heads=2, patch_size=8,
                                 img_size=64).state_dict(), path)
    with pytest.raises(WeightsError) as e:
        build_teacher(TeacherConfig(**{**MAE, "depth": 3}, weights=str(path)), "mim_teacher", (8, 8), 64)
    assert str(path) in str(e.value) and "blocks.0.attn.qkv.weight" in str(e.value)


def test_open_clip_checkpoint_with_missing_keys_names_them(tmp_path):
    sd = _open_clip_state_dict(26)
    del sd["visual.ln_post.weight"]
    path = tmp_path / "clip.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        build_teacher(TeacherConfig(library="open_clip", model=TINY_CLIP, weights=str(path)), "mim_teacher",
                      (8, 8), 64)
    assert str(path) in str(e.value) and "visual.ln_post.weight" in str(e.value)


def test_timm_checkpoint_given_to_an_open_clip_teacher_is_rejected(tmp_path):
    path = tmp_path / "timm.pth"
    torch.save(_timm_mae().state_dict(), path)
    with pytest.raises(WeightsError, match="visual"):
        build_teacher(TeacherConfig(library="open_clip", model=TINY_CLIP, weights=str(path)), "mim_teacher",
                      (8, 8), 64)
