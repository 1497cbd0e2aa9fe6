"""Run logging: ``train.log``, ``metrics.jsonl``, TensorBoard, W&B, a console progress view and ``loss.png``.

Only the main rank writes files. ``metrics.jsonl`` has one JSON object per ``log`` call: ``step`` plus the
values passed (non-finite numbers are written as ``null`` so the file stays strict JSON). It is appended to, so a
resumed run continues the same file; the rows (and TensorBoard events) a crashed job logged after its last
checkpoint are dropped when the run resumes (``truncate_after``). A step may have several rows (the training row
and the evaluation row of the same step): ``read_metrics`` merges them, the later row winning for a key both hold.

Groups: ``log(step, values, group)`` with ``group="train"`` (the loss terms; TensorBoard ``train/KEY``, W&B
``KEY``), ``"eval"`` (online evaluation; ``eval/KEY`` in both) or ``"teachers"`` (start-up diagnostics).

Console: on an interactive terminal a tqdm bar with the loss; otherwise (SLURM logs, pipes) one plain line
per ``log`` call with a timestamp and, for training rows, the ETA, e.g.
``2026-12-01 10:00:00 step 120/5000 | loss 0.4321 | feat 0.3012 | lr 1.20e-04 | 850 img/s | eta 1:02:03``.
Known keys get short labels (``LABELS``), in that order; other keys follow as ``key value``, and ``time_*`` keys
are gathered at the end as ``time(s) data 0.012 teachers 0.034 ...``. Throughputs are printed with three
significant digits below 100 (``0.0421 img/s``), never rounded to 0. Evaluation rows print per-block keys
(``attn_distance_b0``, ``attn_distance_b1``, ...) as one list (``attn_distance 98.1 87.4 ...``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from hybrid_distill.config import RunConfig
from hybrid_distill.runtime.durable import write_atomic

LOGGER_NAME = "hybrid_distill"
log = logging.getLogger(f"{LOGGER_NAME}.metrics")
WANDB_ID_FILE = "wandb_run_id"  # one W&B run per run directory: every resume and requeue continues it

# key -> (label, format); the plain line lists these first, in this order, then the other keys.
LABELS: dict[str, tuple[str, str]] = {
    "epoch": ("ep", "{:.2f}"),
    "loss": ("loss", "{:.4f}"),
    "feature_loss": ("feat", "{:.4f}"),
    "relation_loss": ("rel", "{:.4f}"),
    "lr": ("lr", "{:.2e}"),
    "grad_norm": ("gnorm", "{:.3f}"),
    "keep_ratio": ("keep", "{:.3f}"),
    "images_per_s": ("img/s", "sig"),
    "images_per_s_per_device": ("img/s/dev", "sig"),
    "tflops_per_device": ("TFLOP/s/dev", "sig"),
    "mfu": ("MFU", "{:.1%}"),
    "max_memory_gib": ("mem", "{:.1f}GiB"),
    "skipped_steps": ("skipped", "{:d}"),
}
PLOTTED = ("loss", "feature_loss", "relation_loss")
EVAL_PLOTTED = re.compile(r"^(knn|linear)_\w+_top1$")  # one extra loss.png panel: the evaluation top-1 curves
PER_BLOCK = re.compile(r"^(.*)_b(\d+)$")


class _ConsoleFilter(logging.Filter):
    """Drops records logged with ``extra={"console": False}`` (step lines: ``MetricsLogger`` prints those itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


class _RunLogHandler(logging.FileHandler):
    """``train.log``: a write that fails (a full disk) is reported once on stderr, not as a traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            error = sys.exc_info()[1]
            print(f"[hybrid_distill] could not write {self.baseFilename} ({type(error).__name__}: {error}); its log "
                  "lines go to stderr only", file=sys.stderr, flush=True)


class _TqdmHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(run_dir: str | Path, is_main: bool, rank: int | None = None) -> logging.Logger:
    """Configure the ``hybrid_distill`` logger (idempotent).

    Main rank: INFO and above to stderr and to ``<run_dir>/train.log``. Other ranks: WARNING and above to
    stderr only, prefixed with ``[rank N]``; no files.

    Args:
        run_dir: the run directory (created on the main rank).
        is_main: whether this is the main (global rank 0) process.
        rank: global rank for the prefix (default: the ``RANK`` environment variable, else 0).

    Returns:
        The configured logger.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.addFilter(_ConsoleFilter())
    console.setFormatter(fmt)
    logger.addHandler(console)
    if is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file_handler = _RunLogHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def format_line(step: int, total_steps: int, values: dict[str, Any]) -> str:
    """The plain progress line, e.g. ``step 120/5000 | loss 0.4321 | feat 0.3000 | lr 1.20e-04 | 850 img/s``."""
    parts = [f"step {step}/{total_steps}"]
    for key, (label, spec) in LABELS.items():
        if key in values:
            parts.append(_labelled(label, _format(values[key], spec)))
    parts += [f"{key} {_format(value, '{:.4g}')}" for key, value in values.items()
              if key not in LABELS and not key.startswith("time_")]
    times = [f"{key.removeprefix('time_')} {_format(value, '{:.3g}')}" for key, value in values.items()
             if key.startswith("time_")]
    if times:
        parts.append("time(s) " + " ".join(times))
    return " | ".join(parts)


def format_eval_line(step: int, total_steps: int, values: dict[str, Any], group: str = "eval") -> str:
    """An evaluation row, e.g. ``eval step 1000/5000 | knn_cls_top1 45.2 | attn_nmi 0.41 0.38 | ...``.

    Keys ``NAME_b<i>`` (one per block) are printed as one list ``NAME v0 v1 ...`` in block order.
    """
    parts, lists = [f"{group} step {step}/{total_steps}"], {}
    for key, value in values.items():
        match = PER_BLOCK.match(key)
        if match:
            lists.setdefault(match.group(1), {})[int(match.group(2))] = value
        else:
            parts.append(f"{key} {_format(value, '{:.4g}')}")
    for name, blocks in lists.items():
        parts.append(f"{name} " + " ".join(_format(blocks[i], "{:.3g}") for i in sorted(blocks)))
    return " | ".join(parts)


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (hours may exceed 24), or ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _labelled(label: str, text: str) -> str:
    return f"{text} {label}" if "/s" in label else f"{label} {text}"


def significant(value: float) -> str:
    """A throughput: integer from 100 up, else three significant digits (``0.0421``), never a bare 0."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "nan"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        if spec == "sig":
            return significant(float(value))
        return spec.format(int(value) if spec.endswith("d}") else value)
    except (ValueError, TypeError):
        return str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes every logged step to ``metrics.jsonl``, TensorBoard, W&B and the console (main rank only).

    Args:
        run_dir: the run directory.
        cfg: ``RunConfig`` (``tensorboard``, ``wandb``, ``wandb_project``).
        is_main: only the main rank writes anything; other ranks' calls are no-ops.
        total_steps: optimizer steps in the run (progress bar length, ``step N/total``).
        config: optional full config dict, recorded as the W&B run config.
        initial_step: the step the run (re)starts from. Rows of ``metrics.jsonl`` and TensorBoard events after it
            (logged by a job that died after its last checkpoint) are dropped: those steps are trained again.
    """

    def __init__(self, run_dir: str | Path, cfg: RunConfig, is_main: bool, total_steps: int,
                 config: dict[str, Any] | None = None, initial_step: int = 0):
        self.run_dir, self.cfg, self.is_main, self.total_steps = Path(run_dir), cfg, is_main, total_steps
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self._tb = self._wandb = self._bar = None
        self._clock = (time.monotonic(), initial_step)  # ETA reference: (time, step), moved to the first train row
        self._first_row = True
        self._write_failed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, initial_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = self._open_tensorboard(initial_step) if cfg.tensorboard else None
        self._wandb = self._open_wandb(config) if cfg.wandb else None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit="step")

    def _open_tensorboard(self, initial_step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=initial_step + 1)

    def _open_wandb(self, config: dict[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            log.warning("run.wandb=true but wandb is not installed (pip install wandb); logging without W&B")
            return None
        return wandb.init(project=self.cfg.wandb_project, dir=str(self.run_dir), config=config, name=self.run_dir.name,
                          id=wandb_run_id(self.run_dir), resume="allow")

    def log(self, step: int, values: dict[str, Any], group: str = "train") -> None:
        """Record ``values`` (floats/ints, 0-d tensors accepted) at optimizer step ``step``.

        Args:
            step: optimizer step.
            values: the row.
            group: ``train`` (TensorBoard ``train/KEY``, W&B ``KEY``, the progress line with its ETA), or another
                group such as ``eval`` (``GROUP/KEY`` in both, its own console line).
        """
        if not self.is_main:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: training goes on; the next checkpoint save reports it (exit 74)
            if not self._write_failed:
                log.warning("could not append to %s (%s); metrics rows are lost until it is writable again",
                            self.path, e)
            self._write_failed = True
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{group}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(numeric if group == "train" else {f"{group}/{k}": v for k, v in numeric.items()},
                            step=step)
        self._console(step, row, group)

    def eta(self, step: int) -> float:
        """Seconds left at ``step``, from the rate since the first training row of this job (before it: start-up)."""
        t0, s0 = self._clock
        rate = (step - s0) / max(time.monotonic() - t0, 1e-9)
        return (self.total_steps - step) / rate if rate > 0 else float("nan")

    def _console(self, step: int, row: dict[str, Any], group: str = "train") -> None:
        values = {k: v for k, v in row.items() if k != "step"}
        if group != "train":
            line = format_eval_line(step, self.total_steps, values, group)
        else:
            line = f"{format_line(step, self.total_steps, values)} | eta {format_eta(self.eta(step))}"
            if self._first_row:  # later ETAs: the rate of the training steps only, not of the start-up
                self._clock, self._first_row = (time.monotonic(), step), False
        log.info(line, extra={"console": False})  # to train.log only; the console gets it below
        if self._bar is None or group != "train":
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{stamp} {line}", file=sys.stderr, flush=True)
            return
        self._bar.n = min(step, self.total_steps)
        if row.get("loss") is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Write ``loss.png`` from ``metrics.jsonl`` and close every writer (safe to call twice, never raises on a full
        disk: the run's outcome is decided elsewhere)."""
        if not self.is_main or self._file is None:
            return
        closers = [self._file.close] + [w.close for w in (self._bar, self._tb) if w is not None]
        closers += [self._wandb.finish] if self._wandb is not None else []
        self._file = None
        for close in closers:
            _quietly(close, "closing the run's logs")
        _quietly(lambda: plot_losses(self.path, self.run_dir / "loss.png"), f"writing {self.run_dir / 'loss.png'}")


def _quietly(action: Any, what: str) -> None:
    """Run ``action``; an ``OSError`` (full disk, vanished directory) is only logged."""
    try:
        action()
    except OSError as e:
        log.warning("%s failed: %s: %s", what, type(e).__name__, e)


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of ``run_dir``: read from ``<run_dir>/wandb_run_id``, or made and written there once."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    write_atomic(path, run_id + "\n")
    return run_id


def count_rows(path: str | Path) -> int:
    """Non-empty lines of a ``metrics.jsonl`` (0 when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _parse_rows(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """``(line, row)`` for every parsable row of a ``metrics.jsonl``, and how many lines were not.

    A line that is not a JSON object with an integer ``step`` (e.g. torn by a node crash or a full disk) is
    skipped with a warning naming the file and line number.
    """
    rows, bad = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
            bad += 1
            log.warning("%s:%d: skipping an unparsable metrics row (%s: %s): %.80s", path, number,
                        type(e).__name__, e, line)
            continue
        rows.append((line, row))
    return rows, bad


def truncate_after(path: Path, step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` logged after ``step``, and unparsable (torn) lines (atomically)."""
    if not path.is_file():
        return
    rows, bad = _parse_rows(path)
    kept = [line for line, row in rows if int(row["step"]) <= step]
    if len(kept) < len(rows) or bad:
        write_atomic(path, "".join(f"{line}\n" for line in kept))  # on a full disk: OSError, the file as it was
        if len(kept) < len(rows):
            log.info("dropped %d rows after step %d from %s (steps to be trained again)", len(rows) - len(kept), step,
                     path)
        if bad:
            log.warning("removed %d unparsable lines from %s", bad, path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl``, one per step, sorted by step: the rows of a step merged, later keys winning.

    Unparsable lines (a torn last row) are skipped with a warning.
    """
    rows: dict[int, dict[str, Any]] = {}
    for _, row in _parse_rows(Path(path))[0]:
        rows.setdefault(int(row["step"]), {}).update(row)
    return [rows[s] for s in sorted(rows)]


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Plot ``loss``, ``feature_loss`` and ``relation_loss`` against step into a PNG (matplotlib Agg), and, when the
    run evaluated, a last panel with the k-NN / linear-probe top-1 curves (``knn_cls_top1``, ...).

    Returns:
        ``out_path``, or None when there is nothing to plot.
    """
    rows = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    series = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for key in PLOTTED}
    if not any(series.values()):
        log.warning("no losses in %s; not writing %s", metrics_path, out_path)
        return None
    evals = sorted({k for r in rows for k in r if EVAL_PLOTTED.match(k)})
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    # One panel per term: the relation loss is orders of magnitude below the feature loss.
    panels = len(PLOTTED) + bool(evals)
    fig = Figure(figsize=(7, 2.2 * panels), dpi=120)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, series.items(), strict=False):
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], color="C0")
        ax.set(ylabel=key)
        ax.grid(alpha=0.3)
    if evals:
        ax = axes[-1]
        for i, key in enumerate(evals):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, color=f"C{i}", label=key)
        ax.set(ylabel="eval top-1 (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_title("hybrid distillation")
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_path)
    return Path(out_path)
