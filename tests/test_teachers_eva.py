"""EVA teachers (timm ``Eva``): RoPE, q/k biases, q/k norm, per-block RoPE, post-norm blocks.

Every expected value is computed here from the modules' own weights (patch conv, position embedding, pre-norm,
q/k projections and biases, q/k norm) with timm's ``apply_rot_embed_cat`` on the patch tokens, or with timm's
own forward, never through ``hybrid_distill.model.teachers``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from model_testlib import liven, random_images
from timm.layers import AttentionRope, LayerNorm, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlockPostNorm

from hybrid_distill.config import TeacherConfig
from hybrid_distill.model.masking import progressive_keep_indices
from hybrid_distill.model.qk_capture import capture_qk, qk_from_input
from hybrid_distill.model.teachers import EvaBackbone, build_teacher

TINY = dict(embed_dim=32, depth=6, num_heads=2, patch_size=8)  # 64 px -> 8x8 patches, 2 heads of 16
MODELS = {
    "eva02": "eva02_base_patch14_224.mim_in22k",  # RoPE (cat), q_proj (bias) / k_proj (no bias), SwiGLU
    "eva01": "eva_giant_patch14_224.clip_ft_in1k",  # no RoPE, fused qkv without bias + q_bias / v_bias
    "rope_mixed": "vit_small_patch16_rope_mixed_224.naver_in1k",  # AttentionRope, one RoPE per block
    "post_norm": "eva02_enormous_patch14_clip_224.laion2b",  # EvaBlockPostNorm: attention sees x itself
}
DINOV3 = "vit_small_patch16_dinov3.lvd1689m"  # CLS + 4 registers (not rotated), DINOv3 RoPE

pytestmark = pytest.mark.usefixtures("one_thread")


def _normalise(images, model):
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _teacher(kind, role="mim_teacher", seed=1):
    teacher = build_teacher(TeacherConfig(model=MODELS.get(kind, kind), **TINY), role, (8, 8), 64)
    assert isinstance(teacher.backbone, EvaBackbone)
    liven(teacher.backbone.model, seed=seed)
    return teacher, teacher.backbone.model


# ----------------------------------------------------------------------------------------------------------------
# by-hand forward passes


def embed(model, x):
    p = model.patch_embed.proj
    t = F.conv2d(x, p.weight, p.bias, stride=p.stride).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
    if model.pos_embed is not None:
        t = t + model.pos_embed
    return model.norm_pre(t)


def block_rope(model, i):
    """The rotary embedding block ``i`` gets for the full patch grid (``None`` without RoPE)."""
    if model.rope is None:
        return None
    rope = model.rope.get_embed()
    return rope[i] if model.rope_mixed else rope


def _linear(h, weight, bias):
    return h @ weight.T + (bias if bias is not None else 0)


def eva_qk(model, i, x_in, rope):
    """q, k (B, H, N, d) of block ``i``: pre-norm, projections + biases, q/k norm, RoPE on the patch tokens."""
    blk = model.blocks[i]
    attn = blk.attn
    h = x_in if isinstance(blk, EvaBlockPostNorm) else blk.norm1(x_in)
    H, d = attn.num_heads, attn.head_dim
    A = H * d
    if attn.qkv is not None:
        W, b = attn.qkv.weight, attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention: bias-free qkv, separate q_bias, k_bias = 0
            b = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        q_bias, k_bias = (None, None) if b is None else (b[:A], b[A:2 * A])
        q, k = _linear(h, W[:A], q_bias), _linear(h, W[A:2 * A], k_bias)
    else:
        q, k = _linear(h, attn.q_proj.weight, attn.q_proj.bias), _linear(h, attn.k_proj.weight, attn.k_proj.bias)
    q = attn.q_norm(q.reshape(*h.shape[:2], H, d).transpose(1, 2))
    k = attn.k_norm(k.reshape(*h.shape[:2], H, d).transpose(1, 2))
    if rope is not None:
        P = model.num_prefix_tokens
        q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=attn.rotate_half)], dim=2)
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=attn.rotate_half)], dim=2)
    return q, k


def run_blocks(model, x):
    inputs, outputs = [], []
    for i, blk in enumerate(model.blocks):
        inputs.append(x)
        x = blk(x, rope=block_rope(model, i))
        outputs.append(x)
    return inputs, outputs


def relations(q, k, rows):
    """(H, n, n) float64 q[rows] k[rows]^T / sqrt(d) for one image."""
    q, k = q.double()[:, rows], k.double()[:, rows]
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


def close(a, b):
    """fp32 agreement relative to the tensor's scale (post-norm blocks carry activations ~30, and rounding grows
    through them: the teacher normalises the uint8 crop in another order than ``_normalise``)."""
    return torch.allclose(a, b, atol=5e-5 * (1.0 + b.abs().max().item()), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# relation targets, masking, features


@pytest.mark.parametrize("kind", list(MODELS))
def test_relation_targets_and_mask_equal_a_by_hand_forward(kind):
    teacher, model = _teacher(kind)
    assert (teacher.num_heads, teacher.head_dim) == (2, 16)
    images = random_images(2, 64, seed=3)
    targets = teacher.mim_targets(images, 0.3, [0, 2, 4])
    with torch.no_grad():
        inputs, outputs = run_blocks(model, embed(model, _normalise(images, model)))
        keep = progressive_keep_indices([outputs[0], outputs[2], outputs[4]], 0.3)  # scores block *outputs*
        assert keep.shape == (2, 1 + 22)
        assert torch.equal(targets.keep_idx, keep)
        for (q_t, k_t), index, i in zip(targets.qk, targets.qk_index, (3, 4), strict=True):  # blocks L-3, L-2
            q, k = eva_qk(model, i, inputs[i], block_rope(model, i))
            assert q_t.shape == q.shape == (2, 2, 65, 16)
            assert close(q_t, q) and close(k_t, k)
            if model.rope is not None:  # the rotation is part of the relation
                assert not torch.allclose(q_t, eva_qk(model, i, inputs[i], None)[0], atol=1e-2)
            assert torch.equal(index, keep)
            for b in range(2):
                assert close(relations(q_t[b], k_t[b], index[b].tolist()), relations(q[b], k[b], keep[b].tolist()))


@pytest.mark.parametrize("kind", ["eva02", "eva01", "post_norm"])  # post_norm pools `token`: a real final norm
def test_feature_targets_equal_timm_forward_features(kind):
    teacher, model = _teacher(kind, role="feature_teacher", seed=7)
    images = random_images(2, 64, seed=8)
    with torch.no_grad():
        x = _normalise(images, model)
        want = model.forward_features(x)  # timm's own forward: blocks with RoPE, then the final norm
        _, outputs = run_blocks(model, embed(model, x))
    assert want.shape == (2, 65, 32)
    assert close(teacher.feature_targets(images, "norm"), want)
    assert close(teacher.feature_targets(images, "prenorm"), outputs[-1])


@pytest.mark.parametrize("kind", [*MODELS, DINOV3])
def test_qk_only_shortcut_equals_capture_during_a_full_block_run(kind):
    teacher, model = _teacher(kind, seed=9)
    images = random_images(2, 64, seed=10)
    mlp_calls = []
    handle = model.blocks[4].mlp.register_forward_hook(lambda *_: mlp_calls.append(1))
    try:
        targets = teacher.mim_targets(images, 0.3, [0, 1, 2])  # last needed block 4 is not a masking block
    finally:
        handle.remove()
    assert not mlp_calls  # block 4 only gave its q, k
    with torch.no_grad(), capture_qk(model.blocks, [4]) as qk:
        model.forward_features(_normalise(images, model))  # timm's forward: block 4 runs its fused attention
    (q_t, k_t), (q, k) = targets.qk[1], qk[4]
    P = model.num_prefix_tokens
    q, k = (torch.cat([t[:, :, :1], t[:, :, P:]], dim=2) for t in (q, k))  # relations cover CLS + patches only
    assert q_t.shape == (2, 2, 65, 16)
    assert close(q_t, q) and close(k_t, k)


@pytest.mark.parametrize("kind", ["eva02", "rope_mixed"])
def test_teacher_prunes_rotates_each_kept_token_by_its_own_position(kind):
    teacher, model = _teacher(kind, seed=11)
    images = random_images(2, 64, seed=12)
    pruned = teacher.mim_targets(images, 0.3, [0, 2, 4], prunes=True)
    assert pruned.keep_idx.shape == (2, 23)
    with torch.no_grad():
        for b in range(2):  # PCAE-style by hand, one image at a time: RoPE rows of the kept patches only
            x = embed(model, _normalise(images[b:b + 1], model))
            seq = torch.arange(65)  # full-sequence position of each token of x
            seen = {}
            for i, blk in enumerate(model.blocks[:5]):
                rope = block_rope(model, i)[..., seq[1:] - 1, :]
                if i in (3, 4):
                    seen[i] = (seq, eva_qk(model, i, x, rope), x, rope)
                x = blk(x, rope=rope)
                if i in (0, 2, 4):
                    local = progressive_keep_indices([x], 0.3)[0]
                    x, seq = x[:, local], seq[local]
            assert torch.equal(pruned.keep_idx[b], seq)
            for (q_t, k_t), index, i in zip(pruned.qk, pruned.qk_index, (3, 4), strict=True):
                seq_in, (q, k), x_in, rope = seen[i]
                assert q_t.shape[2] == seq_in.shape[0]
                assert close(q_t[b], q[0]) and close(k_t[b], k[0])
                assert torch.equal(seq_in[index[b]], pruned.keep_idx[b])
                first_rows = block_rope(model, i)[..., : seq_in.shape[0] - 1, :]  # the wrong rows: not the kept ones
                assert not torch.allclose(q_t[b], eva_qk(model, i, x_in, first_rows)[0][0], atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# q, k capture on the attention modules themselves


ATTENTIONS = {
    "eva_fused_bias": lambda: EvaAttention(32, 2, qkv_fused=True, qk_norm=True, norm_layer=LayerNorm,
                                           scale_norm=False),
    "eva_fused_bias_separate_half": lambda: EvaAttention(32, 2, qkv_fused=True, qkv_bias_separate=True,
                                                         rotate_half=True, scale_norm=False),
    "eva_separate": lambda: EvaAttention(32, 2, qkv_fused=False, qk_norm=True, norm_layer=LayerNorm,
                                         scale_norm=False),
    "rope_fused": lambda: AttentionRope(32, 2, qkv_fused=True, qk_norm=True, norm_layer=LayerNorm),
    "rope_gqa": lambda: AttentionRope(32, 4, qkv_fused=False, num_kv_heads=2),
}


def _v_by_hand(attn, x):
    """v (B, H, N, d) from the weights, kv heads expanded as the attention does."""
    A, B, N = attn.num_heads * attn.head_dim, *x.shape[:2]
    if attn.qkv is not None:
        bias = getattr(attn, "v_bias", None) if hasattr(attn, "q_bias") else attn.qkv.bias[2 * A:]
        v = _linear(x, attn.qkv.weight[2 * A:], bias)
    else:
        v = _linear(x, attn.v_proj.weight, attn.v_proj.bias)
    v = v.reshape(B, N, -1, attn.head_dim).transpose(1, 2)
    return v.repeat_interleave(attn.num_heads // v.shape[1], dim=1)


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_captured_qk_are_the_ones_the_attention_softmaxes(name):
    torch.manual_seed(0)
    attn = ATTENTIONS[name]().eval()
    liven(attn, seed=13)
    B, N, P = 2, 1 + 9, attn.num_prefix_tokens
    x = torch.randn(B, N, 32)
    angles = torch.rand(N - P, attn.head_dim) * 6.0
    rope = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (patches, 2 d): sin | cos
    with torch.no_grad(), capture_qk([SimpleNamespace(attn=attn)], [0]) as qk:
        out = attn(x, rope=rope)
    q, k = qk[0]
    assert q.shape == k.shape == (B, attn.num_heads, N, attn.head_dim)
    with torch.no_grad():
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim), dim=-1)
        want = attn.proj((weights @ _v_by_hand(attn, x)).transpose(1, 2).reshape(B, N, -1))
        assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)  # relation = the attention's own logits
        q2, k2 = qk_from_input(attn, x, rope)
        assert torch.equal(q, q2) and torch.equal(k, k2)
