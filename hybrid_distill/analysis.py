"""Attention analysis of a ViT per layer: average head distance and NMI (paper §2.1, Fig. 2/3).

``python -m hybrid_distill.analysis EXPORT_DIR_OR_TIMM_NAME --images FOLDER_OR_synthetic --num-images 64
--out analysis.json [--plot analysis.png]``

* **Average head distance** (diversity: local vs global attention): per head, the attention-weighted mean
  pixel distance between a query patch and the key patches, averaged over query patches and images. Prefix
  tokens (CLS, registers) are dropped from queries *and* keys and each query's attention over the patches is
  renormalised to sum to one.
* **NMI** (discrimination vs homogeneity): per head and image, with ``p(q) = 1/N`` over all ``N`` tokens
  (prefix included, as in the paper), ``p(q, k) = pi(k|q) p(q)``: ``NMI = I(q, k) / sqrt(H(q) H(k))``;
  averaged over images. 1 = every query attends to its own distinct keys, 0 = all queries share one
  attention distribution (collapse).

Attention maps are the block's own ``softmax(q k^T * d_head^-0.5)``, with q, k taken after its pre-norm and
q/k norm by :func:`hybrid_distill.model.qk_capture.capture_qk` during an ordinary forward. See ``docs/analysis.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybrid_distill.errors import ConfigError, DataError, HybridDistillError
from hybrid_distill.model.qk_capture import capture_qk

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    a, b = value
    return int(a), int(b)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout / patch drop) for the duration, restoring the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _block_indices(model: nn.Module, blocks: Sequence[int] | None) -> list[int]:
    depth = len(model.blocks)
    if blocks is None:
        return list(range(depth))
    for i in blocks:
        if not -depth <= i < depth:
            raise IndexError(f"block {i} out of range for a model with {depth} blocks")
    return [i % depth for i in blocks]


def iter_attention_maps(model: nn.Module, images: torch.Tensor,
                        blocks: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(block_index, attn)`` one block at a time; ``attn`` is fp32 ``(B, H, N, N)``.

    One forward (``model.forward_features``, eval mode, no grad) captures q, k of the requested blocks; the
    softmax maps are then built block by block and each block's q, k are released once used, so at most one
    ``(B, H, N, N)`` map is alive at a time (chunk the batch to bound it further).

    Args:
        model: timm ``VisionTransformer`` (or any model with ``.blocks`` of timm blocks and ``forward_features``).
        images: ``(B, 3, H, W)`` normalised images; moved to the model's device and dtype.
        blocks: block indices (negative allowed); ``None`` = all blocks.
    """
    indices = _block_indices(model, blocks)
    param = next(model.parameters())
    with torch.no_grad(), _eval_mode(model), capture_qk(model.blocks, sorted(set(indices))) as qk:
        model.forward_features(images.to(device=param.device, dtype=param.dtype))
    last_use = {i: n for n, i in enumerate(indices)}
    for n, i in enumerate(indices):
        q, k = qk[i]  # (B, H, N, d)
        if last_use[i] == n:
            del qk[i]
        attn = torch.softmax(q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
        del q, k
        yield i, attn
        del attn


def attention_maps(model: nn.Module, images: torch.Tensor, blocks: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Per-block softmax attention ``(B, H, N, N)`` (fp32) of a timm ViT, in the order of ``blocks``.

    ``attn = softmax(q k^T * d_head^-0.5)`` with the block's own q, k (after ``norm1`` and ``q_norm``/``k_norm``),
    i.e. exactly the weights its (fused) attention applies to v. Holds all requested maps: for many images use
    :func:`iter_attention_maps` or :func:`analyse`, which stream.

    Args:
        model: timm ``VisionTransformer`` (exported student or teacher).
        images: ``(B, 3, H, W)`` normalised images.
        blocks: block indices; ``None`` = all blocks.

    Returns:
        One ``(B, H, N, N)`` tensor per requested block, ``N`` = prefix tokens + patches.
    """
    return [attn for _, attn in iter_attention_maps(model, images, blocks)]


def patch_distances(grid_size: int | Sequence[int], patch_size: int | Sequence[int]) -> torch.Tensor:
    """Euclidean pixel distances ``(P, P)`` between patch positions, patches in timm's row-major order."""
    gh, gw = _pair(grid_size)
    ph, pw = _pair(patch_size)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw) * ph  # (P,)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh) * pw  # (P,)
    pos = torch.stack([rows, cols], dim=-1)  # (P, 2)
    return torch.cdist(pos, pos)  # (P, P)


def head_distance_per_image(attn: torch.Tensor, grid_size: int | Sequence[int],
                            patch_size: int | Sequence[int]) -> torch.Tensor:
    """Average head distance per image and head ``(B, H)``; see :func:`average_head_distance`."""
    gh, gw = _pair(grid_size)
    num_patches = gh * gw
    num_prefix = attn.shape[-1] - num_patches
    if num_prefix < 0 or attn.shape[-2] != attn.shape[-1]:
        raise ValueError(f"attention {tuple(attn.shape)} does not fit a {gh}x{gw} patch grid")
    patches = attn[..., num_prefix:, num_prefix:].float()  # (B, H, P, P)
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    dist = patch_distances((gh, gw), patch_size).to(device=attn.device, dtype=torch.float32)  # (P, P)
    per_query = (patches * dist).sum(-1)  # (B, H, P)
    return per_query.mean(-1)  # (B, H)


def average_head_distance(attn: torch.Tensor, grid_size: int | Sequence[int],
                          patch_size: int | Sequence[int]) -> torch.Tensor:
    """Per-head mean attention distance in pixels ("mean attention distance" of ViT / FD).

    Patch tokens only: the leading ``N - gh*gw`` prefix tokens (CLS, registers) are removed from queries and keys,
    and each query's attention over the patches is renormalised to sum to one. Per query,
    ``sum_k attn[q, k] * ||pos(q) - pos(k)||`` with ``pos`` the patch's top-left pixel (row * patch_h,
    col * patch_w); then the mean over queries and images.

    Args:
        attn: ``(B, H, N, N)`` attention, rows summing to one, prefix tokens first.
        grid_size: patch grid ``(gh, gw)`` (or an int for square).
        patch_size: patch size in pixels ``(ph, pw)`` (or an int).

    Returns:
        ``(H,)`` mean distance per head, in pixels.
    """
    return head_distance_per_image(attn, grid_size, patch_size).mean(0)


def nmi_per_image(attn: torch.Tensor) -> torch.Tensor:
    """NMI per image and head ``(B, H)``; see :func:`attention_nmi`."""
    attn = attn.double()  # (B, H, N, N)
    n = attn.shape[-1]
    p_k = attn.mean(-2)  # (B, H, N) marginal of keys: sum_q pi(k|q) / N
    # I(q, k) = sum_{q,k} p(q,k) log(p(q,k) / (p(q) p(k))) = 1/N sum_{q,k} pi log(pi / p(k)); 0 log 0 = 0.
    info = (torch.xlogy(attn, attn) - torch.xlogy(attn, p_k.unsqueeze(-2))).sum((-2, -1)) / n  # (B, H)
    h_k = -torch.xlogy(p_k, p_k).sum(-1)  # (B, H)
    h_q = math.log(n)
    denom = torch.sqrt(h_k.clamp_min(0) * h_q)
    nmi = torch.where(denom > 0, info.clamp_min(0) / denom.clamp_min(1e-300), torch.zeros_like(info))
    return nmi.float()


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """Per-head normalized mutual information between query and key tokens (paper §2.1, following [27]).

    Per image and head, over all ``N`` tokens (prefix included): ``p(q) = 1/N``, ``p(q, k) = pi(k|q) / N``,
    ``p(k) = sum_q p(q, k)``; ``NMI = I(q, k) / sqrt(H(q) H(k))`` with ``H(q) = log N``. Computed in float64 with
    ``0 log 0 = 0``; a degenerate ``H(k) = 0`` (every query attends to the same single key) gives 0. Averaged
    over images.

    Args:
        attn: ``(B, H, N, N)`` attention, rows summing to one.

    Returns:
        ``(H,)`` NMI in [0, 1] per head.
    """
    return nmi_per_image(attn).mean(0)


def analyse(model: nn.Module, images: torch.Tensor, batch_size: int = 16,
            blocks: Sequence[int] | None = None) -> dict[str, Any]:
    """Average head distance and NMI of every (requested) block, streamed over image chunks.

    Args:
        model: timm ``VisionTransformer``.
        images: ``(B, 3, H, W)`` normalised images (any device; chunks are moved to the model's).
        batch_size: images per forward.
        blocks: block indices; ``None`` = all.

    Returns:
        JSON-ready dict: ``num_images``, ``grid_size``, ``patch_size``, ``num_prefix_tokens``, ``num_heads``,
        ``definitions`` and ``blocks``: one entry per block with ``block``, ``head_distance`` (mean over heads,
        pixels), ``head_distance_per_head``, ``nmi``, ``nmi_per_head``.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, 3, H, W) batch, got {tuple(images.shape)}")
    patch_size = _pair(model.patch_embed.patch_size)
    chunks = (iter_attention_maps(model, chunk, blocks) for chunk in images.split(batch_size))
    return summarise(chunks, images.shape[0], (images.shape[-2], images.shape[-1]), patch_size)


def summarise(chunks: Iterable[Iterable[tuple[int, torch.Tensor]]], num_images: int, image_size: Sequence[int],
              patch_size: int | Sequence[int]) -> dict[str, Any]:
    """``analyse``'s result from per-chunk ``(block, attn)`` streams (``iter_attention_maps`` or
    ``iter_backbone_attention_maps`` of each chunk of ``num_images`` images of ``image_size`` pixels)."""
    patch_size = _pair(patch_size)
    grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
    sums: dict[int, list[torch.Tensor]] = {}
    num_heads = num_prefix = 0
    for maps in chunks:
        for i, attn in maps:  # (b, H, N, N)
            num_heads, num_prefix = attn.shape[1], attn.shape[-1] - grid[0] * grid[1]
            dist = head_distance_per_image(attn, grid, patch_size).sum(0).double().cpu()  # (H,)
            nmi = nmi_per_image(attn).sum(0).double().cpu()  # (H,)
            prev = sums.get(i)
            sums[i] = [dist, nmi] if prev is None else [prev[0] + dist, prev[1] + nmi]
    n = num_images
    return {"num_images": n, "grid_size": list(grid), "patch_size": list(patch_size),
            "num_prefix_tokens": num_prefix, "num_heads": num_heads, "definitions": DEFINITIONS,
            "blocks": [_block_entry(i, dist / n, nmi / n) for i, (dist, nmi) in sums.items()]}


def iter_backbone_attention_maps(backbone: nn.Module, x: torch.Tensor,
                                 blocks: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """``iter_attention_maps`` for a ``hybrid_distill.model.backbones.Backbone`` (timm, EVA or open_clip teacher).

    Runs the tower block by block through its adapter (``embed``, ``block_qk``, ``run_block``), so the q, k are the
    ones its attention softmaxes (after RoPE for EVA, from ``in_proj_weight`` for open_clip). ``x`` is the
    teacher's normalised input (``Teacher.prepare``).
    """
    wanted = set(_block_indices(backbone, blocks))
    last = max(wanted)
    with torch.no_grad():
        h = backbone.embed(x)
        for i in range(last + 1):
            if i in wanted:
                q, k = backbone.block_qk(i, h)  # (B, H, N, d)
                yield i, torch.softmax(q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
            if i < last:
                h = backbone.run_block(i, h)


DEFINITIONS = {
    "head_distance": "pixels; per head: sum_k attn(k|q) * ||pos(q) - pos(k)||, patch tokens only (prefix removed "
                     "from queries and keys, keys renormalised), mean over queries and images",
    "nmi": "per head and image over all N tokens: p(q)=1/N, p(q,k)=attn(k|q)/N, I(q,k)/sqrt(H(q)H(k)); "
           "mean over images",
    "attention": "softmax(q k^T / sqrt(d_head)) with the block's q, k after norm1 and q/k norm",
}


def _block_entry(index: int, dist: torch.Tensor, nmi: torch.Tensor) -> dict[str, Any]:
    return {"block": index, "head_distance": dist.mean().item(), "head_distance_per_head": dist.tolist(),
            "nmi": nmi.mean().item(), "nmi_per_head": nmi.tolist()}


# ---------------------------------------------------------------------------------------------- model + images


def load_model(spec: str, pretrained: bool = False) -> nn.Module:
    """An exported student directory or a timm model name -> the model in eval mode.

    An export directory (written by ``python -m hybrid_distill.export``) holds ``export.json`` (``model`` or
    ``model_name``, ``kwargs``, ``weights``, ``mean``, ``std``) and ``model.safetensors``; a directory with only
    timm's ``config.json`` is loaded as ``local-dir:``. Anything else is a timm model name, randomly initialised
    unless ``pretrained``. The model's ``pretrained_cfg`` carries its input normalisation (the export's mean/std).
    """
    import timm

    path = Path(spec)
    if path.is_dir() and (path / "export.json").is_file():
        info = json.loads((path / "export.json").read_text())
        overlay = dict(file=str(path / info.get("weights", "model.safetensors")))
        overlay.update({k: tuple(info[k]) for k in ("mean", "std") if info.get(k)})
        model = timm.create_model(info.get("model_name") or info["model"], pretrained=True,
                                  pretrained_cfg_overlay=overlay, **info.get("kwargs", {}))
    elif path.is_dir() and (path / "config.json").is_file():
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
    elif path.exists():
        raise ConfigError(f"{spec!r} is neither an export directory (export.json) nor a timm local-dir "
                          "(config.json)")
    else:
        try:
            model = timm.create_model(spec, pretrained=pretrained, num_classes=0)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ConfigError(f"{spec!r} is not an export directory, a local-dir or a timm model: {e}") from e
    return model.eval()


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """timm's evaluation transform for ``model`` (resize, centre crop, normalise with its ``pretrained_cfg``), at the
    model's own input size (a ``pretrained_cfg`` may still name the 224 px of the architecture's tag)."""
    from timm.data import create_transform, resolve_data_config

    size = (3, *_pair(model.patch_embed.img_size))
    return create_transform(**resolve_data_config({"input_size": size}, model=model))


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: str | Path, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """An RGB image through ``transform`` (e.g. ``eval_transform(model)``): ``(3, h, w)``."""
    from PIL import Image

    with Image.open(path) as img:
        return transform(img.convert("RGB"))


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``(n, 3, h, w)`` smooth random images (bilinearly upsampled noise at 1/8 resolution), roughly unit scale."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    low = torch.randn(n, 3, max(1, h // 8), max(1, w // 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def load_images(source: str, model: nn.Module, num_images: int, seed: int = 0) -> torch.Tensor:
    """``num_images`` images from a folder (first ones by path, timm's eval transform for ``model``) or
    ``synthetic`` (at the model's input size)."""
    if source == "synthetic":
        return synthetic_images(num_images, _pair(model.patch_embed.img_size), seed)
    files = image_files(source)[:num_images]
    if not files:
        raise DataError(f"--images {source!r}: no images ({', '.join(IMAGE_SUFFIXES)}) under it")
    transform = eval_transform(model)
    return torch.stack([load_image(f, transform) for f in files])


# ---------------------------------------------------------------------------------------------- output + CLI


def plot(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Head distance and NMI per layer (dots: heads, line: mean over heads), like the paper's Fig. 3 / Fig. 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "head_distance", "average head distance (px)"), (axes[1], "nmi", "NMI")):
        layers = [b["block"] + 1 for b in result["blocks"]]
        for layer, b in zip(layers, result["blocks"], strict=True):
            ax.scatter([layer] * len(b[f"{key}_per_head"]), b[f"{key}_per_head"], s=10, alpha=0.5, color="C0")
        ax.plot(layers, [b[key] for b in result["blocks"]], color="C1", marker="o", label="mean over heads")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_xticks(layers)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m hybrid_distill.analysis", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="export directory (export.json + model.safetensors) or a timm model name")
    parser.add_argument("--images", default="synthetic", help="image folder (recursive) or 'synthetic'")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward")
    parser.add_argument("--out", default="analysis.json", help="output JSON")
    parser.add_argument("--plot", default=None, help="optional PNG of distance and NMI per layer")
    parser.add_argument("--pretrained", action="store_true", help="timm name: load pretrained weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, pretrained=args.pretrained)
        images = load_images(args.images, model, args.num_images, seed=args.seed)
    except HybridDistillError as e:
        print(f"analysis: error: {e}", file=sys.stderr)
        return 2
    result = {"model": args.model, "images": args.images,
              **analyse(model.to(args.device), images, batch_size=args.batch_size)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot, title=f"{args.model} ({result['num_images']} images: {args.images})")
    for b in result["blocks"]:
        print(f"block {b['block']:2d}  head distance {b['head_distance']:8.2f} px  NMI {b['nmi']:.4f}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
