"""Export the trained student as a plain timm checkpoint: ``python -m hybrid_distill.export RUN --out DIR``.

``RUN`` is a run directory (its newest complete checkpoint, or ``--tag``), a ``checkpoints`` directory or one
tag directory (``.../checkpoints/step_00001000``). The ZeRO shards are consolidated to fp32 with DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` (stages 1, 2 and 3; pure file reading, no process group or GPU),
the ``student.*`` weights are kept (prefix stripped) and the feature head ``head.*`` is dropped. The student is
rebuilt from the run's ``config.yaml`` with ``build_student`` and written by ``timm.models.save_for_hf``::

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
from pathlib import Path
from typing import Any

import torch
import yaml

from hybrid_distill.config import Config, config_from_dict
from hybrid_distill.errors import ConfigError, ExportError
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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    state = {k.removeprefix(STUDENT_PREFIX): v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise ExportError(f"{str(tag_dir)!r} holds no '{STUDENT_PREFIX}*' weights (keys: {sorted(full)[:5]} ...)")
    return state


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
    _write_docs(out, cfg.student.model, kwargs, tag_dir, norm)
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


def _write_docs(out: Path, model_name: str, kwargs: dict[str, Any], tag_dir: Path,
                norm: dict[str, list[float]]) -> None:
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
        f"{kwargs.get('img_size')} px. For fine-tuning pass e.g. `num_classes=1000, drop_path_rate=0.1` as well.\n")


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
