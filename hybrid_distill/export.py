"""Export the trained student as a plain timm checkpoint: ``python -m hybrid_distill.export RUN --out DIR``.

``RUN`` is a run directory (its newest complete checkpoint, or ``--tag``), a ``checkpoints`` directory or one
tag directory (``.../checkpoints/step_00001000``). The ZeRO shards are consolidated to the fp32 master weights
(``fp32_master_weights``; pure file reading, no process group or GPU) for every setup the trainer runs: ZeRO
stages 1, 2 and 3, with or without CPU offload, fp32 or bf16 (docs/checkpoints.md has the tested matrix). The
``student.*`` weights are kept (prefix stripped) and the feature head ``head.*`` is dropped. The student is
rebuilt from the run's config with ``build_student`` and written by ``timm.models.save_for_hf``::

    DIR/model.safetensors   the student's state dict (timm keys)
    DIR/config.json         timm/HF config (architecture + preprocessing)
    DIR/export.json         model name, create_model kwargs, source checkpoint, the loading line
    DIR/README.md           how to load it

Load it with either::

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors",
                      mean=MEAN, std=STD), **KWARGS)
    timm.create_model("local-dir:DIR", pretrained=True)

Either way the model's ``pretrained_cfg`` holds the mean/std the student was trained with (``student.mean/std``),
so ``timm.data.resolve_data_config(model=model)`` gives the right normalisation for fine-tuning.

``drop_path_rate`` (a training knob) is not part of the exported kwargs; pass your own when fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from hybrid_distill.config import Config, config_from_dict
from hybrid_distill.errors import ConfigError, ExportError
from hybrid_distill.runtime import checkpoint
from hybrid_distill.runtime.checkpoint import complete_checkpoints, find_latest, read_marker, tag_step

STUDENT_PREFIX = "student."


def find_checkpoint(src: str | Path, tag: str | None = None) -> Path:
    """The tag directory to export from ``src`` (tag dir, checkpoints dir or run dir), optionally by ``tag``.

    Raises:
        ExportError: ``src`` does not exist, the tag is missing or incomplete, or no complete checkpoint exists.
    """
    src = Path(src)
    if not src.exists():
        raise ExportError(f"{str(src)!r} does not exist")
    if tag_step(src) is not None:
        return _complete(src)
    for root in (src / "checkpoints", src):
        if tag is not None and (root / tag).is_dir():
            return _complete(root / tag)
        if tag is None and complete_checkpoints(root):
            return find_latest(root)
    what = f"checkpoint {tag!r}" if tag else "complete checkpoint (step_XXXXXXXX with a COMPLETE marker)"
    raise ExportError(f"no {what} found in {str(src)!r} or {str(src / 'checkpoints')!r}")


def _complete(tag_dir: Path) -> Path:
    if read_marker(tag_dir) is None:
        raise ExportError(f"{str(tag_dir)!r} is incomplete (no COMPLETE marker: its save did not finish)")
    return tag_dir


def load_run_config(tag_dir: Path) -> Config:
    """The resolved config that wrote ``tag_dir``: the one in its ``COMPLETE`` marker, else the run's
    ``config.yaml`` (run_dir = grandparent; a later run in the same directory may have rewritten it).

    Raises:
        ExportError: no config found, or an invalid one.
    """
    saved = (read_marker(tag_dir) or {}).get("config")
    if isinstance(saved, dict):
        try:
            return config_from_dict(saved)
        except ConfigError as e:
            raise ExportError(f"the config in {str(tag_dir / 'COMPLETE')!r} is not a valid run config: {e}") from e
    path = tag_dir.parent.parent / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{str(path)!r} not found: export needs the run's config.yaml (written by the trainer) to "
                          "rebuild the student")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ExportError(f"{str(path)!r} is not a valid run config: {e}") from e


def consolidated_student_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 student weights from a (possibly sharded) DeepSpeed checkpoint, ``student.`` prefix stripped."""
    full = fp32_master_weights(tag_dir)
    state = {k.removeprefix(STUDENT_PREFIX): v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise ExportError(f"{str(tag_dir)!r} holds no '{STUDENT_PREFIX}*' weights (keys: {sorted(full)[:5]} ...)")
    return state


def fp32_master_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of every parameter in a complete checkpoint, by name.

    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` reads ZeRO-1/2/3 shards (with or without offload).
    It rejects the shards of DeepSpeed's ``BF16_Optimizer`` ("not a zero checkpoint"), which ZeRO stage 1 uses
    with bf16 and ``"data_types": {"grad_accum_dtype": "fp32"}``; those are read from DeepSpeed's universal
    conversion instead (``<tag>_universal`` when the trainer made one for a world-size change, else a temporary
    one under ``$TMPDIR``, which needs room for the weights and both Adam moments in fp32).

    Raises:
        ExportError: a checkpoint saved without ZeRO (stage 0), or one neither reader can read.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (read_marker(tag_dir) or {}).get("zero_stage") == 0:
        raise ExportError(f"{str(tag_dir)!r} was saved without ZeRO (stage 0), which cannot be exported "
                          "(docs/checkpoints.md); its module weights are the 'module' entry of "
                          "mp_rank_00_model_states.pt (rounded to bf16 if the run used bf16)")
    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except ValueError as e:  # "... is not a zero checkpoint": BF16_Optimizer shards, read through the conversion
        zero_error = f"{type(e).__name__}: {e}"
    except Exception as e:  # a torn or missing file: DeepSpeed raises assorted errors (RuntimeError, OSError, ...)
        raise ExportError(f"cannot read the fp32 weights of {str(tag_dir)!r}: {type(e).__name__}: {e}") from e
    try:
        return _universal_fp32_weights(tag_dir)
    except Exception as e:  # CheckpointError (conversion failed) or DeepSpeed's and torch's assorted errors
        raise ExportError(f"cannot read the fp32 weights of {str(tag_dir)!r}: zero_to_fp32: {zero_error}; "
                          f"universal conversion: {e}") from e


def _universal_fp32_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from ``tag_dir``'s universal conversion (``zero/<name>/fp32.pt``), made if there is none."""
    existing = checkpoint.universal_dir(tag_dir)
    if read_marker(existing) is not None:
        return _read_universal(existing)
    with tempfile.TemporaryDirectory(prefix="hybrid_distill_export_") as tmp:
        return _read_universal(checkpoint.convert_to_universal(tag_dir, Path(tmp) / existing.name))


def _read_universal(universal: Path) -> dict[str, torch.Tensor]:
    params = sorted(p for p in (universal / "zero").iterdir() if (p / "fp32.pt").is_file())
    return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"] for p in params}


def export_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild the exported student (``student_kwargs`` minus drop path)."""
    from hybrid_distill.model.student import student_kwargs

    return {k: v for k, v in student_kwargs(cfg.student).items() if k != "drop_path_rate"}


def export_student(src: str | Path, out: str | Path, tag: str | None = None) -> Path:
    """Consolidate a run's checkpoint and write the student as a timm checkpoint into ``out``.

    Args:
        src: run directory, checkpoints directory or tag directory.
        out: output directory (created).
        tag: a specific tag (``step_00001000``) when ``src`` is a run or checkpoints directory.

    Returns:
        The path of the written ``model.safetensors``.

    Raises:
        ExportError: no checkpoint or config found, or weights that do not match the configured student.
    """
    from timm.models import save_for_hf

    from hybrid_distill.model.student import build_student

    tag_dir = find_checkpoint(src, tag)
    cfg = load_run_config(tag_dir)
    model = build_student(cfg.student)
    state = consolidated_student_state(tag_dir)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{str(tag_dir)!r} does not match student {cfg.student.model}: {e}") from e
    out = Path(out)
    kwargs = export_kwargs(cfg)
    size = cfg.student.img_size  # timm's pretrained_cfg of the model name may say 224
    norm = {"mean": list(cfg.student.mean), "std": list(cfg.student.std), "input_size": [3, size, size]}
    model_config = {"model_args": kwargs, "pretrained_cfg": {"tag": "hybrid_distill", **norm}}
    save_for_hf(model.eval(), str(out), model_config=model_config, safe_serialization=True)
    _make_readable(out / "model.safetensors")
    _write_docs(out, cfg.student.model, kwargs, tag_dir, norm, size_name(model.embed_dim, len(model.blocks)))
    return out / "model.safetensors"


def _make_readable(path: Path) -> None:
    """safetensors writes its file mode 0600; give it the mode of ``config.json`` beside it (0666 minus the umask)."""
    path.chmod(stat.S_IMODE((path.parent / "config.json").stat().st_mode))


def load_line(model_name: str, kwargs: dict[str, Any], weights: Path, norm: dict[str, list[float]]) -> str:
    """The Python line that loads the export with timm (its pretrained_cfg then holds the training mean/std and
    input size)."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    overlay = ", ".join(f"{k}={tuple(v)!r}" for k, v in norm.items())
    return (f"timm.create_model({model_name!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(weights)!r}, {overlay}), {args})")


# ----------------------------------------------------------------------------------------------------------------
# The fine-tuning hand-off: timm's train.py command for the paper's ImageNet-1K fine-tuning, each number sourced

SOURCES = {
    "paper": "Hybrid Distill paper, appendix C (ImageNet-1K fine-tuning \"following dBOT\": lr 3e-4, batch 256)",
    "dbot_downstream": "dBOT DOWNSTREAM.md, ImageNet-1K commands (github.com/liuxingbin/dbot)",
    "dbot_run": "dBOT run.sh, imagenet_cls defaults (symmetric/beit branch)",
    "dbot_args": "dBOT run_finetune.py argument defaults",
    "dbot_eval": "dBOT datasets.py build_transform: eval crop 224/256, bicubic",
    "dbot_pool": "dBOT run_finetune.py --use_mean_pooling (on by default); MAE FINETUNE.md: --global_pool",
    "export": "this export: the student's own input size and normalisation (export.json)",
}
# Per size: ViT-B/16 (dBOT DOWNSTREAM.md + run.sh) and ViT-L/16 (DOWNSTREAM.md). Other sizes get ViT-B's values.
SIZE_RECIPES = {
    "ViT-B": {"epochs": (100, "dbot_downstream"), "warmup-epochs": (20, "dbot_run"), "layer-decay": (0.65, "dbot_run"),
              "drop-path": (0.1, "dbot_downstream")},
    "ViT-L": {"epochs": (50, "dbot_downstream"), "warmup-epochs": (5, "dbot_downstream"),
              "layer-decay": (0.8, "dbot_downstream"), "drop-path": (0.2, "dbot_downstream")},
}
COMMON_RECIPE = {
    "lr": (3e-4, "paper"), "weight-decay": (0.05, "dbot_run"), "warmup-lr": (1e-6, "dbot_args"),
    "min-lr": (1e-6, "dbot_args"), "mixup": (0.8, "dbot_run"), "cutmix": (1.0, "dbot_run"),
    "smoothing": (0.1, "dbot_args"), "reprob": (0.25, "dbot_args"), "aa": ("rand-m9-mstd0.5-inc1", "dbot_args"),
    "train-interpolation": ("bicubic", "dbot_args"), "crop-pct": (0.875, "dbot_eval"),
    "gp": ("avg", "dbot_pool"),  # mean of the patch tokens, a fresh LayerNorm, the head
}
GLOBAL_BATCH, GPUS = 256, 8  # the paper's batch; the command splits it over 8 GPUs


def size_name(width: int, depth: int) -> str | None:
    """``ViT-B`` / ``ViT-L`` for a student of that width and depth (the sizes with a published recipe), else None."""
    return {(768, 12): "ViT-B", (1024, 24): "ViT-L"}.get((width, depth))


def finetune_recipe(size: str | None, kwargs: dict[str, Any], norm: dict[str, list[float]]
                    ) -> list[tuple[str, Any, str]]:
    """``[(flag, value, source key)]`` of the ImageNet-1K fine-tuning for a student of ``size`` (``size_name``)."""
    rows = [(flag, value, src) for flag, (value, src) in {**SIZE_RECIPES[size or "ViT-B"], **COMMON_RECIPE}.items()]
    rows.append(("b", GLOBAL_BATCH // GPUS, "paper"))
    rows += [("img-size", kwargs.get("img_size", 224), "export"), ("mean", norm["mean"], "export"),
             ("std", norm["std"], "export")]
    return rows


def finetune_command(out: Path, rows: list[tuple[str, Any, str]]) -> str:
    """The ``torchrun ... train.py`` line (run from a checkout of timm) for ``rows``."""
    args = " \\\n    ".join(f"{_flag(f)} {_value(v)}" for f, v, _ in rows)
    return (f"torchrun --nproc_per_node {GPUS} train.py --data-dir /data/imagenet \\\n"
            f"    --model local-dir:{out.resolve()} --pretrained --num-classes 1000 \\\n"
            f"    --opt adamw --sched cosine --sched-on-updates --amp \\\n    {args}")


def _flag(name: str) -> str:
    return f"-{name}" if len(name) == 1 else f"--{name}"


def _value(value: Any) -> str:
    """``3e-4`` for small floats, ``0.65`` otherwise, lists space-separated (argparse ``nargs``)."""
    if isinstance(value, (list, tuple)):
        return " ".join(_value(v) for v in value)
    if isinstance(value, float):
        return f"{value:.0e}".replace("e-0", "e-") if 0 < abs(value) < 1e-2 else f"{value:g}"
    return str(value)


def _finetune_section(out: Path, size: str | None, kwargs: dict[str, Any], norm: dict[str, list[float]]) -> str:
    rows = finetune_recipe(size, kwargs, norm)
    which = (f"with dBOT's {size}/16 values" if size else "with dBOT's ViT-B/16 values: there is no published "
             "recipe for this student's width and depth, so they are a starting point")
    table = "\n".join(f"| `{_flag(f)}` | {_value(v)} | {SOURCES[src]} |" for f, v, src in rows)
    return (
        f"## Fine-tuning on ImageNet-1K\n\nThe paper's recipe, {which}. "
        "From a checkout of timm (`git clone https://github.com/huggingface/pytorch-image-models`, the version "
        "installed here), on 8 GPUs:\n\n"
        f"```bash\n{finetune_command(out, rows)}\n```\n\n"
        f"The paper's global batch is {GLOBAL_BATCH}: `-b` x GPUs x `--grad-accum-steps` must stay {GLOBAL_BATCH} "
        "(`--lr` is absolute: timm would otherwise rescale its `--lr-base` by sqrt(batch) for AdamW). `--gp avg` is "
        "MAE/dBOT's global pooling: the mean of the patch tokens through a freshly initialised LayerNorm "
        "(`fc_norm`), so timm reports the student's final `norm.weight`/`norm.bias` as unexpected keys and leaves "
        "them out, as MAE's and dBOT's fine-tuning do. Same from Python: "
        f"`timm.create_model('local-dir:{out.resolve()}', pretrained=True, num_classes=1000, global_pool='avg', "
        "drop_path_rate=...)` and `timm.optim.create_optimizer_v2(model, 'adamw', lr=..., weight_decay=..., "
        "layer_decay=...)`.\n\n"
        "| flag | value | source |\n| --- | --- | --- |\n"
        f"{table}\n| `--opt adamw --sched cosine --sched-on-updates` | | {SOURCES['dbot_args']} (AdamW, "
        "per-step cosine) |\n")


