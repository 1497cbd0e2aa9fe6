"""Frozen features of a timm ViT on an ``EvalSet``: each rank embeds its share, the rows are gathered in set order.

Pools (of ``model.forward_features``, i.e. the tokens after the model's final norm):

* ``cls`` — the CLS token (DINO's k-NN and linear evaluations);
* ``avg`` — the mean of the patch tokens (prefix tokens excluded, as timm's ``global_pool="avg"``).

Every forward sees a full ``batch_size`` batch (the last one of a rank is padded with copies of its first image and
the copies dropped), so each image's features come from the same computation whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hybrid_distill.eval.data import EvalSet
from hybrid_distill.runtime import distributed

POOLS = ("cls", "avg")


@dataclass
class Features:
    """Gathered features of a whole ``EvalSet``, in position order (identical on every rank).

    Attributes:
        pools: ``{pool: (N, D) float32}`` on the compute device.
        labels: ``(N,)`` int64.
        positions: ``(N,)`` set positions (increasing; an undecodable image's position is missing).
    """

    pools: dict[str, torch.Tensor]
    labels: torch.Tensor
    positions: torch.Tensor


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """``(B, P + N, D)`` tokens -> ``(B, D)``: the CLS token (``cls``) or the mean of the patch tokens (``avg``)."""
    if pool == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pool 'cls' needs a model with a class token; use 'avg'")
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"unknown pool {pool!r}; choose from {POOLS}")


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` on the images' device."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - m) / s


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
          pools: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    """Pooled features ``{pool: (b, D)}`` of uint8 ``images`` (b <= batch_size), run as one full-size batch."""
    param = next(model.parameters())
    b = images.shape[0]
    if b < batch_size:  # pad: the same batch shape for every forward
        images = torch.cat([images, images[:1].expand(batch_size - b, -1, -1, -1)])
    x = normalise(images.to(param.device), mean, std).to(param.dtype)
    tokens = model.forward_features(x)  # (B, P + N, D)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return {p: pool_tokens(tokens[:b], prefix, p).float() for p in pools}


@torch.no_grad()
def extract_features(model: nn.Module, eval_set: EvalSet, mean: Sequence[float], std: Sequence[float],
                     pools: Sequence[str], batch_size: int, num_workers: int = 0,
                     device: torch.device | None = None) -> Features:
    """Embed this rank's share of ``eval_set`` and gather every rank's rows (a collective: call it on all ranks).

    Args:
        model: timm ViT in eval mode (``forward_features`` -> ``(B, P + N, D)``).
        eval_set: the images.
        mean, std: the model's input normalisation.
        pools: any of ``cls``, ``avg``.
        batch_size: images per forward.
        num_workers: data-loader workers.
        device: where the gathered features live (the process group's device); default: the model's.

    Returns:
        ``Features`` of the whole set, in position order.
    """
    device = device or next(model.parameters()).device
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    labels, positions = [], []
    for batch in eval_set.loader(batch_size, num_workers):
        if batch["images"].shape[0] == 0:
            continue
        for pool, value in embed(model, batch["images"], mean, std, pools, batch_size).items():
            feats[pool].append(value.to(device))
        labels.append(batch["labels"])
        positions.append(batch["positions"])
    width = getattr(model, "num_features", None) or model.embed_dim
    local = {p: torch.cat(v) if v else torch.zeros(0, width, device=device) for p, v in feats.items()}
    ids = torch.stack([torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64),
                       torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)], dim=1).to(device)
    ids = distributed.all_gather_rows(ids)  # (N, 2): position, label
    order = torch.argsort(ids[:, 0])
    gathered = {p: distributed.all_gather_rows(v.contiguous())[order] for p, v in local.items()}
    return Features(pools=gathered, labels=ids[order, 1], positions=ids[order, 0])
