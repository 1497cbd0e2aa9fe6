"""The training loop: build the run, then ``train_step`` after ``train_step`` until done, stopped or failed.

``train.main`` parses and checks the command line, then calls ``run_job``::

    run_job(cfg, args, stop)  ->  build_run  ->  restore  ->  train  ->  train_step  ->  task.losses
                                                                      ->  save (every ckpt_every)  ->  finish (export)

With an ``eval`` section, ``build_monitor`` opens the evaluation sets first, a fresh run evaluates the untrained
student (``evaluate_start``) and ``train`` evaluates every ``eval.every`` steps, before that step's checkpoint.

Everything that talks to other ranks goes through ``runtime`` (engine, checkpoint, distributed, cluster); the
model code (``model.task``) never does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_distill.config import Config, save_config, to_dict
from hybrid_distill.data import build_loader
from hybrid_distill.data.loader import ImageLoader
from hybrid_distill.errors import CheckpointError, ConfigError, HybridDistillError
from hybrid_distill.eval.monitor import OnlineEval
from hybrid_distill.model import flops
from hybrid_distill.model.task import HybridDistillTask, compile_options
from hybrid_distill.model.teachers import RANDOM_TEACHER_WARN_PARAMS, describe
from hybrid_distill.runtime import checkpoint, cluster, distributed, engine, metrics
from hybrid_distill.runtime.resume import check_resume

log = logging.getLogger("hybrid_distill")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


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


def build_run(cfg: Config, args: argparse.Namespace, env: cluster.DistEnv, device: torch.device
              ) -> tuple[Run, Path | None, bool]:
    """Teachers, data, engine; the checkpoint to resume from (or None) and whether it is a universal one."""
    run_dir = Path(cfg.run.output_dir)
    # Cheap checks first: a bad DeepSpeed JSON or checkpoint fails before teachers and data are loaded.
    ds_config = engine.resolve_ds_config(args.ds_config, cfg, env.world_size, device.type)
    resume = checkpoint.resolve_resume(args.resume, run_dir)
    check_compile_backend(cfg)
    if resume is not None:
        check_resume(cfg, ds_config, resume, on_purpose=args.resume != "auto")
    if env.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    universal = resume is not None and checkpoint.needs_universal(resume, env.world_size)
    if universal:  # saved by another number of processes: DeepSpeed's universal checkpoint
        resume = checkpoint.ensure_universal(resume, env.world_size)
        ds_config["checkpoint"] = {"load_universal": True}
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
              peak_tflops=flops.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
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
    Shapes are static: N' is fixed for the run."""
    if cfg.run.compile == "none":
        return
    options = compile_options(cfg.run)
    if eng.zero_optimization_partition_weights():
        # ZeRO-3 gathers a parameter when its module runs, or eagerly when it is read; the student's CLS token and
        # position embedding are read by its forward, inside the graph: gather them with the module's forward.
        from deepspeed.runtime.zero import register_external_parameter

        for param in task.trainable.student.parameters(recurse=False):
            register_external_parameter(task.trainable, param)
    eng.compile(backend=options["backend"], compile_kwargs={k: v for k, v in options.items() if k != "backend"})
    task.compile_forwards(**options)
    log.info("torch.compile: %s", options)


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
    """The logged line: loss terms and times averaged over ranks, lr, grad norm, throughput."""
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
        bad_samples=int(run.loader.bad_samples),
        images_per_s=images / dt,
        images_per_s_per_device=images / dt / run.env.world_size,
        world_size=run.env.world_size,
    )
    values["tflops_per_device"] = values["images_per_s_per_device"] * run.flops_per_image / 1e12
    if run.peak_tflops:
        values["mfu"] = values["tflops_per_device"] / run.peak_tflops
    return values


def train(run: Run, stop: cluster.StopRequest, logger: metrics.MetricsLogger, monitor: OnlineEval | None = None) -> int:
    """Run until ``total_steps``, a stop request, or too many non-finite losses; returns the exit code.

    With a ``monitor``, every step it names is evaluated after the step's log line and before its checkpoint, so a
    checkpoint's step always has its evaluation row and a resume never repeats it.
    """
    cfg = run.cfg.run
    data = batches(run)
    first_step = run.step
    t_last, step_last = time.perf_counter(), run.step
    while run.step < run.total_steps:
        timed = (run.step + 1) % cfg.log_every == 0
        result = train_step(run, data, timed)
        if not result.updated:
            save(run)
            log.error("stopping: %d non-finite losses in a row at step %d; checkpoint saved (lower optim.base_lr "
                      "or check the data), resume with --resume auto", run.nonfinite, run.step)
            return EXIT_NONFINITE
        run.step += 1
        if timed:
            now = time.perf_counter()
            images = (run.step - step_last) * run.cfg.optim.global_batch_size
            logger.log(run.step, step_metrics(run, result, now - t_last, images))
            t_last, step_last = now, run.step
        if monitor is not None and monitor.due(run.step, run.total_steps):
            t_eval = time.perf_counter()
            logger.log(run.step, monitor.evaluate(run.engine), group="eval")
            t_last += time.perf_counter() - t_eval  # the evaluation is not training throughput
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


def evaluate_start(run: Run, monitor: OnlineEval, logger: metrics.MetricsLogger) -> None:
    """Step 0 of a fresh run: the teachers' attention statistics, then the untrained student's evaluation."""
    teachers = monitor.teacher_metrics({"mim_teacher": run.task.mim_teacher,
                                        "feature_teacher": run.task.feature_teacher})
    if teachers:
        logger.log(0, teachers, group="teachers")
    logger.log(0, monitor.evaluate(run.engine), group="eval")


# ----------------------------------------------------------------------------------------------------------------
# The job


def run_job(cfg: Config, args: argparse.Namespace, stop: cluster.StopRequest) -> int:
    """Set up ranks, build, resume, train, export. Returns the process exit code."""
    env = cluster.setup_dist_env()
    run_dir = Path(cfg.run.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics.setup_logging(run_dir, env.is_main)
    device = pick_device(env)
    distributed.init(device, cluster.dist_timeout())
    try:
        monitor = build_monitor(cfg, env, device)
        run, resume, universal = build_run(cfg, args, env, device)
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
    logger = metrics.MetricsLogger(run_dir, cfg.run, env.is_main, run.total_steps, config=to_dict(cfg),
                                   initial_step=run.step)
    log.info("%s | %d steps (%d per epoch), accumulation %d, world size %d", env.describe(), run.total_steps,
             run.steps_per_epoch, run.accum, env.world_size)
    try:
        if monitor is not None and resume is None:
            evaluate_start(run, monitor, logger)
        code = train(run, stop, logger, monitor)
    finally:
        logger.close()
    if code == 0:
        finish(run)
    distributed.barrier()  # no rank exits (and trips srun --kill-on-bad-exit) while rank 0 still writes
    return code
