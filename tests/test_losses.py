"""Hybrid loss terms (docs/algorithm.md) against explicit float64 computations written here."""

from __future__ import annotations

import math

import pytest
import torch

from hybrid_distill.model import losses


def smooth_l1(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise smooth-L1 of a difference, by its definition."""
    a = x.abs()
    return torch.where(a < beta, 0.5 * x * x / beta, a - 0.5 * beta)


def whiten_by_hand(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the channel dim, biased variance, no affine."""
    mean = t.sum(-1, keepdim=True) / t.shape[-1]
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / t.shape[-1]
    return (t - mean) / torch.sqrt(var + eps)


def feature_loss_by_hand(pred, target_tokens, keep_idx, beta):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for j, pos in enumerate(keep_idx[b].tolist()):
            t = whiten_by_hand(target_tokens[b, pos].double())
            total += float(smooth_l1(pred[b, j].double() - t, beta).sum())
            count += t.numel()
    return total / count


def relations_by_hand(q, k, rows, d):
    """(H, n, n) float64: per head q[rows] k[rows]^T / sqrt(d), with explicit index lists (d=None: no scale)."""
    q, k = q.double()[:, rows], k.double()[:, rows]
    return torch.einsum("hid,hjd->hij", q, k) / (math.sqrt(d) if d is not None else 1.0)


def relation_pair_by_hand(qs, ks, qt, kt, index, beta, head_reduce="none", scaled=True):
    B, _, n_keep, d_s = qs.shape
    d_t = qt.shape[-1]
    total, count = 0.0, 0
    for b in range(B):
        r_s = relations_by_hand(qs[b], ks[b], list(range(n_keep)), d_s if scaled else None)
        r_t = relations_by_hand(qt[b], kt[b], index[b].tolist(), d_t if scaled else None)
        if head_reduce == "mean":
            r_s, r_t = r_s.mean(0), r_t.mean(0)
        diff = smooth_l1(r_s - r_t, beta)
        total += float(diff.sum())
        count += diff.numel()
    return total / count


def _keep_idx(B, N, n_keep, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [1 + torch.randperm(N - 1, generator=g)[: n_keep - 1].sort()[0] for _ in range(B)]
    rows = [torch.cat([torch.zeros(1, dtype=torch.long), r]) for r in rows]
    return torch.stack(rows)


def _qk(B, H, N, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, H, N, d, generator=g), scale * torch.randn(B, H, N, d, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# feature loss


def test_feature_loss_equals_gather_whiten_smooth_l1_by_hand():
    B, N, n_keep, D = 2, 1 + 16, 7, 12
    g = torch.Generator().manual_seed(0)
    target = 3.0 * torch.randn(B, N, D, generator=g) + 5.0  # offset and scale: whitening matters
    target[1, 4] = 1e-3 * torch.randn(D, generator=g)  # tiny variance: the 1e-6 eps matters
    keep_idx = _keep_idx(B, N, n_keep, 1)
    keep_idx[1, 3] = 4
    keep_idx[1] = keep_idx[1].sort()[0]
    pred = 2.0 * torch.randn(B, n_keep, D, generator=g)
    got = losses.feature_loss(pred, target, keep_idx, beta=2.0)
    want = feature_loss_by_hand(pred, target, keep_idx, 2.0)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)
    # both branches of the smooth-L1 are exercised
    diffs = torch.cat([pred[b] - whiten_by_hand(target[b, keep_idx[b]]) for b in range(B)]).abs()
    assert 0.1 < (diffs < 2.0).float().mean() < 0.9


def test_feature_loss_uses_its_beta():
    g = torch.Generator().manual_seed(2)
    target, pred = torch.randn(1, 9, 8, generator=g), 3 * torch.randn(1, 5, 8, generator=g)
    keep_idx = torch.tensor([[0, 2, 3, 5, 8]])
    for beta in (0.5, 1.0, 4.0):
        assert losses.feature_loss(pred, target, keep_idx, beta).item() == pytest.approx(
            feature_loss_by_hand(pred, target, keep_idx, beta), rel=1e-5)


def test_feature_loss_is_zero_for_the_whitened_target_and_grads_reach_pred():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(2, 10, 6, generator=g) * 4 + 1
    keep_idx = _keep_idx(2, 10, 4, 4)
    pred = torch.stack([whiten_by_hand(target[b, keep_idx[b]]) for b in range(2)]).float().requires_grad_(True)
    assert losses.feature_loss(pred, target, keep_idx, 2.0).item() == pytest.approx(0.0, abs=1e-10)
    shifted = (pred.detach() + 0.1).requires_grad_(True)
    losses.feature_loss(shifted, target, keep_idx, 2.0).backward()
    # d/dx 0.5 x^2 / beta = x / beta, mean over every element
    assert torch.allclose(shifted.grad, torch.full_like(shifted, 0.1 / 2.0 / shifted.numel()), rtol=1e-4)


def test_whiten_is_parameter_free_layernorm_with_eps_1e_6():
    t = torch.randn(3, 5, 16) * 7 + 2
    assert torch.allclose(losses.whiten(t).double(), whiten_by_hand(t.double()), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# relation loss


def test_relation_loss_is_the_mean_over_pairs_of_per_head_smooth_l1():
    B, H, N, n_keep, d = 2, 3, 1 + 20, 9, 8
    student = [_qk(B, H, n_keep, d, 1.2, seed=10 + i) for i in range(2)]
    teacher = [_qk(B, H, N, d, 1.2 + i, seed=20 + i) for i in range(2)]  # pair 1: larger relations
    indices = [_keep_idx(B, N, n_keep, 30), _keep_idx(B, N, n_keep, 31)]  # each pair its own index
    got = losses.relation_loss(student, teacher, indices, beta=1.0, impl="torch")
    pairs = [relation_pair_by_hand(*s, *t, i, 1.0) for s, t, i in zip(student, teacher, indices, strict=True)]
    assert got.item() == pytest.approx(sum(pairs) / 2, rel=1e-5)
    assert pairs[0] != pytest.approx(pairs[1], rel=0.1)  # a mean of two different numbers, not one of them
    # the data exercises both smooth-L1 branches
    r_s = relations_by_hand(student[0][0][0], student[0][1][0], list(range(n_keep)), d)
    r_t = relations_by_hand(teacher[0][0][0], teacher[0][1][0], indices[0][0].tolist(), d)
    assert 0.1 < ((r_s - r_t).abs() < 1.0).double().mean() < 0.9


@pytest.mark.parametrize("beta", [0.25, 2.0])
def test_relation_loss_uses_its_beta(beta):
    s, t = [_qk(1, 2, 6, 4, 1.5, seed=40)], [_qk(1, 2, 11, 4, 1.5, seed=41)]
    idx = [_keep_idx(1, 11, 6, 42)]
    got = losses.relation_loss(s, t, idx, beta=beta, impl="torch")
    assert got.item() == pytest.approx(relation_pair_by_hand(*s[0], *t[0], idx[0], beta), rel=1e-5)


def test_relation_gradients_match_the_float64_definition_and_skip_the_teacher():
    qs, ks = _qk(2, 2, 7, 8, 1.0, seed=50)
    qt, kt = _qk(2, 2, 13, 8, 1.0, seed=51)
    idx = _keep_idx(2, 13, 7, 52)
    qs.requires_grad_(True), ks.requires_grad_(True), qt.requires_grad_(True)
    losses.relation_loss([(qs, ks)], [(qt, kt)], [idx], beta=1.0, impl="torch").backward()
    qs64, ks64 = qs.detach().double().requires_grad_(True), ks.detach().double().requires_grad_(True)
    r_s = torch.einsum("bhid,bhjd->bhij", qs64, ks64) / math.sqrt(8)
    rows = idx[:, None, :, None].expand(-1, 2, -1, 8)
    r_t = torch.einsum("bhid,bhjd->bhij", qt.detach().double().gather(2, rows), kt.double().gather(2, rows)) / 8**0.5
    smooth_l1(r_s - r_t, 1.0).mean().backward()
    assert torch.allclose(qs.grad.double(), qs64.grad, rtol=1e-4, atol=1e-9)
    assert torch.allclose(ks.grad.double(), ks64.grad, rtol=1e-4, atol=1e-9)
    assert qt.grad is None or not qt.grad.any()


def test_head_count_mismatch_raises_naming_head_reduce():
    s, t = [_qk(1, 2, 5, 8, 1.0, seed=60)], [_qk(1, 4, 9, 8, 1.0, seed=61)]
    with pytest.raises(ValueError, match="head_reduce"):
        losses.relation_loss(s, t, [_keep_idx(1, 9, 5, 62)], beta=1.0, impl="torch")


@pytest.mark.parametrize("h_s, h_t, d_s, d_t", [(2, 4, 8, 8), (3, 2, 16, 32), (4, 4, 8, 8)])
def test_head_reduce_mean_averages_relations_over_heads(h_s, h_t, d_s, d_t):
    s = [_qk(2, h_s, 6, d_s, 2.0, seed=70), _qk(2, h_s, 6, d_s, 2.0, seed=71)]
    t = [_qk(2, h_t, 12, d_t, 2.0, seed=72), _qk(2, h_t, 12, d_t, 2.0, seed=73)]
    idx = [_keep_idx(2, 12, 6, 74), _keep_idx(2, 12, 6, 75)]
    got = losses.relation_loss(s, t, idx, beta=1.0, head_reduce="mean", impl="torch")
    want = sum(relation_pair_by_hand(*a, *b, i, 1.0, head_reduce="mean") for a, b, i in zip(s, t, idx, strict=True)) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    if h_s == h_t:  # averaging first is a different loss from averaging per-head losses
        per_head = sum(relation_pair_by_hand(*a, *b, i, 1.0) for a, b, i in zip(s, t, idx, strict=True)) / 2
        assert got.item() != pytest.approx(per_head, rel=1e-3)


def test_different_head_dims_use_each_models_own_scale():
    s = [_qk(2, 2, 6, 16, 1.0, seed=80)]  # student d = 16 -> 1/4
    t = [_qk(2, 2, 12, 32, 1.0, seed=81)]  # teacher d = 32 -> 1/sqrt(32)
    idx = [_keep_idx(2, 12, 6, 82)]
    got = losses.relation_loss(s, t, idx, beta=1.0, impl="torch")
    assert got.item() == pytest.approx(relation_pair_by_hand(*s[0], *t[0], idx[0], 1.0), rel=1e-5)
    # using one scale for both sides would give a different number
    (qs, ks), (qt, kt) = s[0], t[0]
    one_scale = relation_pair_by_hand(qs * (4 / 32**0.5), ks, qt, kt, idx[0], 1.0)
    assert got.item() != pytest.approx(one_scale, rel=1e-3)


@pytest.mark.parametrize("head_reduce", ["none", "mean"])
@pytest.mark.parametrize("d_s, d_t", [(8, 8), (16, 32)])
def test_relation_scale_none_distils_the_unscaled_q_k_product_of_eq_2(d_s, d_t, head_reduce):
    s = [_qk(2, 2, 6, d_s, 0.5, seed=100), _qk(2, 2, 6, d_s, 0.5, seed=101)]
    t = [_qk(2, 2, 12, d_t, 0.5, seed=102), _qk(2, 2, 12, d_t, 0.5, seed=103)]
    idx = [_keep_idx(2, 12, 6, 104), _keep_idx(2, 12, 6, 105)]
    for scale, scaled in (("none", False), ("sqrt_d", True)):
        got = losses.relation_loss(s, t, idx, beta=1.0, head_reduce=head_reduce, impl="torch", scale=scale)
        want = sum(relation_pair_by_hand(*a, *b, i, 1.0, head_reduce, scaled=scaled)
                   for a, b, i in zip(s, t, idx, strict=True)) / 2
        assert got.item() == pytest.approx(want, rel=1e-5), scale
    unscaled = losses.relation_loss(s, t, idx, beta=1.0, head_reduce=head_reduce, impl="torch", scale="none")
    scaled_loss = losses.relation_loss(s, t, idx, beta=1.0, head_reduce=head_reduce, impl="torch")
    assert unscaled.item() != pytest.approx(scaled_loss.item(), rel=1e-2)  # the two readings differ on this data


def test_unknown_relation_scale_is_rejected():
    with pytest.raises(ValueError, match="sqrt_d"):
        losses.relation_scales(8, 8, "sqrt")


def test_low_precision_inputs_are_compared_in_fp32():
    s, t = _qk(1, 2, 6, 8, 1.0, seed=90), _qk(1, 2, 10, 8, 1.0, seed=91)
    idx = _keep_idx(1, 10, 6, 92)
    s16, t16 = tuple(x.bfloat16() for x in s), tuple(x.bfloat16() for x in t)
    got = losses.relation_loss([s16], [t16], [idx], beta=1.0, impl="torch")
    assert got.dtype == torch.float32
    want = relation_pair_by_hand(*(x.float() for x in s16), *(x.float() for x in t16), idx, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
