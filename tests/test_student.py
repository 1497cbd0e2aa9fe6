"""The kept-token student (docs/algorithm.md): same maths as running its timm blocks by hand on the gathered tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from hybrid_distill.config import ConfigError, StudentConfig
from hybrid_distill.model.student import DistillStudent, build_student

CFG = StudentConfig(model="vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = DistillStudent(build_student(CFG), target_dim=24).eval()
    with torch.no_grad():  # non-trivial position embeddings, CLS and biases
        model.student.pos_embed.normal_(0, 0.5)
        model.student.cls_token.normal_(0, 0.5)
        for blk in model.student.blocks:
            blk.attn.qkv.bias.normal_(0, 0.2)
            blk.attn.qkv.weight.normal_(0, 0.3)
    return model


def _keep_idx(B, N, n_keep, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(N, generator=g)[:n_keep].sort()[0] + 1 for _ in range(B)]
    return torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.stack(rows)], dim=1)


def by_hand(model: DistillStudent, images: torch.Tensor, keep_idx: torch.Tensor):
    """patch_embed -> +pos/cls -> gather -> blocks -> norm -> head, and q, k from norm1 + qkv weights."""
    m = model.student
    p = m.patch_embed.proj
    x = F.conv2d(images, p.weight, p.bias, stride=p.stride)  # (B, D, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D), row-major grid
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + m.pos_embed
    x = torch.stack([x[b, keep_idx[b]] for b in range(x.shape[0])])  # (B, N', D)
    qk = {}
    depth = len(m.blocks)
    for i, blk in enumerate(m.blocks):
        if i in (depth - 3, depth - 2):
            h = blk.norm1(x)
            D, H = h.shape[-1], blk.attn.num_heads
            W, bias = blk.attn.qkv.weight, blk.attn.qkv.bias
            q = (h @ W[:D].T + bias[:D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
            k = (h @ W[D:2 * D].T + bias[D:2 * D]).reshape(*h.shape[:2], H, D // H).transpose(1, 2)
            qk[i] = (q, k)
        x = blk(x)
    x = m.norm(x)
    return x @ model.head.weight.T + model.head.bias, [qk[depth - 3], qk[depth - 2]]


def test_build_student_is_a_timm_vit_with_the_requested_dims():
    m = build_student(CFG)
    assert isinstance(m, VisionTransformer)
    assert m.embed_dim == 32 and len(m.blocks) == 4 and m.blocks[0].attn.num_heads == 2
    assert tuple(m.patch_embed.grid_size) == (4, 4) and m.num_prefix_tokens == 1
    assert m.head.__class__.__name__ == "Identity"  # no classifier: export is a plain backbone


def test_kept_token_forward_equals_running_the_blocks_by_hand(student):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep_idx = _keep_idx(3, 16, 6, 2)
    with torch.no_grad():
        pred, qk = student(images, keep_idx)
        want_pred, want_qk = by_hand(student, images, keep_idx)
    assert pred.shape == (3, 7, 24)
    assert torch.allclose(pred, want_pred, atol=1e-5, rtol=1e-4)
    assert len(qk) == 2 and student.relation_blocks == (1, 2)
    for (q, k), (wq, wk) in zip(qk, want_qk, strict=True):
        assert q.shape == (3, 2, 7, 16)
        assert torch.allclose(q, wq, atol=1e-5, rtol=1e-4) and torch.allclose(k, wk, atol=1e-5, rtol=1e-4)
        r, wr = q @ k.transpose(-1, -2) / math.sqrt(16), wq @ wk.transpose(-1, -2) / math.sqrt(16)
        assert torch.allclose(r, wr, atol=1e-5, rtol=1e-4)


def test_keeping_every_token_equals_timms_own_forward(student):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    keep_all = torch.arange(17).expand(2, -1)
    with torch.no_grad():
        pred, _ = student(images, keep_all)
        want = student.head(student.student.forward_features(images))
    assert torch.allclose(pred, want, atol=1e-5, rtol=1e-4)


def test_dropped_tokens_do_not_influence_the_output(student):
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    keep_idx = torch.tensor([[0, 1, 2, 5, 6]])  # patches 0, 1, 4, 5 of the 4x4 grid: the top-left 16x16 px
    other = images.clone()
    other[..., 24:, 24:] = torch.randn(1, 3, 8, 8)  # patch 15 (bottom-right), dropped
    with torch.no_grad():
        a, _ = student(images, keep_idx)
        b, _ = student(other, keep_idx)
        other[..., :8, :8] += 1.0  # patch 0, kept
        c, _ = student(other, keep_idx)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_gradients_reach_the_student_through_q_and_k(student):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    student.zero_grad(set_to_none=True)
    _, qk = student(images, _keep_idx(2, 16, 5, 6))
    loss = sum((q @ k.transpose(-1, -2)).square().mean() for q, k in qk)
    loss.backward()
    m = student.student
    for p in (m.patch_embed.proj.weight, m.pos_embed, m.cls_token, m.blocks[0].attn.qkv.weight,
              m.blocks[1].mlp.fc1.weight, m.blocks[2].attn.qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the last block and the head sit after the relation blocks: q, k give them nothing
    for p in list(m.blocks[3].parameters()) + list(student.head.parameters()) + list(m.norm.parameters()):
        assert p.grad is None or not p.grad.any()
    student.zero_grad(set_to_none=True)


def test_drop_path_rate_is_configurable():
    m = build_student(StudentConfig(**{**CFG.__dict__, "drop_path_rate": 0.2}))
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert build_student(CFG).blocks[-1].drop_path1.__class__.__name__ == "Identity"  # off by default


def test_student_needs_three_blocks_for_relations():
    with pytest.raises(ConfigError, match="3 blocks"):
        DistillStudent(build_student(StudentConfig(**{**CFG.__dict__, "depth": 2})), target_dim=8)


def test_non_vit_or_register_students_are_config_errors():
    with pytest.raises(ConfigError, match="student.model"):
        build_student(StudentConfig(model="resnet18", img_size=32))
    with pytest.raises(ConfigError, match="student.model"):
        build_student(StudentConfig(model="vit_medium_patch16_reg4_gap_256", img_size=32, patch_size=8,
                                    embed_dim=32, depth=3, num_heads=2))
    with pytest.raises(ConfigError, match="student.model"):
        build_student(StudentConfig(model="no_such_model_xyz"))