def _write_docs(out: Path, model_name: str, kwargs: dict[str, Any], tag_dir: Path,
                norm: dict[str, list[float]], size: str | None = None) -> None:
    weights = (out / "model.safetensors").resolve()
    line = load_line(model_name, kwargs, weights, norm)
    info = {"model": model_name, "kwargs": kwargs, "weights": "model.safetensors", "source": str(tag_dir.resolve()),
            "step": tag_step(tag_dir), **norm, "load": line,
            "load_local_dir": f"timm.create_model('local-dir:{out.resolve()}', pretrained=True)"}
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# Hybrid-distilled student `{model_name}`\n\n"
        f"Exported from `{tag_dir.resolve()}` (step {tag_step(tag_dir)}): a plain timm `VisionTransformer` without "
        "classifier (`num_classes=0`); the distillation head was dropped.\n\n"
        f"```python\nimport timm\n\nmodel = {line}\n# or: {info['load_local_dir']}\n```\n\n"
        f"Inputs: RGB in [0, 1] normalised with mean {info['mean']} and std {info['std']}, "
        f"{kwargs.get('img_size')} px. For fine-tuning pass e.g. `num_classes=1000, drop_path_rate=0.1` as well.\n\n"
        + _finetune_section(out, size, kwargs, norm))


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m hybrid_distill.export RUN_OR_CHECKPOINT --out DIR [--tag TAG]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m hybrid_distill.export", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="run directory, checkpoints directory or checkpoint (tag) directory")
    parser.add_argument("--out", required=True, help="output directory for model.safetensors + config.json")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: newest complete)")
    args = parser.parse_args(argv)
    try:
        weights = export_student(Path(args.src), Path(args.out), tag=args.tag)
    except (ExportError, ConfigError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    info = json.loads((weights.parent / "export.json").read_text())
    print(f"exported student to {weights}\nload with: {info['load']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
