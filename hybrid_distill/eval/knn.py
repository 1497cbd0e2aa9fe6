"""Weighted k-NN classification of frozen features, DINO's protocol (Caron et al. 2021, ``eval_knn.py``).

For each query: cosine similarity to every training feature (both L2-normalised), the ``k`` most similar training
samples vote for their label with weight ``exp(similarity / T)``; classes are ranked by their summed votes.
DINO's defaults: ``k = 20``, ``T = 0.07``. Top-5 counts a hit when the label is among the five best-ranked classes;
classes with equal votes (e.g. the zero-vote classes when fewer than five are voted for) rank by class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 256) -> torch.Tensor:
    """Summed votes ``(M, num_classes)`` of the ``k`` nearest training features for each query.

    Args:
        train: ``(N, D)`` training features.
        train_labels: ``(N,)`` their labels in ``[0, num_classes)``.
        queries: ``(M, D)`` features to classify.
        num_classes: number of classes.
        k: neighbours (at most ``N``).
        temperature: ``T`` of the vote weights ``exp(sim / T)``.
        chunk: queries per similarity matrix (bounds memory to ``chunk x N``).
    """
    k = min(k, train.shape[0])
    train_n = F.normalize(train.float(), dim=1)  # (N, D)
    labels = train_labels.to(train.device)
    out = []
    for q in F.normalize(queries.float(), dim=1).split(chunk):
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(votes.scatter_add_(1, labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train.device)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the ``k`` highest scores (ties: lower class index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (M, C)
    hits = order == labels.to(order.device).view(-1, 1)
    n = max(1, labels.numel())
    return {k: 100.0 * hits[:, :k].any(dim=1).sum().item() / n for k in ks}
