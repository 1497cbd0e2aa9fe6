"""Both protocols on every pool: the metrics dict the CLI prints and the trainer logs.

Keys: ``knn_{pool}_top1``, ``knn_{pool}_top5``, ``linear_{pool}_top1``, ``linear_{pool}_top5`` (percent), for each
pool in ``cls``, ``avg``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybrid_distill.config import EvalConfig
from hybrid_distill.eval.data import EvalSet
from hybrid_distill.eval.features import Features, extract_features
from hybrid_distill.eval.knn import knn_scores, topk_accuracy
from hybrid_distill.eval.linear_probe import fit_linear_probe

CLASSIFIERS = ("knn", "linear")


def classify(train: Features, val: Features, protocols: Sequence[str], cfg: EvalConfig) -> dict[str, float]:
    """Top-1/top-5 of the k-NN and linear classifiers fitted on ``train`` and scored on ``val``, per pool."""
    if train.labels.numel() == 0 or val.labels.numel() == 0:
        raise ValueError("an evaluation set has no decodable images")
    num_classes = int(max(train.labels.max().item(), val.labels.max().item())) + 1
    out: dict[str, float] = {}
    for pool, x in train.pools.items():
        if "knn" in protocols:
            scores = knn_scores(x, train.labels, val.pools[pool], num_classes, cfg.knn_k, cfg.knn_temperature)
            _put(out, f"knn_{pool}", topk_accuracy(scores, val.labels))
        if "linear" in protocols:
            probe = fit_linear_probe(x, train.labels, num_classes, cfg.linear_weight_decay, cfg.linear_epochs)
            _put(out, f"linear_{pool}", topk_accuracy(probe.logits(val.pools[pool]), val.labels))
    return out


def _put(out: dict[str, float], prefix: str, acc: dict[int, float]) -> None:
    out[f"{prefix}_top1"], out[f"{prefix}_top5"] = acc[1], acc[5]


def evaluate_model(model: nn.Module, mean: Sequence[float], std: Sequence[float], train_set: EvalSet,
                   val_set: EvalSet, cfg: EvalConfig, device: torch.device | None = None) -> dict[str, float]:
    """Features of both sets (a collective: every rank calls it), then ``classify`` with ``cfg.protocols``."""
    kwargs = dict(pools=cfg.pools, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    train = extract_features(model, train_set, mean, std, **kwargs)
    val = extract_features(model, val_set, mean, std, **kwargs)
    return classify(train, val, [p for p in cfg.protocols if p in CLASSIFIERS], cfg)
