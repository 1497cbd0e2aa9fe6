"""Loader throughput: decoded + cropped images/s for 1..N DataLoader workers, ours beside torchvision's.

    python benchmarks/data_throughput.py --make-corpus 500 --corpus-dir /tmp/imagenet_like --workers 1,2
    python benchmarks/data_throughput.py --source folder:/data/imagenet/train --workers 1,2,4,8 --seconds 60

``--make-corpus N`` writes N JPEGs with ImageNet-1K's typical size (about 400x350 pixels, ~110 KB, quality
90-95) into ``--corpus-dir`` (class subfolders) and benchmarks that folder. Each run builds the real loader
(``hybrid_distill.data.build_loader``), discards the first batches (worker start-up), then counts images for
``--seconds``. Memory: RSS and USS (pages only that process holds) of each worker, sampled while it runs.

For a folder source the same run also measures the loader a user would otherwise write (``--baseline``, on by
default): torchvision's ``ImageFolder`` + ``DataLoader`` with the same workers, batch size and crop
(``RandomResizedCrop(img_size, scale=crop_scale, antialias=True)``, ``RandomHorizontalFlip``, ``PILToTensor``:
uint8 CHW, like ours), and reports ours/theirs per worker count. Images/s per core is images/s over
``max(1, workers)``: each worker is one busy process (the main process only collates).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybrid_distill.config import DataConfig  # noqa: E402
from hybrid_distill.data import build_loader  # noqa: E402
from hybrid_distill.data.sources import synthetic_image  # noqa: E402


def make_corpus(root: Path, count: int, classes: int = 10, seed: int = 0) -> dict:
    """Write ``count`` ImageNet-like JPEGs under ``root/class_k/``; return size statistics."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        width = int(np.clip(rng.normal(405, 70), 200, 640))
        height = int(np.clip(rng.normal(345, 55), 180, 560))
        base = Image.fromarray(synthetic_image(i, 256)).resize((width, height), Image.BICUBIC)
        texture = rng.normal(0, 32, (height, width, 1)) + rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(base, np.float32) + texture, 0, 255).astype(np.uint8)
        path = root / f"class_{i % classes:03d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, "JPEG", quality=int(rng.integers(90, 96)))
        sizes.append((width, height, path.stat().st_size))
    width, height, nbytes = (float(v) for v in np.array(sizes, np.float64).mean(axis=0))
    return {"images": count, "mean_width": round(width), "mean_height": round(height),
            "mean_kb": round(nbytes / 1024, 1)}


