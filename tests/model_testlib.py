"""Helpers shared by the teacher tests: test images and livened random weights."""

import math

import torch


def random_images(B: int, size: int, seed: int = 0) -> torch.Tensor:
    """A uint8 batch ``(B, 3, size, size)`` drawn from ``seed``."""
    return torch.randint(0, 256, (B, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def liven(module: torch.nn.Module, seed: int = 0) -> None:
    """Larger random weights than the init (biases included) so relations and masking are far from degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight") else
                        0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
