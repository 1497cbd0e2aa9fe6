"""Progressive redundant-token masking (paper Eq. 4, docs/algorithm.md) against a brute-force recomputation."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from hybrid_distill.model.masking import keep_count, keep_schedule, progressive_keep_indices


def brute_force_keep(hiddens, drop_ratio, num_prefix_tokens=1, score_prefix=False):
    """Python loops, float64: per image, per stage, cosine to the mean of the currently kept patch tokens.

    Returns (final keep lists per image with prefix first, per-stage dropped sets per image). ``score_prefix=True``
    is a deliberately wrong variant (prefix tokens take part in the mean) used to show the data discriminates.
    """
    B, N, _ = hiddens[0].shape
    finals, dropped = [], []
    for b in range(B):
        kept = list(range(num_prefix_tokens, N))
        stages = []
        for h in hiddens:
            rows = kept + (list(range(num_prefix_tokens)) if score_prefix else [])
            vecs = {j: h[b, j].double() for j in rows}
            mean = sum(vecs.values()) / len(vecs)
            scores = {j: float(vecs[j] @ mean / (vecs[j].norm() * mean.norm())) for j in kept}
            n_keep = math.floor((1 - Fraction(str(drop_ratio))) * len(kept) + Fraction(1, 2))  # exact arithmetic
            ranked = sorted(kept, key=lambda j: scores[j])  # least redundant first
            stages.append(set(ranked[n_keep:]))  # the most similar to the mean are dropped
            kept = sorted(ranked[:n_keep])
        finals.append(list(range(num_prefix_tokens)) + kept)
        dropped.append(stages)
    return finals, dropped


def _hiddens(B, N, D, stages, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a shared component makes tokens similar to the mean to different degrees (realistic redundancy)
    return [torch.randn(B, N, D, generator=g) + 0.7 * torch.randn(B, 1, D, generator=g) for _ in range(stages)]


@pytest.mark.parametrize("drop_ratio, schedule", [(0.3, [137, 96, 67]), (0.5, [98, 49, 25]), (0.1, [176, 158, 142])])
def test_keep_counts_for_196_patches_follow_table_8(drop_ratio, schedule):
    assert keep_schedule(196, drop_ratio, 3) == schedule
    hiddens = _hiddens(2, 197, 8, 3)
    keep = progressive_keep_indices(hiddens, drop_ratio)
    assert keep.shape == (2, 1 + schedule[-1])  # + CLS
    assert keep.dtype == torch.long
    for stages in (1, 2):
        assert progressive_keep_indices(hiddens[:stages], drop_ratio).shape == (2, 1 + schedule[stages - 1])


def test_keep_count_rounds_half_up_and_keeps_at_least_one():
    assert keep_schedule(64, 0.3, 3) == [45, 32, 22]  # the tiny preset's 8x8 grid
    assert keep_count(45, 0.3) == 32  # 0.7 * 45 is 31.4999... in binary floating point; exact value 31.5 -> 32
    assert keep_count(5, 0.5) == 3  # 2.5 rounds up
    assert keep_count(3, 0.5) == 2  # 1.5 rounds up
    assert keep_count(1, 0.9) == 1
    assert keep_count(10, 0.0) == 10


@pytest.mark.parametrize("drop_ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75])
def test_keep_count_equals_exact_rational_rounding(drop_ratio):
    for n in range(1, 400):
        exact = math.floor((1 - Fraction(str(drop_ratio))) * n + Fraction(1, 2))
        assert keep_count(n, drop_ratio) == max(1, exact), (n, drop_ratio)


@pytest.mark.parametrize("drop_ratio", [0.3, 0.5])
def test_dropped_tokens_are_the_most_similar_to_the_kept_mean_at_every_stage(drop_ratio):
    hiddens = _hiddens(3, 1 + 49, 6, 3, seed=1)
    expected, dropped = brute_force_keep(hiddens, drop_ratio)
    for stages in (1, 2, 3):  # the stage-s result is the prefix run on the first s hidden states
        got = progressive_keep_indices(hiddens[:stages], drop_ratio)
        want, _ = brute_force_keep(hiddens[:stages], drop_ratio)
        assert got.tolist() == want
    final = progressive_keep_indices(hiddens, drop_ratio).tolist()
    assert final == expected
    for b in range(3):  # the dropped sets are disjoint from the final keep and from each other
        all_dropped = set().union(*dropped[b])
        assert sum(len(s) for s in dropped[b]) == len(all_dropped) == 49 - (len(final[b]) - 1)
        assert not all_dropped & set(final[b])


def test_scores_only_patch_tokens_even_when_cls_dominates():
    hiddens = _hiddens(2, 1 + 36, 6, 3, seed=2)
    for h in hiddens:
        h[:, 0] = 50.0 * torch.randn(2, 6, generator=torch.Generator().manual_seed(3))  # a huge CLS token
    expected, _ = brute_force_keep(hiddens, 0.3)
    wrong, _ = brute_force_keep(hiddens, 0.3, score_prefix=True)
    assert expected != wrong  # the data tells the two rules apart
    assert progressive_keep_indices(hiddens, 0.3).tolist() == expected


def test_each_stage_scores_its_own_hidden_state():
    hiddens = _hiddens(2, 1 + 36, 6, 3, seed=4)
    swapped = [hiddens[2], hiddens[1], hiddens[0]]
    assert brute_force_keep(hiddens, 0.3)[0] != brute_force_keep(swapped, 0.3)[0]
    assert progressive_keep_indices(swapped, 0.3).tolist() == brute_force_keep(swapped, 0.3)[0]


def test_cls_is_kept_first_and_indices_are_sorted_and_unique():
    hiddens = _hiddens(4, 1 + 64, 8, 3, seed=5)
    keep = progressive_keep_indices(hiddens, 0.3)
    assert (keep[:, 0] == 0).all()
    assert (keep[:, 1:] >= 1).all() and (keep < 65).all()
    assert (keep[:, 1:] > keep[:, :-1]).all()  # strictly increasing: sorted, no duplicates


def test_same_input_gives_the_same_mask_and_images_are_independent():
    hiddens = _hiddens(4, 1 + 64, 8, 3, seed=6)
    a = progressive_keep_indices(hiddens, 0.3)
    b = progressive_keep_indices([h.clone() for h in hiddens], 0.3)
    assert torch.equal(a, b)
    single = progressive_keep_indices([h[2:3] for h in hiddens], 0.3)  # batch composition does not matter
    assert torch.equal(single[0], a[2])
    assert not torch.equal(a[0], a[1])  # different images, different masks


def test_register_prefix_tokens_are_kept_and_never_scored():
    P = 5  # CLS + 4 registers
    hiddens = _hiddens(2, P + 49, 6, 3, seed=7)
    for h in hiddens:
        h[:, 1:P] = 30.0  # identical, extreme registers: would be "most redundant" if they were scored
    keep = progressive_keep_indices(hiddens, 0.3, num_prefix_tokens=P)
    expected, _ = brute_force_keep(hiddens, 0.3, num_prefix_tokens=P)
    assert keep.tolist() == expected
    assert keep[:, :P].tolist() == [list(range(P))] * 2
    assert keep.shape == (2, P + keep_schedule(49, 0.3, 3)[-1])
    assert (keep[:, P:] >= P).all()


def test_no_drop_keeps_everything():
    hiddens = _hiddens(2, 1 + 16, 4, 3)
    assert progressive_keep_indices(hiddens, 0.0).tolist() == [list(range(17))] * 2


def test_low_precision_hidden_states_are_scored_like_fp32():
    hiddens = [h.to(torch.bfloat16) for h in _hiddens(2, 1 + 36, 8, 3, seed=8)]
    expected, _ = brute_force_keep([h.float() for h in hiddens], 0.3)
    assert progressive_keep_indices(hiddens, 0.3).tolist() == expected


def test_empty_hidden_list_is_rejected():
    with pytest.raises(ValueError):
        progressive_keep_indices([], 0.3)
