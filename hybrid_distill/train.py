"""The training entry point: ``main(argv)`` (called by ``launch.py``).

Three hops from the command line to the maths: ``launch.py`` -> ``main`` -> ``train_step`` -> ``task(batch)``.
Everything heavy (teachers, data, DeepSpeed) starts only after the config, the DeepSpeed JSON and the data
source have been checked, so a typo fails in a second with one message and exit code 2.

Exit codes: 0 finished; 2 bad input (config, files); 3 too many non-finite losses in a row (checkpoint
saved first); 75 stopped on request (preemption signal, stop file, ``run.stop_after_steps``) after saving a
checkpoint: resume with ``--resume auto``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from hybrid_distill import checkpoint, cluster, engine, metrics
from hybrid_distill.config import Config, ConfigError, changed_keys, dotted_value, load_config, save_config, to_dict
from hybrid_distill.data import build_loader
from hybrid_distill.task import HybridDistillTask
from hybrid_distill.teachers import CheckpointError

log = logging.getLogger("hybrid_distill")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: launcher flags, config sources and dotted overrides (``optim.base_lr=3e-4``)."""
    p = argparse.ArgumentParser(prog="launch.py", description="Hybrid Distillation trainer (DeepSpeed).")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", default="ds_configs/zero2.json",
                   help="DeepSpeed JSON with engine knobs (ZeRO stage, bf16, buckets)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--preset", default=None, help="named preset (default: tiny, or the config file's `preset:`)")
    p.add_argument("--config", default=None, help="YAML file with config sections")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None, help="run directory")
    p.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=3e-4 run.max_steps=100")
    return p.parse_intermixed_args(argv)  # options and key=value overrides in any order


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset/file/overrides -> validated config, with ``--output-dir`` applied."""
    cfg = load_config(preset=args.preset or "tiny", config_file=args.config, overrides=args.overrides)
    if args.output_dir:
        cfg.run.output_dir = args.output_dir
    return cfg


def preflight(cfg: Config, args: argparse.Namespace) -> None:
    """Cheap checks of every input file before any heavy work."""
    if not Path(args.ds_config).is_file():
        raise ConfigError(f"--ds_config {args.ds_config!r} does not exist (see ds_configs/ for zero1/2/3)")
    kind, _, where = cfg.data.source.partition(":")
    if kind == "folder" and not Path(where).is_dir():
        raise ConfigError(f"data.source={cfg.data.source!r}: folder {where!r} does not exist")
    for role in ("mim_teacher", "feature_teacher"):
        weights = getattr(cfg, role).weights
        if weights not in ("random", "pretrained") and not Path(weights).is_file():
            raise ConfigError(f"{role}.weights={weights!r}: no such checkpoint file")
    if args.resume not in ("auto", "none") and not Path(args.resume).exists():
        raise ConfigError(f"--resume {args.resume!r} does not exist")


# ----------------------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Run:
    """Runtime state of one job (never written back into the config)."""

    cfg: Config
    env: cluster.DistEnv
    device: torch.device
    run_dir: Path
    task: HybridDistillTask
    loader: object
    engine: object
    accum: int
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int
    peak_lr: float
    step: int = 0
    epoch: int = 0
    nonfinite: int = 0
    saved_step: int | None = None  # step of the checkpoint last saved or resumed (the weights on disk)
    times: dict[str, float] = field(default_factory=dict)


def pick_device(env: cluster.DistEnv) -> torch.device:
    """This rank's GPU (``local_rank``, or modulo the visible count where the site binds GPUs per task), else CPU."""
    if torch.cuda.is_available():
        index = env.device_index(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=cluster.dist_timeout())


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(cfg: Config, args: argparse.Namespace, env: cluster.DistEnv, device: torch.device
              ) -> tuple[Run, Path | None, bool]:
    """Teachers, data, engine; the checkpoint to resume from (or None) and whether it is a universal one."""
    run_dir = Path(cfg.run.output_dir)
    # Cheap checks first: a bad DeepSpeed JSON or checkpoint fails before teachers and data are loaded.
    ds_config = engine.resolve_ds_config(args.ds_config, cfg, env.world_size, device.type)
    resume = checkpoint.resolve_resume(args.resume, run_dir)
    if resume is not None:
        check_resume(cfg, ds_config, resume, on_purpose=args.resume != "auto")
    if env.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    universal = resume is not None and checkpoint.needs_universal(resume, env.world_size)
    if universal:  # saved by another number of processes: DeepSpeed's universal checkpoint
        resume = checkpoint.ensure_universal(resume, env.world_size)
        ds_config["checkpoint"] = {"load_universal": True}
    seed_everything(cfg.run.seed)  # identical student init on every rank
    task = HybridDistillTask(cfg)
    dtype = getattr(torch, cfg.run.teacher_dtype) if device.type == "cuda" else torch.float32
    task.place_teachers(device, dtype)
    loader = build_loader(cfg.data, img_size=cfg.student.img_size, rank=env.rank, world_size=env.world_size,
                          seed=cfg.run.seed, cache_dir=run_dir / "cache")
    eng = engine.build_engine(task.trainable, cfg, ds_config)
    accum = ds_config["gradient_accumulation_steps"]
    steps_per_epoch = max(1, len(loader) // accum)
    total = cfg.run.max_steps or math.ceil(cfg.run.epochs * steps_per_epoch)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    run = Run(cfg, env, device, run_dir, task, loader, eng, accum, total, steps_per_epoch, warmup,
              engine.peak_lr(cfg))
    return run, resume, universal


# Keys that define what is trained: a checkpoint continues only the run that has them. Everything else (length,
# logging, data location, workers, kernels) may change on resume and is only reported.
RESUME_FIXED = ("student", "mim_teacher", "feature_teacher", "masking", "loss", "optim.global_batch_size",
                "data.batch_size", "data.crop_scale", "run.seed")
RESUME_FREE = ("mim_teacher.weights", "feature_teacher.weights", "loss.relation_impl", "loss.deterministic")


def check_resume(cfg: Config, ds_config: dict, resume: Path, on_purpose: bool) -> None:
    """Refuse to continue a checkpoint with another recipe or ZeRO stage; report other config changes.

    Raises:
        ConfigError: ``--resume auto`` found a checkpoint saved with other training-defining keys (a resubmission
            with changed overrides into the same ``--output-dir``), or the ZeRO stage differs.
    """
    marker = checkpoint.read_marker(resume) or {}
    stage, saved_stage = ds_config.get("zero_optimization", {}).get("stage", 0), marker.get("zero_stage")
    if saved_stage is not None and int(saved_stage) != int(stage):
        raise ConfigError(f"{resume} was saved with ZeRO stage {saved_stage} but --ds_config has stage {stage}: resume "
                          f"with the same stage (e.g. --ds_config ds_configs/zero{saved_stage}.json)")
    if not isinstance(marker.get("config"), dict):
        return  # saved before configs were recorded in the marker
    saved, current = marker["config"], to_dict(cfg)
    changed = changed_keys(saved, current)
    fixed = [k for k in changed if k.startswith(RESUME_FIXED) and not k.startswith(RESUME_FREE)]
    if fixed and not on_purpose:
        diffs = ", ".join(f"{k}: {dotted_value(saved, k)!r} -> {dotted_value(current, k)!r}" for k in fixed)
        raise ConfigError(f"--resume auto found {resume}, saved with another recipe ({diffs}). Resume with the same "
                          "settings, use another --output-dir for a new run, or pass --resume PATH to continue from "
                          "that checkpoint with the new settings on purpose")
    if changed:
        log.warning("resuming %s with changed config keys: %s", resume, ", ".join(changed))


def restore(run: Run, resume: Path, universal: bool) -> None:
    """Load engine state and client state (step, epoch, data position, RNG) from a checkpoint."""
    client = checkpoint.load(run.engine, resume, load_universal=universal)
    run.step, run.epoch = client["step"], client["epoch"]
    run.saved_step = run.step
    states = client.get("loader_states") or []
    if states:  # another world size: the loaders map rank 0's global position onto the new layout
        run.loader.load_state_dict(states[run.env.rank] if len(states) == run.env.world_size else states[0])
    if not checkpoint.restore_rng_states(client):  # another world size: per-rank states do not map
        seed_everything(run.cfg.run.seed + 1_000_003 * run.step + run.env.rank)
        log.info("RNG states not restorable on world size %d: reseeded from (seed, step, rank)", run.env.world_size)
    log.info("resumed from %s at step %d (epoch %d)", resume, run.step, run.epoch)


def save(run: Run) -> None:
    """Checkpoint with everything needed to continue exactly: step, epoch, per-rank data position and RNG.

    Skipped when this step is already on disk (saved, or resumed from, with no update since): re-saving would
    first delete that checkpoint, and a crash during the save would then lose it.
    """
    if run.saved_step == run.step:
        log.info("checkpoint for step %d already on disk", run.step)
        return
    client = {
        "step": run.step,
        "epoch": run.epoch,
        "config": to_dict(run.cfg),
        "loader_states": all_gather_objects(run.loader.state_dict()),
    }
    checkpoint.save(run.engine, run.run_dir / "checkpoints", run.step, client, keep_last=run.cfg.run.keep_last)
    run.saved_step = run.step
    log.info("saved checkpoint at step %d", run.step)


def all_gather_objects(obj: object) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def batches(run: Run):
    """Micro-batches forever, epoch after epoch, continuing from the loader's restored position."""
    while True:
        run.loader.set_epoch(run.epoch)
        yield from run.loader
        run.epoch += 1


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank when the boolean tensor ``flag`` is true on any rank (keeps collectives in step)."""
    t = flag.float().reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_step(run: Run, data, timed: bool) -> dict[str, float]:
    """One optimizer step: ``accum`` finite micro-batches through teachers, student and backward.

    Returns the loss terms averaged over the micro-batches and the time split, on ``timed`` (logging) steps only:
    the device is synchronised only then.

    A micro-batch whose loss is non-finite on any rank is skipped by every rank (no backward), so the weights
    never see it; ``run.nonfinite`` counts them in a row.
    """
    eng, task, dev = run.engine, run.task, run.device
    engine.set_lr(eng, engine.lr_at(run.step, run.total_steps, run.warmup_steps, run.peak_lr, run.cfg.optim.min_lr))
    times = dict.fromkeys(("time_data", "time_teachers", "time_student", "time_optimizer"), 0.0)
    total, keys, done = None, (), 0
    while done < run.accum:
        t0 = sync(dev) if timed else 0.0
        images = next(data)["images"].to(dev, non_blocking=True)
        t1 = sync(dev) if timed else 0.0
        targets = task.targets(images)
        t2 = sync(dev) if timed else 0.0
        out = task.losses(images, targets, student=eng)
        if any_rank(~torch.isfinite(out["loss"].detach())):  # the one host sync per micro-batch
            run.nonfinite += 1
            log.warning("non-finite loss at step %d (%d in a row); micro-batch skipped", run.step, run.nonfinite)
            if run.nonfinite >= run.cfg.run.max_nonfinite:
                return {}
            continue
        eng.backward(out["loss"])
        t3 = sync(dev) if timed else 0.0
        eng.step()
        t4 = sync(dev) if timed else 0.0
        run.nonfinite, done = 0, done + 1
        keys, values = tuple(out), torch.stack([v.detach().float() for v in out.values()])
        total = values if total is None else total + values
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[k] += dt
    if not timed:
        return {}
    return {**dict(zip(keys, (total / run.accum).tolist(), strict=True)), **times}


def step_metrics(run: Run, sums: dict[str, float], dt: float, images: int) -> dict[str, float]:
    """The logged line: loss terms averaged over ranks, lr, grad norm, throughput, time split."""
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    values = {k: v / run.env.world_size for k, v in zip(keys, t.tolist(), strict=True)}
    grad_norm = run.engine.get_global_grad_norm()
    values.update(
        epoch=run.step / run.steps_per_epoch,
        lr=run.engine.optimizer.param_groups[0]["lr"],
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        skipped_steps=int(getattr(run.engine, "skipped_steps", 0)),
        bad_samples=int(run.loader.bad_samples),
        images_per_s=images / dt,
        images_per_s_per_device=images / dt / run.env.world_size,
        world_size=run.env.world_size,
    )
    return values


def train(run: Run, stop: cluster.StopRequest, logger: metrics.MetricsLogger) -> int:
    """Run until ``total_steps``, a stop request, or too many non-finite losses; returns the exit code."""
    cfg = run.cfg.run
    data = batches(run)
    first_step = run.step
    t_last, step_last = time.perf_counter(), run.step
    while run.step < run.total_steps:
        timed = (run.step + 1) % cfg.log_every == 0
        sums = train_step(run, data, timed)
        if run.nonfinite >= cfg.max_nonfinite:
            save(run)
            log.error("stopping: %d non-finite losses in a row at step %d; checkpoint saved (lower optim.base_lr "
                      "or check the data), resume with --resume auto", run.nonfinite, run.step)
            return EXIT_NONFINITE
        run.step += 1
        if timed:
            now = time.perf_counter()
            images = (run.step - step_last) * run.cfg.optim.global_batch_size
            logger.log(run.step, step_metrics(run, sums, now - t_last, images))
            t_last, step_last = now, run.step
        finished = run.step >= run.total_steps
        if finished or run.step % cfg.ckpt_every == 0:
            save(run)
        if finished:
            break
        planned = cfg.stop_after_steps is not None and run.step - first_step >= cfg.stop_after_steps
        if stop.should_stop(run.device) or planned:
            if run.step % cfg.ckpt_every:
                save(run)
            log.info("stopping at step %d (%s); resume with --resume auto", run.step, stop.reason or "stop_after_steps")
            return cluster.EXIT_REQUEUE
    return 0


def finish(run: Run) -> None:
    """Export the student as a timm checkpoint (main rank)."""
    if run.cfg.run.export_at_end and run.env.is_main:
        from hybrid_distill.export import export_student

        tag_dir = run.run_dir / "checkpoints" / checkpoint.tag_name(run.step)  # this run's, not the newest
        out = export_student(tag_dir, run.run_dir / "export")
        log.info("exported the student to %s", out)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, build, train, export. Returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        preflight(cfg, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    env = cluster.setup_dist_env()
    run_dir = Path(cfg.run.output_dir)
    stop = cluster.StopRequest(stop_file=run_dir / "STOP").install()  # a signal during start-up is not fatal
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics.setup_logging(run_dir, env.is_main)
    device = pick_device(env)
    init_distributed(device)
    try:
        run, resume, universal = build_run(cfg, args, env, device)
    except (ConfigError, CheckpointError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        log.error("error: %s", e)
        return EXIT_BAD_INPUT
    if resume is not None:
        try:
            restore(run, resume, universal)
        except checkpoint.CheckpointError as e:
            older = ", ".join(str(p) for p in checkpoint.older_checkpoints(resume)[:3]) or "none"
            log.error("error: cannot resume: %s\nOlder complete checkpoints: %s. Pass one with --resume PATH (or "
                      "move the bad one away), or check that --ds_config matches the run's", e, older)
            return EXIT_BAD_INPUT
    logger = metrics.MetricsLogger(run_dir, cfg.run, env.is_main, run.total_steps, config=to_dict(cfg),
                                   initial_step=run.step)
    log.info("%s | %d steps (%d per epoch), accumulation %d, world size %d", env.describe(), run.total_steps,
             run.steps_per_epoch, run.accum, env.world_size)
    try:
        code = train(run, stop, logger)
    finally:
        logger.close()
    if code == 0:
        finish(run)
    dist.barrier()  # no rank exits (and trips srun --kill-on-bad-exit) while rank 0 still writes
    return code
