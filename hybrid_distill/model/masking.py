"""Progressive redundant-token masking (paper Eq. 4, docs/algorithm.md).

At each masking layer of the MIM teacher, among the patch tokens still kept, the tokens most similar
(cosine) to their mean token are redundant: the ``K`` fraction with the highest score is dropped. Prefix
tokens (CLS, registers) are never scored or dropped. Every image keeps the same number of tokens, so
batches stay rectangular: for 196 patches, K=0.3 keeps 137 -> 96 -> 67.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hybrid_distill.model.flops import keep_count, keep_schedule  # noqa: F401 - token counts live with the FLOP model


def least_redundant(tokens: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices (sorted, into dim 1) of the ``num_keep`` tokens least similar to the mean token.

    Args:
        tokens: ``(B, n, D)`` candidate tokens (patch tokens only).
        num_keep: how many to keep.

    Returns:
        LongTensor ``(B, num_keep)``, ascending.
    """
    tokens = tokens.float()
    mean = tokens.mean(dim=1, keepdim=True)  # (B, 1, D)
    score = F.cosine_similarity(tokens, mean, dim=-1)  # (B, n)
    keep = score.topk(num_keep, dim=1, largest=False, sorted=False).indices
    return keep.sort(dim=1).values


def prefix_then(kept_patches: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Prepend prefix positions ``0..P-1`` to kept patch positions ``(B, n)`` -> ``(B, P + n)``."""
    B = kept_patches.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=kept_patches.device).expand(B, -1)
    return torch.cat([prefix, kept_patches], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x (B, N, D)`` and ``index (B, n)`` -> ``(B, n, D)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def progressive_keep_indices(hiddens: Sequence[torch.Tensor], drop_ratio: float,
                             num_prefix_tokens: int = 1) -> torch.Tensor:
    """Token positions kept by progressive redundant-token masking.

    Args:
        hiddens: full-sequence hidden states ``(B, N, D)`` of the MIM teacher at the masking layers, in order
            (prefix tokens first).
        drop_ratio: K, the fraction of the currently kept patch tokens dropped at each layer.
        num_prefix_tokens: leading tokens (CLS, registers) that are always kept and never scored.

    Returns:
        LongTensor ``(B, N')``: prefix positions, then the kept patch positions, ascending.
    """
    if not hiddens:
        raise ValueError("progressive_keep_indices needs at least one hidden state")
    B, N, _ = hiddens[0].shape
    device = hiddens[0].device
    kept = torch.arange(num_prefix_tokens, N, device=device).expand(B, -1)  # (B, n) absolute positions
    for h in hiddens:
        candidates = gather_tokens(h, kept)  # (B, n, D)
        local = least_redundant(candidates, keep_count(kept.shape[1], drop_ratio))
        kept = kept.gather(1, local)
    return prefix_then(kept, num_prefix_tokens)
