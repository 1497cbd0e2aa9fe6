"""The training loop: build the run, then ``train_step`` after ``train_step`` until done, stopped or failed.

``train.main`` parses and checks the command line, then calls ``run_job``::

    run_job(cfg, args, stop)  ->  build_run  ->  restore  ->  train  ->  train_step  ->  task.losses
                                                                      ->  save (every ckpt_every)  ->  finish (export)

With an ``eval`` section, ``build_run`` opens the evaluation sets (``build_monitor``) after the cheap checks and
before the teachers load; ``train`` evaluates the untrained student of a fresh run (``evaluate_start``) and then
every ``eval.every`` steps, before that step's checkpoint.

Everything that talks to other ranks goes through ``runtime`` (engine, checkpoint, distributed, cluster); the
model code (``model.task``) never does.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from hybrid_distill.config import Config, to_dict
from hybrid_distill.config.files import check_device_support
from hybrid_distill.data import build_loader
from hybrid_distill.data.loader import ImageLoader
from hybrid_distill.errors import CheckpointError, ConfigError, HybridDistillError
from hybrid_distill.eval.monitor import OnlineEval
from hybrid_distill.model import flops
from hybrid_distill.model.task import HybridDistillTask, compile_options
from hybrid_distill.model.teachers import RANDOM_TEACHER_WARN_PARAMS, describe
from hybrid_distill.runtime import checkpoint, cluster, distributed, engine, metrics
from hybrid_distill.runtime.cluster import (
    EXIT_BAD_DATA,
    EXIT_BAD_INPUT,
    EXIT_IO,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_REQUEUE,
)
from hybrid_distill.runtime.durable import write_atomic
from hybrid_distill.runtime.resume import check_resume
from hybrid_distill.runtime.watchdog import Watchdog

log = logging.getLogger("hybrid_distill")


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
    loader: ImageLoader
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
    flops_per_image: float = 0.0  # model FLOPs of one image's step (hybrid_distill.model.flops)
    peak_tflops: float | None = None  # this device's dense bf16 peak (None: unknown, no MFU logged)
    bad_samples: int = 0  # undecodable samples so far, all ranks (check_data)
    monitor: OnlineEval | None = None  # the online evaluation (the eval section), or None


def pick_device(env: cluster.DistEnv) -> torch.device:
    """This rank's GPU (``local_rank``, or modulo the visible count where the site binds GPUs per task), else CPU."""
    if torch.cuda.is_available():
        index = env.device_index(torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (identical student initialisation on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(cfg: Config, args: argparse.Namespace, env: cluster.DistEnv, device: torch.device,
              stop: cluster.StopRequest | None = None) -> tuple[Run, Path | None, bool]:
    """Teachers, data, engine; the checkpoint to resume from (or None) and whether it is a universal one."""
    run_dir = Path(cfg.run.output_dir)
    # Cheap checks first: a bad DeepSpeed JSON or checkpoint fails before teachers and data are loaded.
    check_device_support(cfg, device.type)
    check_model_names(cfg)
    ds_config = engine.resolve_ds_config(args.ds_config, cfg, env.world_size, device.type)
    resume = checkpoint.resolve_resume(args.resume, run_dir)
    check_compile_backend(cfg)
    if resume is not None:
        check_resume(cfg, ds_config, resume, on_purpose=args.resume != "auto")
    else:
        start_fresh(run_dir, overwrite=getattr(args, "overwrite", False), is_main=env.is_main)
    if env.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        write_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    universal = resume is not None and checkpoint.needs_universal(resume, env.world_size)
    if universal:  # saved by another number of processes: DeepSpeed's universal checkpoint
        resume = checkpoint.ensure_universal(resume, env.world_size, stop.local_requested if stop else None)
        ds_config["checkpoint"] = {"load_universal": True}
    monitor = build_monitor(cfg, env, device)  # its sets opened and checked before the teachers load
    seed_everything(cfg.run.seed)
    task = HybridDistillTask(cfg)
    dtype = getattr(torch, cfg.run.teacher_dtype) if device.type == "cuda" else torch.float32
    task.place_teachers(device, dtype)
    loader = build_loader(cfg.data, img_size=cfg.student.img_size, rank=env.rank, world_size=env.world_size,
                          seed=cfg.run.seed, cache_dir=run_dir / "cache")
    eng = engine.build_engine(task.trainable, cfg, ds_config)
    compile_run(task, eng, cfg)
    accum = ds_config["gradient_accumulation_steps"]
    steps_per_epoch = max(1, len(loader) // accum)
    total = cfg.run.max_steps or math.ceil(cfg.run.epochs * steps_per_epoch)
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    run = Run(cfg, env, device, run_dir, task, loader, eng, accum, total, steps_per_epoch, warmup,
              engine.peak_lr(cfg), flops_per_image=sum(flops.step_flops(flops.task_shapes(task)).values()),
              peak_tflops=flops.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
              monitor=monitor)
    return run, resume, universal


def check_compile_backend(cfg: Config) -> None:
    """``run.compile_backend`` must be a registered ``torch.compile`` backend (checked before teachers load)."""
    if cfg.run.compile == "none":
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.run.compile_backend not in backends:
        raise ConfigError(f"run.compile_backend={cfg.run.compile_backend!r} is not a torch.compile backend; choose "
                          f"one of {', '.join(sorted(backends))} (or run.compile=none)")


def compile_run(task: HybridDistillTask, eng: object, cfg: Config) -> None:
    """``run.compile``: the student + head inside the engine (``engine.compile``: DeepSpeed compiles its module in
    place and keeps its ZeRO hooks out of the graph), the teachers' forwards and the loss (``task.compile_forwards``).
    Shapes are static: N' is fixed for the run.

    Under ZeRO-3 the student stays eager: DeepSpeed's gather hooks break its graph at every module (362 breaks in
    33 graphs for the tiny student) and the first two steps took 45 s + 267 s on the CPU, against 2 s eager
    (docs/performance.md); the teachers and the loss, which ZeRO does not manage, are still compiled.
    """
    if cfg.run.compile == "none":
        return
    options = compile_options(cfg.run)
    if eng.zero_optimization_partition_weights():
        log.warning("run.compile under ZeRO-3: the student stays eager (DeepSpeed's gather hooks would break its "
                    "graph at every module); the teachers and the loss are compiled. Use ZeRO-1/2 to compile it")
    else:
        eng.compile(backend=options["backend"], compile_kwargs={k: v for k, v in options.items() if k != "backend"})
    task.compile_forwards(**options)
    log.info("torch.compile: %s", options)


def check_model_names(cfg: Config) -> None:
    """Every model name exists in its library (timm / open_clip), before anything is built."""
    import timm

    for key, library, name in (("student.model", "timm", cfg.student.model),
                               ("mim_teacher.model", cfg.mim_teacher.library, cfg.mim_teacher.model),
                               ("feature_teacher.model", cfg.feature_teacher.library, cfg.feature_teacher.model)):
        if library == "timm" and not timm.is_model(name):
            raise ConfigError(f"{key}={name!r} is not a timm model: see timm.list_models('*vit*') (a pretrained tag "
                              "goes after a dot, e.g. vit_base_patch16_224.mae)")
        if library == "open_clip" and not name.startswith("hf-hub:"):
            import open_clip

            if name not in open_clip.list_models():
                raise ConfigError(f"{key}={name!r} is not an open_clip model: see open_clip.list_models()")


# Outputs of a run that a fresh start (--overwrite) deletes; everything a later --resume auto or a reader of the
# metrics would otherwise mix into the new run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "export", "loss.png", metrics.WANDB_ID_FILE)


def used_run_dir(run_dir: Path) -> str | None:
    """What a previous run left in ``run_dir`` (checkpoint directories, metrics rows), or None if nothing."""
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    rows = metrics.count_rows(run_dir / "metrics.jsonl")
    found = ([f"checkpoints {', '.join(ckpts[-3:])}" + (f" and {len(ckpts) - 3} more" if len(ckpts) > 3 else "")]
             if ckpts else []) + ([f"{rows} rows of metrics.jsonl"] if rows else [])
    return "; ".join(found) or None


def start_fresh(run_dir: Path, overwrite: bool, is_main: bool) -> None:
    """A run that starts at step 0: refuse a used directory unless ``overwrite``, which deletes its outputs.

    A requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) starts over by itself: what is in the directory is its own
    earlier run's, which ended before its first checkpoint (that run passed this check, or it would not have run).

    Raises:
        ConfigError: ``run_dir`` holds checkpoints or metrics of another run and ``overwrite`` is False.
    """
    used = used_run_dir(run_dir)
    distributed.barrier()  # every rank has looked before rank 0 deletes anything
    if used is None:
        return
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restart > 0 and not overwrite:
        log.warning("SLURM restart %d: this job's earlier run ended before its first checkpoint; starting over",
                    restart)
        overwrite = True
    if not overwrite:
        raise ConfigError(f"--output-dir {run_dir} already holds a run ({used}) and no complete checkpoint to resume: "
                          "a fresh start would mix the two runs. Use another --output-dir, or pass --overwrite to "
                          "delete its checkpoints, metrics, TensorBoard events and export and start over")
    if is_main:
        log.warning("--overwrite: deleting the outputs of the previous run in %s (%s)", run_dir, used)
        for name in RUN_OUTPUTS:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    distributed.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of the run


def restore(run: Run, resume: Path, universal: bool) -> None:
    """Load engine state and client state (step, epoch, data position, RNG) from a checkpoint."""
    client = checkpoint.load(run.engine, resume, load_universal=universal)
    run.step, run.epoch = client["step"], client["epoch"]
    run.saved_step = run.step
    run.loader.set_epoch(run.epoch)  # the trainer owns the epoch; the data position is within it
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

    Raises:
        checkpoint.NonFiniteWeights: the weights hold NaN/inf (nothing saved, nothing pruned).
        checkpoint.SaveFailed: a rank could not write (e.g. disk full); older checkpoints are intact.
    """
    if run.saved_step == run.step:
        log.info("checkpoint for step %d already on disk", run.step)
        return
    client = {
        "step": run.step,
        "epoch": run.epoch,
        "config": to_dict(run.cfg),
        "loader_states": distributed.all_gather_objects(run.loader.state_dict()),
    }
    checkpoint.save(run.engine, run.run_dir / "checkpoints", run.step, client, keep_last=run.cfg.run.keep_last)
    run.saved_step = run.step
    log.info("saved checkpoint at step %d", run.step)


def newest_checkpoint(run: Run) -> str:
    """``step_00000004`` (the newest complete checkpoint of the run directory), or ``none``, for messages."""
    latest = checkpoint.find_latest(run.run_dir / "checkpoints")
    return latest.name if latest is not None else "none"


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepResult:
    """What one ``train_step`` did.

    Attributes:
        updated: the optimizer stepped (``accum`` finite micro-batches); False when ``run.cfg.run.max_nonfinite``
            non-finite losses in a row ended the step without an update.
        losses: loss terms averaged over the micro-batches (this rank), on timed steps only, else empty.
        times: seconds spent in data, teachers, student (forward + backward) and optimizer, on timed steps only.
    """

    updated: bool
    losses: dict[str, float]
    times: dict[str, float]


def batches(run: Run) -> Iterator[dict]:
    """Micro-batches forever, epoch after epoch, continuing from the loader's restored position."""
    while True:
        run.loader.set_epoch(run.epoch)
        yield from run.loader
        run.epoch += 1


def sync(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_step(run: Run, data: Iterator[dict], timed: bool) -> StepResult:
    """One optimizer step: ``accum`` finite micro-batches through teachers, student and backward.

    On ``timed`` (logging) steps the device is synchronised around each part to split the time; otherwise never.
    A micro-batch whose loss is non-finite on any rank is skipped by every rank (no backward), so the weights
    never see it; ``run.nonfinite`` counts them in a row.
    """
    eng, task, dev = run.engine, run.task, run.device
    engine.set_lr(eng, engine.lr_at(run.step, run.total_steps, run.warmup_steps, run.peak_lr, run.cfg.optim.min_lr))
    times = dict.fromkeys(("time_data", "time_teachers", "time_student", "time_optimizer"), 0.0)
    total, keys, done = None, (), 0
    while done < run.accum:
        if run.cfg.run.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous micro-batch's CUDA-graph outputs are done with
        t0 = sync(dev) if timed else 0.0
        images = next(data)["images"].to(dev, non_blocking=True)
        t1 = sync(dev) if timed else 0.0
        targets = task.targets(images)
        t2 = sync(dev) if timed else 0.0
        out = task.losses(images, targets, student=eng)
        if distributed.any_rank(~torch.isfinite(out["loss"].detach())):  # the one host sync per micro-batch
            run.nonfinite += 1
            log.warning("non-finite loss at step %d (%d in a row); micro-batch skipped", run.step, run.nonfinite)
            if run.nonfinite >= run.cfg.run.max_nonfinite:
                return StepResult(updated=False, losses={}, times={})
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
        return StepResult(updated=True, losses={}, times={})
    return StepResult(updated=True, losses=dict(zip(keys, (total / run.accum).tolist(), strict=True)), times=times)


def step_metrics(run: Run, result: StepResult, dt: float, images: int) -> dict[str, float]:
    """The logged line: loss terms and times averaged over ranks, lr, grad norm, throughput, bad samples of all
    ranks."""
    sums = {**result.losses, **result.times}
    keys = sorted(sums)
    t = distributed.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=run.device))
    values = {k: v / run.env.world_size for k, v in zip(keys, t.tolist(), strict=True)}
    grad_norm = engine.grad_norm(run.engine)
    if run.device.type == "cuda":
        values["max_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
    values.update(
        epoch=run.step / run.steps_per_epoch,
        lr=run.engine.optimizer.param_groups[0]["lr"],
        grad_norm=grad_norm if grad_norm is not None else float("nan"),
        skipped_steps=engine.skipped_steps(run.engine),
        bad_samples=run.bad_samples,
        images_per_s=images / dt,
        images_per_s_per_device=images / dt / run.env.world_size,
        world_size=run.env.world_size,
    )
    values["tflops_per_device"] = values["images_per_s_per_device"] * run.flops_per_image / 1e12
    if run.peak_tflops:
        values["mfu"] = values["tflops_per_device"] / run.peak_tflops
    return values


def check_data(run: Run) -> str | None:
    """Sum the undecodable and read samples over ranks (``run.bad_samples``); the reason to stop, or None."""
    counts = torch.tensor([run.loader.bad_samples, run.loader.samples_read], dtype=torch.float64, device=run.device)
    bad, read = (int(v) for v in distributed.all_reduce_sum(counts).tolist())
    run.bad_samples = bad
    return run.loader.bad_fraction_problem(bad, read)


def train(run: Run, stop: cluster.StopRequest, logger: metrics.MetricsLogger, watchdog: Watchdog | None = None
          ) -> int:
    """Run until ``total_steps``, a stop request, too many non-finite losses or bad samples; returns the exit code.

    Exit 3 (non-finite) saves nothing: the weights that produced those losses are not a resumable checkpoint, and
    the last good checkpoint stays the newest one. Exit 65 (bad data) saves first. A checkpoint that cannot be
    written ends the run with exit 74. With ``run.monitor``, a fresh run first evaluates the untrained student
    (step 0), and every step the monitor names is evaluated after the step's log line and before its checkpoint,
    so a checkpoint's step always has its evaluation row and a resume never repeats it.
    """
    cfg = run.cfg.run
    if stop.should_stop(run.device):  # requested during the start-up: nothing was trained, nothing to save
        log.info("stopping before step %d (%s); resume with --resume auto", run.step + 1, stop.reason)
        return EXIT_REQUEUE
    monitor = run.monitor
    if monitor is not None and run.step == 0:
        evaluate_start(run, monitor, logger)
    data = batches(run)
    first_step = run.step
    t_last, step_last = time.perf_counter(), run.step
    try:
        while run.step < run.total_steps:
            timed = (run.step + 1) % cfg.log_every == 0
            result = train_step(run, data, timed)
            if not result.updated:
                log.error("stopping: %d non-finite losses in a row at step %d; not saved (those weights are not "
                          "resumable), the newest checkpoint is %s: lower optim.base_lr (or check the data), then "
                          "resume with --resume auto", run.nonfinite, run.step, newest_checkpoint(run))
                return EXIT_NONFINITE
            run.step += 1
            if watchdog is not None:
                watchdog.step = run.step
            problem = check_data(run)
            if timed:
                now = time.perf_counter()
                images = (run.step - step_last) * run.cfg.optim.global_batch_size
                logger.log(run.step, step_metrics(run, result, now - t_last, images))
                t_last, step_last = now, run.step
            if monitor is not None and monitor.due(run.step, run.total_steps):
                t_last += log_evaluation(run, monitor, logger)  # the evaluation is not training throughput
            finished = run.step >= run.total_steps
            if finished or run.step % cfg.ckpt_every == 0 or problem:
                save(run)
            if problem:
                log.error("stopping at step %d: %s (checkpoint saved)", run.step, problem)
                return EXIT_BAD_DATA
            if finished:
                break
            planned = cfg.stop_after_steps is not None and run.step - first_step >= cfg.stop_after_steps
            if stop.should_stop(run.device) or planned:
                save(run)
                log.info("stopping at step %d (%s); resume with --resume auto", run.step,
                         stop.reason or "stop_after_steps")
                return EXIT_REQUEUE
    except checkpoint.NonFiniteWeights as e:
        log.error("stopping: %s (newest checkpoint: %s): lower optim.base_lr (or check the data), then resume with "
                  "--resume auto", e, newest_checkpoint(run))
        return EXIT_NONFINITE
    except checkpoint.SaveFailed as e:
        log.error("stopping: %s. It will never be resumed from; the newest complete checkpoint is %s. Free space "
                  "(or raise the quota) under %s, then resume with --resume auto", e, newest_checkpoint(run),
                  run.run_dir)
        return EXIT_IO
    return 0


def finish(run: Run) -> int:
    """Export the student as a timm checkpoint (main rank); the exit code (74 when the export cannot be written)."""
    if not (run.cfg.run.export_at_end and run.env.is_main):
        return 0
    from hybrid_distill.export import export_student

    tag_dir = run.run_dir / "checkpoints" / checkpoint.tag_name(run.step)  # this run's, not the newest
    try:
        out = export_student(tag_dir, run.run_dir / "export")
    except OSError as e:
        log.error("error: the run finished but its export could not be written (%s: %s); export it later with: python "
                  "-m hybrid_distill.export %s --out %s", type(e).__name__, e, tag_dir, run.run_dir / "export")
        return EXIT_IO
    log.info("exported the student to %s", out)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Start-up report and evaluation


def log_teachers(run: Run) -> None:
    """One line per teacher: model, where its weights came from, parameter count, dtype, input size; a WARNING
    for a random teacher of real size (random weights are for smoke tests: the tiny preset's are < 0.5M)."""
    for role in ("mim_teacher", "feature_teacher"):
        info = describe(getattr(run.task, role), getattr(run.cfg, role), role)
        log.info("%s: %s %s, weights: %s, %.1fM parameters, %s, %d px, %d blocks x %d heads", role,
                 info["library"], info["model"], info["weights"], info["parameters"] / 1e6, info["dtype"],
                 info["img_size"], info["depth"], info["num_heads"])
        if info["random"] and info["parameters"] >= RANDOM_TEACHER_WARN_PARAMS:
            log.warning("%s %s has RANDOM weights (%.1fM parameters): the student learns nothing useful from it. "
                        "Set %s.weights=pretrained or a checkpoint path", role, info["model"],
                        info["parameters"] / 1e6, role)


def build_monitor(cfg: Config, env: cluster.DistEnv, device: torch.device) -> OnlineEval | None:
    """The online evaluation of the ``eval`` section (its sets opened and checked before the teachers load), or
    None when ``eval.train_source`` is not set."""
    if cfg.eval.train_source is None:
        return None
    cache = cfg.data.cache_dir or str(Path(cfg.run.output_dir) / "cache")  # the training loader's folder-index cache
    monitor = OnlineEval(cfg, env.rank, env.world_size, device, cache)
    log.info("online evaluation: %d + %d images (%s / %s), %s, every %d steps", len(monitor.train_set),
             len(monitor.val_set), cfg.eval.train_source, cfg.eval.val_source, ", ".join(cfg.eval.protocols),
             cfg.eval.every)
    return monitor


def log_evaluation(run: Run, monitor: OnlineEval, logger: metrics.MetricsLogger) -> float:
    """Evaluate the student now and log the ``eval`` row; the seconds it took."""
    start = time.perf_counter()
    logger.log(run.step, monitor.evaluate(run.engine), group="eval")
    return time.perf_counter() - start


def evaluate_start(run: Run, monitor: OnlineEval, logger: metrics.MetricsLogger) -> None:
    """Step 0 of a fresh run: the teachers' attention statistics, then the untrained student's evaluation."""
    teachers = monitor.teacher_metrics({"mim_teacher": run.task.mim_teacher,
                                        "feature_teacher": run.task.feature_teacher})
    if teachers:
        logger.log(0, teachers, group="teachers")
    logger.log(0, monitor.evaluate(run.engine), group="eval")


# ----------------------------------------------------------------------------------------------------------------
# The job

IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


def run_job(cfg: Config, args: argparse.Namespace, stop: cluster.StopRequest) -> int:
    """Set up ranks, build, resume, train, export. Returns the process exit code."""
    env = cluster.setup_dist_env()
    run_dir = Path(cfg.run.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics.setup_logging(run_dir, env.is_main)
    device = pick_device(env)
    timeout = cluster.dist_timeout()
    distributed.init(device, timeout)
    token = distributed.all_gather_objects(secrets.token_hex(8))[0]
    watchdog = Watchdog(run_dir, env.rank, env.world_size, timeout.total_seconds(), token).start()
    clean = False
    try:
        code = _run_job(cfg, args, stop, env, device, watchdog)
        clean = code != EXIT_PEER_LOST
        return code
    except cluster.Stopped as e:
        log.info("stopping: %s; resume with --resume auto", e)
        clean = True
        return EXIT_REQUEUE
    except OSError as e:
        if e.errno not in IO_ERRNOS:
            raise
        log.error("error: cannot write the run directory %s (%s: %s); the newest complete checkpoint is untouched: "
                  "free space (or fix the file system), then resume with --resume auto", run_dir, type(e).__name__, e)
        return EXIT_IO
    finally:
        watchdog.stop(remove=clean)
        if clean:  # a lost rank would never answer the teardown
            distributed.close()


def _run_job(cfg: Config, args: argparse.Namespace, stop: cluster.StopRequest, env: cluster.DistEnv,
             device: torch.device, watchdog: Watchdog) -> int:
    try:
        run, resume, universal = build_run(cfg, args, env, device, stop)
    except HybridDistillError as e:
        log.error("error: %s", e)
        return EXIT_BAD_INPUT
    log_teachers(run)
    if resume is not None:
        try:
            restore(run, resume, universal)
        except CheckpointError as e:
            older = ", ".join(str(p) for p in checkpoint.older_checkpoints(resume)[:3]) or "none"
            log.error("error: cannot resume: %s\nOlder complete checkpoints: %s. Pass one with --resume PATH (or "
                      "move the bad one away), or check that --ds_config matches the run's", e, older)
            return EXIT_BAD_INPUT
    watchdog.step = run.step
    logger = metrics.MetricsLogger(run.run_dir, cfg.run, env.is_main, run.total_steps, config=to_dict(cfg),
                                   initial_step=run.step)
    log.info("%s | %d steps (%d per epoch), accumulation %d, world size %d", env.describe(), run.total_steps,
             run.steps_per_epoch, run.accum, env.world_size)
    try:
        code = train(run, stop, logger, watchdog)
    except Exception as e:  # a failed collective: name the rank that stopped answering, if one did
        blame = watchdog.blame(e)
        if blame is None:
            raise
        log.error("error: %s", blame)
        return EXIT_PEER_LOST
    finally:
        logger.close()
    if code == 0:
        code = finish(run)
    distributed.barrier()  # no rank exits (and trips srun --kill-on-bad-exit) while rank 0 still writes
    return code