class WorkerMemory(threading.Thread):
    """Peak RSS of the DataLoader worker processes (children of this process), sampled every 0.5 s.

    USS (``memory_full_info``, which reads /proc/PID/smaps and slows the worker while it does) is taken once,
    by ``final_uss`` after the timed window.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rss: dict[int, int] = {}
        self.uss: dict[int, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for child in psutil.Process().children(recursive=True):
                try:
                    self.rss[child.pid] = max(self.rss.get(child.pid, 0), child.memory_info().rss)
                except psutil.Error:
                    continue

    def final_uss(self) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                self.uss[child.pid] = child.memory_full_info().uss
            except psutil.Error:
                continue

    def summary(self) -> dict:
        def peak(values: dict[int, int]) -> int | None:
            return round(max(values.values()) / 2**20) if values else None

        return {"worker_rss_mb": peak(self.rss), "worker_uss_mb": peak(self.uss)}


def torchvision_loader(root: str, workers: int, args: argparse.Namespace):
    """The loader a user would otherwise use: torchvision ``ImageFolder`` + ``DataLoader``, the same crop."""
    import torch
    from torchvision import datasets, transforms

    crop = DataConfig().crop_scale if args.crop_scale is None else args.crop_scale
    transform = transforms.Compose([
        transforms.RandomResizedCrop(args.img_size, scale=tuple(crop), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.PILToTensor(),  # uint8 (3, S, S), like ours
    ])
    dataset = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=torch.cuda.is_available())

    class Epochs:  # the measuring loop below calls set_epoch and reads bad_samples, as on ours
        bad_samples = 0

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            for images, _ in loader:
                yield {"images": images}

    return Epochs()


def measure(source: str, workers: int, args: argparse.Namespace, cache_dir: Path, impl: str = "ours") -> dict:
    """Images/s of one configuration after ``--warmup`` batches, over ``--seconds``."""
    if impl == "torchvision":
        loader = torchvision_loader(source.split(":", 1)[1], workers, args)
    else:
        cfg = DataConfig(source=source, batch_size=args.batch_size, num_workers=workers, gpu_decode=args.gpu_decode,
                         streaming=args.streaming, num_samples=args.num_samples,
                         **({} if args.crop_scale is None else {"crop_scale": tuple(args.crop_scale)}))
        loader = build_loader(cfg, img_size=args.img_size, cache_dir=cache_dir)
    monitor = WorkerMemory()
    monitor.start()
    images, start, epoch, done = 0, None, 0, False
    while not done:
        loader.set_epoch(epoch)
        for k, batch in enumerate(loader):
            if start is None and k + 1 >= args.warmup:
                start = time.perf_counter()
                continue
            if start is not None:
                images += batch["images"].shape[0]
                if time.perf_counter() - start >= args.seconds:
                    done = True
                    break
        epoch += 1
    elapsed = time.perf_counter() - start
    monitor.final_uss()
    monitor.stop.set()
    monitor.join()
    main_rss = psutil.Process().memory_info().rss
    bad = loader.bad_samples
    return {"impl": impl, "workers": workers, "images_per_s": round(images / elapsed, 1),
            "images_per_s_per_core": round(images / elapsed / max(1, workers), 1), "images": images,
            "seconds": round(elapsed, 1), "bad_samples": bad, "main_rss_mb": round(main_rss / 2**20),
            **monitor.summary()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="data.source to read (default: the generated corpus)")
    parser.add_argument("--make-corpus", type=int, default=0, metavar="N", help="generate N ImageNet-like JPEGs")
    parser.add_argument("--corpus-dir", default=os.path.join(tempfile.gettempdir(), "hd_imagenet_like"))
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (0: main process)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per worker count")
    parser.add_argument("--warmup", type=int, default=2, help="batches discarded before timing")
    parser.add_argument("--gpu-decode", action="store_true", help="data.gpu_decode (nvjpeg via torchvision)")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="RandomResizedCrop area range (default: data.crop_scale's default)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure torchvision ImageFolder + DataLoader (folder sources)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the fastest is reported")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one worker count
    parser.add_argument("--impl", default="ours", choices=("ours", "torchvision"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def best_of(runs: list[dict]) -> dict:
    """The fastest of repeated runs (on a shared machine the slower ones measure the other jobs), with all rates."""
    best = max(runs, key=lambda r: r["images_per_s"])
    return {**best, "all_images_per_s": [r["images_per_s"] for r in runs]}


def run_one(workers: int, argv: list[str], cache: str, impl: str = "ours") -> dict:
    """Measure one worker count in a fresh interpreter (clean memory numbers, no state carried over)."""
    cmd = [sys.executable, __file__, *argv, "--one", str(workers), "--cache", cache, "--impl", impl]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    source = args.source or f"folder:{args.corpus_dir}"
    if args.one is not None:
        print(json.dumps(measure(source, args.one, args, Path(args.cache), args.impl)))
        return
    corpus = None
    if args.make_corpus:
        root = Path(args.corpus_dir)
        t0 = time.perf_counter()
        corpus = make_corpus(root, args.make_corpus)
        corpus["seconds_to_write"] = round(time.perf_counter() - t0, 1)
        print(f"corpus: {root} {corpus}", flush=True)
    child_argv = [a for a in argv if not a.startswith("--make-corpus")]
    if "--make-corpus" in argv:  # the "--make-corpus N" form: drop N too
        i = argv.index("--make-corpus")
        child_argv = argv[:i] + argv[i + 2:]
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        first = build_loader(DataConfig(source=source, batch_size=args.batch_size, num_workers=0,
                                        streaming=args.streaming, num_samples=args.num_samples),
                             img_size=args.img_size, cache_dir=cache)
        index_s = time.perf_counter() - t0
        index = getattr(getattr(first, "source", None), "index", None)
        del first
        load_before = os.getloadavg()[0]
        impls = ["ours", "torchvision"] if args.baseline and source.startswith("folder:") else ["ours"]
        rows = []
        for w in args.workers.split(","):
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.repeats):  # ours and theirs alternate, so both see the same load
                for impl in impls:
                    runs[impl].append(run_one(int(w), child_argv, cache, impl))
            rows += [best_of(runs[impl]) for impl in impls]
    report = {"command": " ".join(["python benchmarks/data_throughput.py", *argv]),
              "date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "loadavg_1min_before": round(load_before, 2),
              "loadavg_1min_after": round(os.getloadavg()[0], 2), "source": source, "corpus": corpus,
              "img_size": args.img_size, "batch_size": args.batch_size, "gpu_decode": args.gpu_decode,
              "index_build_s": round(index_s, 2),
              "index_bytes_per_sample": round(index.bytes_per_sample, 1) if index is not None else None,
              "results": rows}
    print(table(rows))
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def table(rows: list[dict]) -> str:
    """One line per worker count: ours, torchvision's (when measured) and the ratio; ours' memory."""
    by = {(r["workers"], r["impl"]): r for r in rows}
    lines = ["| workers | ours images/s | torchvision images/s | ours / torchvision | ours per core "
             "| torchvision per core | per-worker RSS MB | per-worker USS MB | main RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workers in dict.fromkeys(r["workers"] for r in rows):
        ours, theirs = by[(workers, "ours")], by.get((workers, "torchvision"))
        ratio = f"{ours['images_per_s'] / theirs['images_per_s']:.2f}" if theirs else "-"
        lines.append(f"| {workers} | {ours['images_per_s']} | {theirs['images_per_s'] if theirs else '-'} | {ratio} "
                     f"| {ours['images_per_s_per_core']} | {theirs['images_per_s_per_core'] if theirs else '-'} "
                     f"| {ours['worker_rss_mb']} | {ours['worker_uss_mb']} | {ours['main_rss_mb']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
