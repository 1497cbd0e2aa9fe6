"""DeepSpeed checkpoints with completion markers, pruning, resume resolution and world-size changes.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/                 DeepSpeed's files (model states, ZeRO optimizer shards) + COMPLETE
    step_00000100_universal/       made on demand by ``ensure_universal`` when the world size changed
    latest                         DeepSpeed's pointer to the last saved tag (its zero_to_fp32.py reads it)
    latest_universal               ds_to_universal's pointer to the last conversion

A checkpoint counts only once its ``COMPLETE`` marker exists and holds a JSON object with ``step`` and
``world_size``. Every rank fsyncs each file it writes; rank 0 writes the marker atomically (fsynced, then its
directory) after every rank has, so a job killed mid-save - or a node losing power just after - leaves a
directory that is never picked (``find_latest`` ignores it and the next save prunes it). Then rank 0 points
``latest`` at it. Weights holding NaN/inf are never saved (``NonFiniteWeights``), and a save that fails on any
rank (a full disk) fails on every rank with the partial directory removed (``SaveFailed``).

Resuming on a different number of processes: a ZeRO checkpoint holds one optimizer shard per rank and cannot
be loaded on another world size. ``save`` stores ``universal_checkpoint_info`` so that DeepSpeed's converter
(``python -m deepspeed.checkpoint.ds_to_universal``) can turn it into a *universal* checkpoint, which loads
on any world size with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config. The trainer does::

    tag_dir = resolve_resume(args.resume, run_dir)
    if tag_dir is not None and needs_universal(tag_dir):
        tag_dir = ensure_universal(tag_dir)               # rank 0 converts; the others poll for its marker
        ds_config["checkpoint"] = {"load_universal": True}
    engine = build_engine(...)
    client_state = load(engine, tag_dir, load_universal=ds_config.get("checkpoint", {}).get("load_universal", False))
    restore_rng_states(client_state)

Checked with deepspeed 0.19.8 on CPU (gloo), 2 processes -> 1, for every ZeRO setup the trainer runs (stages
1, 2, 3, CPU offload, fp32 and bf16: tests/test_zero_matrix.py, docs/checkpoints.md): fp32 master weights, AdamW
``exp_avg``/``exp_avg_sq``, the AdamW step count and the client state are restored exactly, and the next optimizer
step on 1 process (2 micro-batches accumulated) matches the 2-process step to float rounding (< 1e-6 in fp32).
Not carried across a world-size change: the per-rank RNG states (``restore_rng_states`` then returns False and
the trainer reseeds). ``load`` works around two bugs of DeepSpeed 0.19.8's ZeRO-3 universal load (see
``_repair_optimizer``) that otherwise make the resumed run diverge.

Loading uses ``torch.load(weights_only=False)`` inside DeepSpeed (and in its converter): these are DeepSpeed's
own files written by this trainer; do not resume from checkpoints of untrusted origin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybrid_distill.errors import CheckpointError
from hybrid_distill.runtime import distributed
from hybrid_distill.runtime.cluster import Stopped
from hybrid_distill.runtime.durable import fsync_dir, fsync_file, write_atomic

log = logging.getLogger("hybrid_distill.runtime.checkpoint")

MARKER = "COMPLETE"
LATEST = "latest"  # DeepSpeed's pointer to the newest tag (its zero_to_fp32.py reads it)
LATEST_UNIVERSAL = "latest_universal"  # written by ds_to_universal next to the converted folder
UNIVERSAL_SUFFIX = "_universal"
REQUIRED_MARKER_KEYS = ("step", "world_size")
_TAG_RE = re.compile(r"^step_(\d+)$")


class SaveFailed(RuntimeError):
    """A checkpoint could not be written on some rank (disk full, quota, I/O error); its directory was removed and
    the older checkpoints are untouched. The message names the rank, the file and the error."""


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or inf: they are never made a resumable checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Names, markers, discovery


def tag_name(step: int) -> str:
    """Checkpoint tag for an optimizer step, e.g. ``step_00000120``."""
    return f"step_{step:08d}"


def tag_step(path: str | Path) -> int | None:
    """Step encoded in a tag directory name, or None for anything else (including ``*_universal``)."""
    match = _TAG_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def marker_problem(tag_dir: str | Path) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint (its ``COMPLETE`` marker is missing or invalid), or None."""
    path = Path(tag_dir) / MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return f"no {MARKER} marker (its save did not finish)"
    except (OSError, ValueError) as e:
        return f"its {MARKER} marker is unreadable ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return f"its {MARKER} marker holds a JSON {type(data).__name__}, not an object"
    missing = [k for k in REQUIRED_MARKER_KEYS if not isinstance(data.get(k), int) or isinstance(data.get(k), bool)]
    if missing:
        return f"its {MARKER} marker lacks {', '.join(missing)}"
    return None


