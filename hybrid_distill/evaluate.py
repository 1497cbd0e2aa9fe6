"""Feature evaluation of a ViT: ``python -m hybrid_distill.evaluate MODEL --train SRC --val SRC``.

``MODEL`` is an export directory (``python -m hybrid_distill.export``), a timm ``local-dir`` or a timm model name
(``--pretrained`` for its hub weights). ``SRC`` is any source the trainer reads, with labels: ``folder:ROOT``
(class folders), ``hf:NAME_OR_PATH`` (an integer label column), ``wds:PATTERN`` (``.cls`` members), ``synthetic``.

Weighted k-NN (DINO: cosine, ``k=20``, ``T=0.07``) and a linear probe (L2-regularised logistic regression on the
standardised features, L-BFGS) on the CLS token and on the mean of the patch tokens; top-1 and top-5 in percent.
Writes ``--out`` (JSON: metrics and settings) and prints one ``metric value`` line per metric. Run it under
``torchrun --nproc_per_node N -m hybrid_distill.evaluate ...`` (or srun) to extract features on N processes:
the results do not depend on N. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hybrid_distill.config import Config, EvalConfig, validate
from hybrid_distill.errors import ConfigError, HybridDistillError
from hybrid_distill.runtime.cluster import EXIT_BAD_INPUT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m hybrid_distill.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="export directory, timm local-dir, or timm model name")
    p.add_argument("--train", required=True, help="labelled images the classifiers are fitted on (SRC)")
    p.add_argument("--val", required=True, help="labelled images they are scored on (SRC)")
    p.add_argument("--train-split", default="train", help="hf/wds split of --train")
    p.add_argument("--val-split", default="validation", help="hf/wds split of --val")
    p.add_argument("--train-samples", type=int, default=None, help="seeded subset of --train (default: all)")
    p.add_argument("--val-samples", type=int, default=None, help="seeded subset of --val (default: all)")
    p.add_argument("--protocols", nargs="+", default=["knn", "linear"], choices=["knn", "linear"])
    p.add_argument("--pools", nargs="+", default=["cls", "avg"], choices=["cls", "avg"])
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours (DINO: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (DINO: 0.07)")
    p.add_argument("--linear-epochs", type=int, default=100, help="L-BFGS iterations of the linear probe")
    p.add_argument("--linear-weight-decay", type=float, default=1e-4, help="L2 penalty of the linear probe")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward and process")
    p.add_argument("--num-workers", type=int, default=4, help="data-loader workers per process")
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre crop of the resized image (224/256)")
    p.add_argument("--image-key", default=None, help="hf/wds image column (default: auto)")
    p.add_argument("--streaming", action="store_true", help="hf/wds: the first --*-samples of the stream")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset choice")
    p.add_argument("--pretrained", action="store_true", help="timm name: load its hub weights")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "hybrid_distill_cache"),
                   help="folder-index cache of folder sources")
    p.add_argument("--out", default="eval.json", help="output JSON")
    return p.parse_args(argv)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    """The ``EvalConfig`` the trainer would use for the same settings (one code path for both)."""
    cfg = Config(eval=EvalConfig(
        train_source=args.train, val_source=args.val, train_split=args.train_split, val_split=args.val_split,
        train_samples=args.train_samples, val_samples=args.val_samples, protocols=list(args.protocols),
        pools=list(args.pools), knn_k=args.k, knn_temperature=args.temperature, linear_epochs=args.linear_epochs,
        linear_weight_decay=args.linear_weight_decay, batch_size=args.batch_size, num_workers=args.num_workers,
        crop_pct=args.crop_pct, image_key=args.image_key, streaming=args.streaming))
    return validate(cfg).eval


def run(args: argparse.Namespace) -> dict:
    """Load the model and both sets, evaluate (every rank), return the JSON result."""
    import torch
    from timm.data import resolve_data_config

    from hybrid_distill.analysis import load_model
    from hybrid_distill.eval.data import EvalSet
    from hybrid_distill.eval.monitor import check_same_classes
    from hybrid_distill.eval.protocols import evaluate_model
    from hybrid_distill.runtime import cluster, distributed

    ev = eval_config(args)
    env = cluster.setup_dist_env()
    device = torch.device(args.device) if args.device else (
        torch.device("cuda", env.device_index(torch.cuda.device_count())) if torch.cuda.is_available() else
        torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1:
        distributed.init(device, cluster.dist_timeout())
    try:
        model = load_model(args.model, pretrained=args.pretrained)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"model {args.model!r} cannot be loaded: {e}") from e
    data_cfg = resolve_data_config(model=model)  # the normalisation in its pretrained_cfg (the export's)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    model = model.to(device).requires_grad_(False)
    size = model.patch_embed.img_size[0]
    sets = [EvalSet(src, key, size, split=split, num_samples=n, crop_pct=ev.crop_pct, seed=args.seed,
                    rank=env.rank, world_size=env.world_size, cache_dir=args.cache_dir, image_key=ev.image_key,
                    streaming=ev.streaming)
            for src, key, split, n in ((ev.train_source, "--train", ev.train_split, ev.train_samples),
                                       (ev.val_source, "--val", ev.val_split, ev.val_samples))]
    check_same_classes(*sets)
    metrics = evaluate_model(model, mean, std, sets[0], sets[1], ev, device=device)
    return {"model": args.model, "train": args.train, "val": args.val, "num_train": len(sets[0]),
            "num_val": len(sets[1]), "img_size": size, "mean": list(mean), "std": list(std),
            "world_size": env.world_size, "settings": {k: getattr(ev, k) for k in (
                "protocols", "pools", "knn_k", "knn_temperature", "linear_epochs", "linear_weight_decay",
                "crop_pct", "train_samples", "val_samples")}, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2: bad input)."""
    args = parse_args(argv)
    try:
        result = run(args)
    except (HybridDistillError, FileNotFoundError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result["world_size"] == 1 or _rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        width = max(len(k) for k in result["metrics"])
        for key, value in result["metrics"].items():
            print(f"{key:<{width}}  {value:7.2f}")
        print(f"wrote {args.out}")
    return 0


def _rank() -> int:
    from hybrid_distill.runtime import distributed

    return distributed.rank()


if __name__ == "__main__":
    sys.exit(main())
