"""Linear probe of frozen features: L2-regularised multinomial logistic regression, fitted by full-batch L-BFGS.

The features are standardised with the training set's per-dimension mean and standard deviation (what MAE's
linear probe does with a ``BatchNorm1d(affine=False)`` in front of the head), then ``W, b`` minimise

    mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2          (b is not penalised)

starting from zero. The objective is strictly convex in ``W``, so its optimum does not depend on the solver, the
batch order or the number of ranks: it is the model scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))``
fits, which is how the tests check it. Each L-BFGS iteration is one pass over the features (``epochs``); the loss
and gradient are accumulated over row chunks, so memory is the features plus one chunk of logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """A fitted probe: standardisation, then ``x @ weight.T + bias``."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, C)`` class scores of features ``(M, D)``."""
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                     epochs: int = 100, chunk: int = 65536) -> LinearProbe:
    """Fit the probe on features ``x`` ``(N, D)`` with labels ``y`` ``(N,)`` (see the module docstring).

    Args:
        x: training features.
        y: labels in ``[0, num_classes)``.
        num_classes: output classes.
        weight_decay: L2 penalty on ``W`` (> 0).
        epochs: L-BFGS iterations (one pass over ``x`` each, plus line-search evaluations).
        chunk: rows per logits block.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std  # (N, D)
    y = y.to(x.device)
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, max_eval=epochs * 5 // 4, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    n = z.shape[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = 0.5 * weight_decay * w.pow(2).sum()
        total.backward()
        for zc, yc in zip(z.split(chunk), y.split(chunk), strict=True):
            part = F.cross_entropy(zc @ w.T + b, yc, reduction="sum") / n
            part.backward()
            total = total + part.detach()
        return total.detach()

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean=mean, std=std, weight=w.detach(), bias=b.detach())
