"""Real images that ship inside a package: scikit-learn's 1797 handwritten digits (8x8, 10 classes), as PNG class
folders (``ROOT/<digit>/<index>.png``) upsampled to any size. No download: the images are part of the wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(1797, size, size, 3)`` uint8 images (white digit on black, bicubic upsampling) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = (data.images / 16.0 * 255).round().astype(np.uint8)  # (N, 8, 8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in small])
    return np.repeat(big[..., None], 3, axis=-1), data.target.astype(np.int64)


def write_folders(root: Path, size: int, val_fraction: float = 0.3, seed: int = 0) -> tuple[Path, Path]:
    """``root/train`` and ``root/val`` class folders of a seeded split; returns both paths."""
    images, labels = digits(size)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_val = int(round(val_fraction * len(labels)))
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in idx:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return root / "train", root / "val"
