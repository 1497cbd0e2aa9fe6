"""Teacher weights from local files in their upstream formats (MAE release, timm, open_clip).

``read_state_dict`` reads safetensors or a torch file with ``weights_only=True``; the loaders check every key
and shape and raise ``WeightsError`` naming the file and the keys at fault.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn

from hybrid_distill.errors import WeightsError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors, or a torch file read with ``weights_only=True``).

    Unwraps the usual containers (``{"model": ...}`` from the MAE release, ``{"state_dict": ...}``) and a
    ``module.`` prefix.
    """
    if not path.is_file():
        raise WeightsError(f"checkpoint file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            # MAE training checkpoints (checkpoint-N.pth) also hold their argparse.Namespace: allow only that.
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated/unsafe file: one clear message
        raise WeightsError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_timm_file(model: nn.Module, path: Path, model_name: str) -> None:
    sd = read_state_dict(path)
    own = model.state_dict()
    # The official MAE release stores the pre-training decoder beside the encoder: ignore it.
    sd = {k: v for k, v in sd.items() if k in own or not (k.startswith("decoder") or k == "mask_token")}
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    strict_load(model, sd, path, model_name)


def strict_load(model: nn.Module, sd: dict, path: Path, model_name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or shapes:
        raise WeightsError(
            f"checkpoint {str(path)!r} does not match {model_name!r}: "
            f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}; "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}; "
            f"shape mismatches {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in shapes[:5]]}")
    model.load_state_dict(sd, strict=True)


def load_open_clip_file(model: nn.Module, path: Path, model_name: str) -> None:
    from open_clip.model import resize_pos_embed

    sd = read_state_dict(path)
    if not any(k.startswith("visual.") for k in sd):
        raise WeightsError(f"checkpoint {str(path)!r} has no `visual.*` keys: not an open_clip CLIP checkpoint "
                              f"for {model_name!r}")
    resize_pos_embed(sd, model)
    strict_load(model, sd, path, model_name)