def read_marker(tag_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``COMPLETE`` marker of a checkpoint directory, or None when it is absent or invalid
    (``marker_problem`` says why)."""
    if marker_problem(tag_dir) is not None:
        return None
    return json.loads((Path(tag_dir) / MARKER).read_text())


def write_marker(tag_dir: str | Path, info: dict[str, Any]) -> None:
    """Write the ``COMPLETE`` marker atomically and durably (fsynced file, then its directory)."""
    write_atomic(Path(tag_dir) / MARKER, json.dumps(info, indent=2) + "\n")


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete tag directories under ``ckpt_dir``, oldest step first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and tag_step(p) is not None and read_marker(p) is not None]
    return sorted(tags, key=tag_step)


def older_checkpoints(tag_dir: str | Path) -> list[Path]:
    """Complete checkpoints older than ``tag_dir`` (or its ``*_universal`` conversion) beside it, newest first."""
    tag_dir = Path(tag_dir)
    step = tag_step(tag_dir.name.removesuffix(UNIVERSAL_SUFFIX)) or 0
    return [p for p in reversed(complete_checkpoints(tag_dir.parent)) if tag_step(p) < step]


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (tag directory with a marker) under ``ckpt_dir``, or None."""
    tags = complete_checkpoints(ckpt_dir)
    return tags[-1] if tags else None


def resolve_resume(arg: str, run_dir: str | Path) -> Path | None:
    """Turn ``--resume`` into a checkpoint directory.

    Args:
        arg: ``"auto"`` (newest complete checkpoint of this run, None if there is none), ``"none"``, or a path:
            a tag directory, its ``*_universal`` conversion (made by hand with ``ds_to_universal``: the source tag
            beside it is returned and the conversion reused), a ``checkpoints`` directory or a run directory (newest
            complete checkpoint in it).
        run_dir: this run's directory (``auto`` looks in ``<run_dir>/checkpoints``).

    Raises:
        CheckpointError: the path does not exist, is an incomplete checkpoint, or holds no complete checkpoint; or
            (``auto``) a newer checkpoint than the one found has a ``COMPLETE`` marker that is present but invalid
            (it is named: resuming from an older one silently would drop its steps).
    """
    if arg == "none":
        return None
    if arg == "auto":
        return _newest_resumable(Path(run_dir) / "checkpoints")
    path = Path(arg)
    if not path.exists():
        raise CheckpointError(f"--resume {arg}: {str(path)!r} does not exist")
    if _universal_source(path) is not None:
        path = _universal_source(path)
        if tag_step(path) is None or not path.is_dir():
            raise CheckpointError(f"--resume {arg}: a universal conversion is resumed through its source checkpoint, "
                                  f"which must lie beside it as {str(path)!r}")
    if tag_step(path) is not None:
        problem = marker_problem(path)
        if problem is not None:
            raise CheckpointError(f"--resume {arg}: {str(path)!r} is incomplete: {problem}; pick an older checkpoint "
                                  "or use --resume auto")
        return path
    for candidate in (path, path / "checkpoints"):
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    raise CheckpointError(f"--resume {arg}: no complete checkpoint (step_XXXXXXXX directory with a {MARKER} "
                          f"marker) in {str(path)!r}")


def _newest_resumable(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are reported (skipped if their save did not finish,
    refused if their marker exists but is invalid)."""
    latest = find_latest(ckpt_dir)
    newest = tag_step(latest) if latest is not None else -1
    steps = {p: tag_step(p) for p in ckpt_dir.iterdir() if p.is_dir()} if ckpt_dir.is_dir() else {}
    newer = sorted((p for p, step in steps.items() if step is not None and step > newest), key=tag_step)
    invalid = [(p, marker_problem(p)) for p in newer if (p / MARKER).exists()]
    if invalid:
        listed = "; ".join(f"{p}: {why}" for p, why in invalid)
        fallback = f"the older {latest.name}" if latest is not None else "nothing (a fresh start)"
        raise CheckpointError(f"--resume auto: newer checkpoints than {latest.name if latest else 'any complete one'} "
                              f"have an invalid marker ({listed}). --resume auto would continue from {fallback} and "
                              "drop their steps: move them away, or pass --resume PATH")
    for p in newer:
        log.info("skipping %s: %s", p, marker_problem(p))
    return latest


# ----------------------------------------------------------------------------------------------------------------
# Save and prune


def save(engine: Any, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Save a DeepSpeed checkpoint tagged ``step_{step:08d}``; call on every rank.

    ``client_state`` is stored in DeepSpeed's model-states file (and returned by ``load``), extended with
    ``universal_checkpoint_info`` (needed by the universal converter) and ``rng_states`` (every rank's RNG
    state, gathered, see ``restore_rng_states``). An existing directory for the same step (a run resumed
    from an older checkpoint) is replaced. Every file is fsynced by the rank that wrote it; once all ranks have
    written theirs, rank 0 writes the ``COMPLETE`` marker (fsynced with its directory), then DeepSpeed's ``latest``
    pointer, and prunes to the newest ``keep_last`` complete checkpoints.

    Raises:
        NonFiniteWeights: some rank's weights hold NaN/inf (checked first: nothing is written, nothing pruned).
        SaveFailed: a rank could not write its files (e.g. disk full): every rank raises, the partial directory is
            removed, older checkpoints are untouched.

    Returns:
        The tag directory.
    """
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag_name(step)
    if not weights_finite(engine):
        raise NonFiniteWeights(f"the weights at step {step} hold NaN or inf: not saved as {tag_dir.name}; the older "
                               "checkpoints are kept")
    if distributed.rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in (tag_dir, universal_dir(tag_dir)):
            _remove_checkpoint(stale)
        newer = [p.name for p in complete_checkpoints(ckpt_dir) if tag_step(p) > step]
        if newer:
            log.warning("checkpoints newer than step %d exist in %s (%s): this run was resumed from an older one, "
                        "and --resume auto picks the newest step; delete them to continue from this run", step,
                        ckpt_dir, ", ".join(newer))
    state = dict(client_state, universal_checkpoint_info={}, rng_states=distributed.all_gather_objects(rng_state()))
    distributed.barrier()
    with _durable_writes(engine) as failures:
        try:
            engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=state, save_latest=False)
        except OSError as e:  # rank 0's copy of zero_to_fp32.py, DeepSpeed's last step before its final barrier
            failures.append(f"{ckpt_dir}: {e}")
            distributed.barrier()
    _raise_if_failed(distributed.all_gather_objects(failures), tag_dir)
    error = None
    if distributed.rank() == 0:
        error = _commit(engine, tag_dir, step, client_state, keep_last)
    _raise_if_failed(distributed.all_gather_objects([error] if error else []), tag_dir)
    return tag_dir


def weights_finite(engine: Any) -> bool:
    """Whether every rank's weights (its ZeRO-3 partition, or the full parameters) are finite; a collective."""
    local = [getattr(p, "ds_tensor", p).detach() for p in engine.module.parameters()]
    ok = torch.stack([torch.isfinite(t).all() for t in local if t.numel()]).all() if local else torch.tensor(True)
    return not distributed.any_rank(~ok)


@contextlib.contextmanager
def _durable_writes(engine: Any) -> Iterator[list[str]]:
    """While DeepSpeed saves: fsync every file its checkpoint engine writes, and record (not raise) write errors, so
    that every rank still reaches DeepSpeed's final barrier and the failure can be agreed on afterwards."""
    writer = getattr(engine, "checkpoint_engine", None)
    failures: list[str] = []
    if writer is None:
        yield failures
        return
    original = writer.save

    def save(state_dict: Any, path: str) -> None:
        try:
            original(state_dict, path)
            fsync_file(path)
        except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError for a failed zip write (ENOSPC)
            failures.append(f"{path}: {type(e).__name__}: {e} ({_free_space(path)})")

    own = vars(writer).get("save")  # normally absent: DeepSpeed's engines define save on the class
    writer.save = save
    try:
        yield failures
    finally:
        if own is None:
            del writer.save
        else:
            writer.save = own


def _free_space(path: str | Path) -> str:
    """``0.0 MiB free there``: torch's zip writer reports a full disk as "unexpected pos", not ENOSPC."""
    try:
        return f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


def _commit(engine: Any, tag_dir: Path, step: int, client_state: dict[str, Any], keep_last: int) -> str | None:
    """Rank 0, after every rank wrote and fsynced its files: marker, ``latest``, prune. The error text, or None."""
    try:
        fsync_dir(tag_dir)
        write_marker(tag_dir, {"step": step, "tag": tag_dir.name, "world_size": distributed.world_size(),
                               "zero_stage": int(engine.zero_optimization_stage()),
                               "deepspeed": _ds_version(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "config": client_state.get("config")})
    except OSError as e:
        return f"{tag_dir / MARKER}: {type(e).__name__}: {e}"
    try:
        write_atomic(tag_dir.parent / LATEST, tag_dir.name)
        prune(tag_dir.parent, keep_last, protect=tag_dir)
    except OSError as e:  # the checkpoint itself is complete
        log.warning("checkpoint %s is complete, but updating %s / pruning failed: %s", tag_dir, LATEST, e)
    return None


def _raise_if_failed(failures_by_rank: list[list[str]], tag_dir: Path) -> None:
    """Every rank: raise ``SaveFailed`` when any rank failed (rank 0 first removes the partial directory)."""
    bad = [(rank, f) for rank, failures in enumerate(failures_by_rank) for f in failures]
    if not bad:
        return
    if distributed.rank() == 0:
        with contextlib.suppress(OSError):
            _remove_checkpoint(tag_dir)
    distributed.barrier()
    rank, first = bad[0]
    more = f" (and {len(bad) - 1} more failed writes)" if len(bad) > 1 else ""
    raise SaveFailed(f"could not write checkpoint {tag_dir} on rank {rank}: {first}{more}")


def prune(ckpt_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` and stale leftovers; rank 0 only.

    Stale leftovers are incomplete tag directories older than the newest complete checkpoint (a save that was
    interrupted) and ``*_universal`` conversions whose source checkpoint is gone. ``protect`` is never deleted.
    Incomplete directories newer than the newest complete checkpoint are left alone.

    Returns:
        The deleted directories.
    """
    root = Path(ckpt_dir)
    complete = complete_checkpoints(root)
    keep = {p.name for p in (complete[-keep_last:] if keep_last > 0 else [])}
    if protect is not None:
        keep.add(Path(protect).name)
    newest = tag_step(complete[-1]) if complete else -1
    doomed = [p for p in complete if p.name not in keep]
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name not in keep and tag_step(p) is not None
               and read_marker(p) is None and tag_step(p) < newest]
    for path in doomed:
        _remove_checkpoint(path)
    orphans = [p for p in root.iterdir() if p.is_dir() and _universal_source(p) is not None
               and not _universal_source(p).is_dir()]
    for path in orphans:
        _remove_checkpoint(path)
    return doomed + orphans


def _remove_checkpoint(path: Path) -> None:
    """Remove the marker first, so a crash half-way leaves an incomplete (never picked) directory."""
    if not path.exists():
        return
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Universal checkpoints (world-size changes)


def universal_dir(tag_dir: str | Path) -> Path:
    """Where the universal conversion of ``tag_dir`` lives: ``<tag_dir>_universal``."""
    tag_dir = Path(tag_dir)
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def _universal_source(path: Path) -> Path | None:
    name = path.name.removesuffix(".tmp")
    if not name.endswith(UNIVERSAL_SUFFIX):
        return None
    return path.with_name(name.removesuffix(UNIVERSAL_SUFFIX))


def needs_universal(tag_dir: str | Path, world_size: int | None = None) -> bool:
    """True when ``tag_dir`` was saved with a different world size than ``world_size`` (default: current)."""
    marker = _require_marker(tag_dir)
    return int(marker["world_size"]) != (world_size or distributed.world_size())


def ensure_universal(tag_dir: str | Path, world_size: int | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Path:
    """Return a directory loadable on the current world size; convert to a universal checkpoint if needed.

    Same world size: ``tag_dir`` itself. Otherwise rank 0 runs DeepSpeed's converter into
    ``<tag_dir>_universal`` (once: a complete conversion is reused, also one made by hand with
    ``ds_to_universal``, which then gets its marker) while the other ranks watch the shared file system for its
    marker (or rank 0's failure note), with no deadline: converting a large ZeRO checkpoint may take longer than
    the process-group timeout, so they do not wait in a collective. Call on every rank, after the process group
    exists, before ``build_engine``. The caller must then set ``ds_config["checkpoint"] = {"load_universal": True}``
    and call ``load(..., load_universal=True)``.

    Args:
        tag_dir: a complete checkpoint.
        world_size: the world size to load on (default: the current one).
        should_stop: polled about once a second during the conversion (or the wait for it): True (a preemption
            signal, a stop file) stops the converter and raises ``Stopped`` on every rank.

    Raises:
        CheckpointError: the checkpoint is incomplete or the conversion failed (on every rank).
        Stopped: a stop was requested during the conversion; nothing is lost (the next job converts again).
    """
    tag_dir = Path(tag_dir)
    if not needs_universal(tag_dir, world_size):
        return tag_dir
    out = universal_dir(tag_dir)
    failed = out.with_name(out.name + ".failed")
    if distributed.rank() == 0:
        failed.unlink(missing_ok=True)
    distributed.barrier()  # no rank reads a failure note left by an earlier attempt
    if distributed.rank() == 0 and read_marker(out) is None:
        try:
            if finished_conversion(tag_dir, out):
                log.info("reusing the universal conversion %s (made by hand)", out)
                write_marker(out, dict(_require_marker(tag_dir), universal=True, source=tag_dir.name))
            else:
                convert_to_universal(tag_dir, out, should_stop)
        except (CheckpointError, Stopped) as e:
            failed.write_text(f"{'stopped' if isinstance(e, Stopped) else 'failed'}: {e}")
            raise
    _wait_for_conversion(out, failed, should_stop=should_stop)
    distributed.barrier()
    return out


def finished_conversion(tag_dir: Path, out: Path) -> bool:
    """Whether ``out`` holds a finished ``ds_to_universal`` conversion of ``tag_dir`` without our marker: its last
    step copies the model-state files, so all of them are there at full size."""
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states or not (out / "zero").is_dir():
        return False
    return all((out / f.name).is_file() and (out / f.name).stat().st_size == f.stat().st_size for f in states)


def _wait_for_conversion(out: Path, failed: Path, poll_s: float = 2.0, report_s: float = 60.0,
                         should_stop: Callable[[], bool] | None = None) -> None:
    """Block until ``out`` has its marker; raise if rank 0 wrote the failure note ``failed`` instead, or on a stop."""
    start = last = time.monotonic()
    while read_marker(out) is None:
        if failed.exists():
            note = failed.read_text()
            if note.startswith("stopped"):
                raise Stopped(f"rank 0 stopped the universal conversion to {str(out)!r}: {note}")
            note = note.removeprefix("failed: ")
            raise CheckpointError(f"universal conversion to {str(out)!r} failed on rank 0: {note}")
        if should_stop is not None and should_stop():
            raise Stopped(f"stop requested while waiting for the universal conversion to {str(out)!r}")
        if time.monotonic() - last > report_s:
            last = time.monotonic()
            log.info("waiting for rank 0 to convert %s (%.0f s so far)", out, last - start)
        time.sleep(poll_s)


def convert_to_universal(tag_dir: str | Path, out: str | Path, should_stop: Callable[[], bool] | None = None) -> Path:
    """Run ``python -m deepspeed.checkpoint.ds_to_universal`` on ``tag_dir``; atomically produce ``out``.

    Converts into ``<out>.tmp``, adds a ``COMPLETE`` marker (the source's plus ``"universal": true``), renames it to
    ``out`` and points DeepSpeed's ``latest_universal`` at it. Single process; no process group needed.

    Raises:
        CheckpointError: the converter failed (its output's tail is in the message).
        Stopped: ``should_stop()`` became True, or the converter was killed by a signal while a stop was
            requested (SLURM signals every process of the job step): the converter is ended and ``<out>.tmp``
            removed.
    """
    tag_dir, out = Path(tag_dir), Path(out)
    marker = _require_marker(tag_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", workers, "--num_merge_workers", workers]
    log.info("converting %s to a universal checkpoint: %s", tag_dir, " ".join(cmd))
    with tempfile.TemporaryFile("w+") as output:
        returncode = _run_stoppable(cmd, output, should_stop)
        output.seek(0)
        tail = output.read()[-3000:]
    stop = should_stop is not None and should_stop()
    if returncode is None or (returncode < 0 and stop):
        shutil.rmtree(tmp, ignore_errors=True)
        raise Stopped(f"stop requested during the universal conversion of {str(tag_dir)!r}; nothing is lost, the "
                      "next job converts again")
    if returncode != 0:
        raise CheckpointError(f"universal conversion of {str(tag_dir)!r} failed (exit {returncode}):\n{tail}")
    write_marker(tmp, dict(marker, universal=True, source=tag_dir.name))
    _remove_checkpoint(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    write_atomic(out.parent / LATEST_UNIVERSAL, out.name)  # ds_to_universal pointed it at the .tmp folder
    return out


def _run_stoppable(cmd: list[str], output: Any, should_stop: Callable[[], bool] | None) -> int | None:
    """Run ``cmd`` to the end (its exit code) or until ``should_stop()`` (then end it and return None)."""
    proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if should_stop is not None and should_stop():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                return None


# ----------------------------------------------------------------------------------------------------------------
# Load


def load(engine: Any, tag_dir: str | Path, load_universal: bool = False) -> dict[str, Any]:
    """Load weights, optimizer state and client state from a checkpoint into ``engine``; call on every rank.

    Args:
        engine: a DeepSpeed engine built with the same module and optimizer layout.
        tag_dir: a complete tag directory (or its ``*_universal`` conversion).
        load_universal: load the universal conversion; the engine must have been built with
            ``"checkpoint": {"load_universal": true}`` (see ``ensure_universal``).

    The optimizer's hyperparameters (weight decay, betas, eps, lr) stay those of the engine as built from the
    current config; only its state (moments, step count) comes from the checkpoint.

    Returns:
        The client state given to ``save`` (plus DeepSpeed's own keys).

    Raises:
        CheckpointError: incomplete checkpoint, world-size mismatch without universal loading, or DeepSpeed failed.
    """
    source = Path(tag_dir)
    if load_universal:
        if not engine.load_universal_checkpoint():
            raise CheckpointError('load_universal=True needs ds_config["checkpoint"] = {"load_universal": True} '
                                  "before build_engine")
        if _universal_source(source) is None:
            source = universal_dir(source)
    marker = _require_marker(source)
    world = distributed.world_size()
    if not load_universal and int(marker["world_size"]) != world:
        raise CheckpointError(f"{str(source)!r} was saved by {marker['world_size']} processes, this run has {world}: "
                              "convert it with ensure_universal() and load with load_universal")
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in engine.optimizer.param_groups]
    try:
        path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    except Exception as e:  # DeepSpeed raises assorted errors (AssertionError, RuntimeError, KeyError, ...)
        raise CheckpointError(f"DeepSpeed could not load checkpoint {str(source)!r}: {type(e).__name__}: {e}") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {str(source)!r} (missing model-state files?)")
    _repair_optimizer(engine, hyper)
    return client_state or {}


def _repair_optimizer(engine: Any, hyper: list[dict[str, Any]]) -> None:
    """Undo two DeepSpeed 0.19.8 ZeRO-3 universal-load bugs (harmless for every other load).

    1. It copies param group 0's hyperparameters to every group (weight decay 0.05 on norms, biases, CLS): the
       current config owns them, so the values the engine was built with are put back.
    2. It stores one shared ``step`` tensor in every group's state, which AdamW then increments once per group
       per step (wrong bias correction): each state gets its own copy.
    """
    for group, values in zip(engine.optimizer.param_groups, hyper, strict=True):
        group.update(values)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in getattr(base, "state", {}).values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _require_marker(tag_dir: str | Path) -> dict[str, Any]:
    problem = marker_problem(tag_dir)
    if problem is not None:
        raise CheckpointError(f"{str(tag_dir)!r} is not a complete checkpoint: {problem}")
    return read_marker(tag_dir)


# ----------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python ``random``, NumPy, torch CPU and (if available) the current CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by ``rng_state`` (CUDA only when present in both the state and this process)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_rng_states(client_state: dict[str, Any]) -> bool:
    """Restore this rank's RNG state from a loaded client state.

    Returns:
        True when restored; False when the checkpoint has no RNG states or was saved with another world size
        (then the caller should reseed deterministically, e.g. from seed, rank and step).
    """
    states = client_state.get("rng_states")
    if not states or len(states) != distributed.world_size():
        return False
    set_rng_state(states[distributed.rank()])
    return True


def _ds_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:  # pragma: no cover
        return "unknown"
