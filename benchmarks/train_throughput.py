"""Training throughput: images/s, per-part time, peak memory and MFU of one Hybrid Distillation step.

    python benchmarks/train_throughput.py --preset vitl_in21k_clip_mae --batch 64 --steps 20 --warmup 5 \\
        [--variants fast,naive,no_drop,fp32_teachers,eager_loss,compiled,grad_ckpt] [--out results.json]
    python benchmarks/train_throughput.py --preset vitb_in1k_deit_mae,vitl_in21k_clip_mae --batch 128,64
    python benchmarks/train_throughput.py --cpu-small          # tiny preset, batch 8, fp32: proves it runs
    python benchmarks/train_throughput.py --table results.json # print the markdown table of a saved run
    python benchmarks/train_throughput.py --flops-only --preset vitl_in21k_clip_mae  # FLOPs per image, no models

What one step is: the training step of ``hybrid_distill.train`` without DeepSpeed, on one device. Both teachers
run under ``no_grad`` in their own dtype (``run.teacher_dtype``; fp32 on CPU), the student + head run under bf16
autocast on CUDA (fp32 on CPU), ``loss.backward()``, gradient clipping at ``optim.clip_grad`` and a plain
``torch.optim.AdamW`` step over the trainer's parameter groups. This isolates the model cost: on one GPU
DeepSpeed adds no communication, and its bf16 mode (bf16 weights, fp32 master copy in the optimizer) does the
same bf16 matmuls as autocast. Batches are synthetic uint8 crops already on the device; the host-to-device copy
of one batch is timed separately, and decoding is measured by ``benchmarks/data_throughput.py``
(``docs/data.md``); ``--data-batches N`` times the synthetic loader in the main process.

Parts, timed with CUDA events (synchronised ``perf_counter`` on CPU) between marks inside each step:
MIM teacher (masking + q, k), feature teacher, student forward (a forward hook on ``task.trainable``), loss
forward, backward (loss + student), optimizer (clip + AdamW + zero_grad). The loss alone (forward + backward
on detached student outputs) is timed separately; it is part of "loss fwd" and "backward". The ``compiled``
variant runs the student + head, the teachers and the loss under ``torch.compile`` (``run.compile``, as the
trainer does), ``grad_ckpt`` checkpoints the student's blocks (``student.grad_checkpointing``).

FLOPs per image come from ``hybrid_distill.model.flops`` (the FLOP model the trainer logs MFU with; matmuls
only). MFU = achieved FLOP/s / the bf16 matmul rate measured in the same run (8192³; on CPU an fp32 1024³
matmul, so CPU MFU is against fp32). Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on
the GPU; on the CPU torch's ``MemTracker`` (live tensors: parameters, gradients, optimizer states, activations)
over one extra step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from hybrid_distill.config import Config, load_config, set_key, validate  # noqa: E402
from hybrid_distill.model import flops, losses  # noqa: E402
from hybrid_distill.model.task import COMPILED_FORWARDS, HybridDistillTask, Targets, compile_options  # noqa: E402
from hybrid_distill.runtime import engine  # noqa: E402

# open_clip towers of the presets and their timm equivalents (same architecture; the GPU image has no open_clip)
TIMM_CLIP = {"ViT-L-14": "vit_large_patch14_clip_224.openai", "ViT-B-16": "vit_base_patch16_clip_224.openai"}

# Every variant sets every knob, so one task can be reused across the variants of a preset.
_FAST = {"run.teacher_dtype": "bfloat16", "masking.drop_ratio": "0.3", "loss.relation_impl": "auto",
         "student.grad_checkpointing": "false", "run.compile": "none"}
VARIANTS: dict[str, dict[str, str]] = {
    "fast": _FAST,
    "naive": {**_FAST, "run.teacher_dtype": "float32", "masking.drop_ratio": "0", "loss.relation_impl": "torch"},
    "no_drop": {**_FAST, "masking.drop_ratio": "0"},
    "fp32_teachers": {**_FAST, "run.teacher_dtype": "float32"},
    "eager_loss": {**_FAST, "loss.relation_impl": "torch"},
    "compiled": {**_FAST, "run.compile": "default"},
    "grad_ckpt": {**_FAST, "student.grad_checkpointing": "true"},
}
PARTS = ("teacher_mim", "teacher_feature", "student_fwd", "loss_fwd", "backward", "optimizer")
FLOP_MODEL = "hybrid_distill.model.flops (matmuls only, 2 FLOP per multiply-add; model FLOPs, no recomputation)"


# ----------------------------------------------------------------------------------------------------------------
# Timing


class Marks:
    """Named time points inside one step: CUDA events on GPU, ``perf_counter`` on CPU (single stream, no sync)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.points: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def elapsed_ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def durations(self) -> dict[str, float]:
        """Milliseconds from each mark to the next, keyed by the later mark (call after a device sync)."""
        return {name: self.elapsed_ms(prev, point)
                for (_, prev), (name, point) in zip(self.points, self.points[1:], strict=False)}

    def total_ms(self) -> float:
        return self.elapsed_ms(self.points[0][1], self.points[-1][1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], cuda: bool, reps: int, warmup: int = 1) -> float:
    """Median milliseconds per call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        marks = Marks(cuda)
        marks.mark("start")
        fn()
        marks.mark("end")
        sync(cuda)
        times.append(marks.total_ms())
    return median(times)


def matmul_peak(cuda: bool) -> dict[str, Any]:
    """The matmul rate of this device measured now: bf16 8192³ on CUDA (median of 20), fp32 1024³ on CPU (the
    fastest of 10: on a shared CPU the median mostly measures the other jobs)."""
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    if cuda:
        ms, how = time_ms(lambda: a @ b, cuda, reps=20, warmup=3), "median"
    else:
        a @ b
        ms, how = min(time_ms(lambda: a @ b, cuda, reps=1, warmup=0) for _ in range(10)), "fastest of 10"
    return {"what": f"{str(dtype)[6:]} matmul {n}^3 on {device}, {how}", "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


# ----------------------------------------------------------------------------------------------------------------
# Building


def bench_config(preset: str, batch: int | None, overrides: list[str], keep_open_clip: bool) -> Config:
    """The preset with random teacher weights, open_clip teachers swapped for timm's (unless kept), the batch."""
    cfg = load_config(preset)
    extra = ["mim_teacher.weights=random", "feature_teacher.weights=random"]
    for role in ("mim_teacher", "feature_teacher"):
        t = getattr(cfg, role)
        if t.library == "open_clip" and not keep_open_clip:
            if t.model not in TIMM_CLIP:
                raise SystemExit(f"{role}.model={t.model!r}: no timm equivalent known; pass --keep-open-clip")
            extra += [f"{role}.library=timm", f"{role}.model={TIMM_CLIP[t.model]}", f"{role}.pretrained_tag=none",
                      f"{role}.force_quick_gelu=false"]
    if batch is not None:  # keep the global batch (it only sets the lr) a multiple of the micro-batch
        global_batch = -(-cfg.optim.global_batch_size // batch) * batch
        extra += [f"data.batch_size={batch}", f"optim.global_batch_size={global_batch}"]
    return load_config(preset, overrides=[*extra, *overrides])


def build_task(cfg: Config, device: torch.device) -> HybridDistillTask:
    """The task with the student on ``device``; built directly on the GPU when possible (fast random init)."""
    torch.manual_seed(cfg.run.seed)
    if device.type == "cuda":
        try:
            with torch.device(device):
                return HybridDistillTask(cfg).to(device)
        except Exception as e:  # noqa: BLE001 - fall back to the ordinary CPU build
            print(f"building on {device} failed ({type(e).__name__}: {e}); building on CPU", flush=True)
    return HybridDistillTask(cfg).to(device)


def apply_variant(task: HybridDistillTask, spec: dict[str, str], device: torch.device) -> torch.dtype:
    """Set the variant's knobs on ``task.cfg`` (read at call time), cast the teachers, switch the student's
    activation checkpointing; return the teachers' dtype. ``run.compile`` is applied by ``compiled``."""
    for key, value in spec.items():
        set_key(task.cfg, key, value)
    validate(task.cfg)
    dtype = getattr(torch, task.cfg.run.teacher_dtype) if device.type == "cuda" else torch.float32
    task.place_teachers(device, dtype)
    task.trainable.student.set_grad_checkpointing(task.cfg.student.grad_checkpointing)
    return dtype


def make_optimizer(task: HybridDistillTask) -> torch.optim.Optimizer:
    """The trainer's AdamW (same parameter groups, lr, betas, eps) without DeepSpeed."""
    c = task.cfg.optim
    groups = [{k: v for k, v in g.items() if k != "names"}
              for g in engine.param_groups(task.trainable, c.weight_decay)]
    return torch.optim.AdamW(groups, lr=engine.peak_lr(task.cfg), betas=tuple(c.betas), eps=c.eps)


# ----------------------------------------------------------------------------------------------------------------
# The step


def targets_marked(task: HybridDistillTask, images: torch.Tensor, marks: Marks) -> Targets:
    """``task.targets(images)`` with a mark after each teacher (the same two calls)."""
    m = task.cfg.masking
    mim = task.mim_teacher.mim_targets(images, m.drop_ratio, task.mask_layers, prunes=m.teacher_prunes)
    marks.mark("teacher_mim")
    features = task.feature_teacher.feature_targets(images, task.cfg.feature_teacher.feature)
    marks.mark("teacher_feature")
    return Targets(mim=mim, features=features)


def student_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the student's matmuls in bf16, as under DeepSpeed's bf16 mode); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class AutocastStudent(nn.Module):
    """Runs ``task.trainable`` under bf16 autocast and nothing else: the loss stays outside autocast, as in the
    trainer, where the DeepSpeed engine returns bf16 outputs and the loss upcasts them itself. The ``compiled``
    variant compiles this module (the trainer: ``engine.compile``, i.e. the engine's module compiled in place)."""

    def __init__(self, trainable: nn.Module, device: torch.device):
        super().__init__()
        self.trainable = trainable
        self.device = device

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor):
        with student_autocast(self.device):
            return self.trainable(images, keep_idx)


class MarkedStudent(nn.Module):
    """The student ``task.losses`` gets: the (possibly compiled) ``AutocastStudent``, then a ``student_fwd`` mark
    in the current step's ``marks`` (outside any compiled region)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.marks: Marks | None = None

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor):
        out = self.inner(images, keep_idx)
        self.marks.mark("student_fwd")
        return out


def train_step(task: HybridDistillTask, images: torch.Tensor, opt: torch.optim.Optimizer, marks: Marks,
               student: MarkedStudent) -> torch.Tensor:
    """One optimizer step, with marks between its parts. Returns the loss."""
    student.marks = marks
    marks.mark("start")
    targets = targets_marked(task, images, marks)
    loss = task.losses(images, targets, student=student)["loss"]
    marks.mark("loss_fwd")
    loss.backward()
    marks.mark("backward")
    if task.cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(task.trainable.parameters(), task.cfg.optim.clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    marks.mark("optimizer")
    return loss.detach()


@contextlib.contextmanager
def variant_student(task: HybridDistillTask, device: torch.device) -> Iterator[MarkedStudent]:
    """The student of one variant; with ``run.compile`` the run is compiled as the trainer compiles it: the
    student + head (``AutocastStudent.compile``), the teachers' forwards and the loss (``task.compile_forwards``).
    Eager again afterwards, so the next variant runs the same task eagerly."""
    inner = AutocastStudent(task.trainable, device)
    if task.cfg.run.compile == "none":
        yield MarkedStudent(inner)
        return
    options = compile_options(task.cfg.run)
    torch._dynamo.reset()
    inner.compile(**options)
    task.compile_forwards(**options)
    try:
        yield MarkedStudent(inner)
    finally:
        for owner, name in COMPILED_FORWARDS:  # drop the compiled instance attributes: the methods again
            vars(task if owner is None else getattr(task, owner)).pop(name, None)


def run_steps(task: HybridDistillTask, images: torch.Tensor, steps: int, warmup: int, device: torch.device,
              student: MarkedStudent) -> tuple[list[Marks], float, list[float], float]:
    """Warm-up then timed steps; returns the timed steps' marks, their wall span (ms), the losses and the
    seconds of the first step (compilation included)."""
    cuda = device.type == "cuda"
    opt = make_optimizer(task)
    log: list[Marks] = []
    losses_seen: list[torch.Tensor] = []
    first_s = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(cuda)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            log.clear()
        log.append(Marks(cuda))
        t0 = time.perf_counter()
        losses_seen.append(train_step(task, images, opt, log[-1], student))
        if i == 0:
            sync(cuda)
            first_s = time.perf_counter() - t0
    sync(cuda)
    span = log[0].elapsed_ms(log[0].points[0][1], log[-1].points[-1][1])
    del opt
    return log, span, [float(v) for v in losses_seen], first_s


def loss_only_ms(task: HybridDistillTask, images: torch.Tensor, device: torch.device, reps: int) -> float:
    """Loss forward + backward on detached student outputs (mirrors ``HybridDistillTask.losses``)."""
    c = task.cfg.loss
    targets = task.targets(images)
    x = (images.float() - task.mean) / task.std
    with torch.no_grad(), student_autocast(device):
        pred, qk = task.trainable(x, targets.keep_idx)
    pred = pred.detach().requires_grad_()
    qk = [(q.detach().requires_grad_(), k.detach().requires_grad_()) for q, k in qk]

    def fwd_bwd() -> None:
        for t in (pred, *(t_ for pair in qk for t_ in pair)):
            t.grad = None
        feat = losses.feature_loss(pred, targets.features, targets.keep_idx, c.feature_beta)
        rel = losses.relation_loss(qk, targets.mim.qk, targets.mim.qk_index, c.relation_beta, c.head_reduce,
                                   c.relation_impl)
        (feat + c.alpha * rel).backward()

    return time_ms(fwd_bwd, device.type == "cuda", reps=reps)


def resolved_relation_impl(task: HybridDistillTask, device: torch.device, teacher_dtype: torch.dtype) -> str:
    """Which relation-loss implementation the variant runs (``loss.relation_impl``, ``auto`` resolved)."""
    student = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return kernels.resolve_impl(task.cfg.loss.relation_impl, device, (student, student, teacher_dtype,
                                                                           teacher_dtype))
    except (ValueError, RuntimeError) as e:
        return f"error: {e}"


# ----------------------------------------------------------------------------------------------------------------
# One variant, one preset


def summarise(log: list[Marks], span_ms: float, batch: int, flops: dict[str, float], peak_tflops: float | None
              ) -> dict[str, Any]:
    """Images/s, ms per part, achieved TFLOP/s and MFU of the timed steps.

    Step and part times are medians over the timed steps (a shared CPU or a stray stall on the GPU moves a
    mean); ``step_ms_mean`` is the wall span of all timed steps over their number.
    """
    parts = {p: median([m.durations().get(p, 0.0) for m in log]) for p in PARTS}
    step_ms = median([m.total_ms() for m in log])
    tflops = batch * sum(flops.values()) / (step_ms * 1e-3) / 1e12
    return {"images_per_s": batch / (step_ms * 1e-3), "step_ms": step_ms, "step_ms_mean": span_ms / len(log),
            "parts_ms": parts,
            "teachers_ms": parts["teacher_mim"] + parts["teacher_feature"], "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None}


def measure_variant(task: HybridDistillTask, name: str, images: torch.Tensor, args: argparse.Namespace,
                    device: torch.device, peak_tflops: float | None) -> dict[str, Any]:
    """Set the variant up, run warm-up + timed steps, time the loss alone, and summarise."""
    cuda = device.type == "cuda"
    teacher_dtype = apply_variant(task, VARIANTS[name], device)
    shapes = flops.task_shapes(task)
    per_image = flops.step_flops(shapes)
    row: dict[str, Any] = {"variant": name, "settings": dict(VARIANTS[name]), "teacher_dtype": str(teacher_dtype)[6:],
                           "student_dtype": "bf16 autocast" if cuda else "fp32",
                           "relation_impl": resolved_relation_impl(task, device, teacher_dtype),
                           "n_kept": shapes.n_kept, "flops_per_image": per_image}
    with variant_student(task, device) as student:
        log, span, seen, first_s = run_steps(task, images, args.steps, args.warmup, device, student)
        row.update(summarise(log, span, images.shape[0], per_image, peak_tflops))
        row["first_step_s"] = first_s  # includes compilation for `compiled`
        row.update(peak_memory_mib(task, images, device, student))
        row["loss_fwd_bwd_ms"] = loss_only_ms(task, images, device, reps=max(3, min(args.steps, 10)))
    row["loss_last"] = seen[-1]
    return row


def peak_memory_mib(task: HybridDistillTask, images: torch.Tensor, device: torch.device, student: MarkedStudent
                    ) -> dict[str, Any]:
    """Peak memory of a step: the allocator's over the timed steps on the GPU. On the CPU torch's ``MemTracker``
    (live tensors, no allocator) over the student forward, loss, backward and optimizer step of one more step,
    counting every parameter (teachers too), the optimizer states and the teachers' targets, but not the
    teachers' own forward (its transient activations are freed before the student runs); and the activations
    alive at the end of the forward (what the backward keeps)."""
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_method": "torch.cuda.max_memory_allocated",
                "peak_activation_mib": None}
    from torch.distributed._tools.mem_tracker import MemTracker

    opt = make_optimizer(task)
    train_step(task, images, opt, Marks(False), student)  # the optimizer states exist before the tracked step
    targets = task.targets(images)
    tracker = MemTracker()
    tracker.track_external(task, opt, *target_tensors(targets))
    student.marks = Marks(False)
    with tracker:
        loss = task.losses(images, targets, student=student)["loss"]
        forward_end = tracker.get_tracker_snapshot()  # everything the backward will need is alive now
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.trainable.parameters(), task.cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    return {"peak_mib": sum(stats["Total"] for stats in peak.values()) / 2**20,
            "peak_method": "MemTracker, student fwd+bwd+optimizer (CPU)",
            "peak_activation_mib": sum(stats["Activation"] for stats in forward_end.values()) / 2**20}


def target_tensors(targets: Targets) -> list[torch.Tensor]:
    """Every tensor the teachers hand the loss."""
    return [targets.features, targets.keep_idx, *targets.mim.qk_index, *(t for qk in targets.mim.qk for t in qk)]


def h2d_ms(images: torch.Tensor, device: torch.device) -> float | None:
    """Host-to-device copy of one uint8 batch from pinned memory (the only data cost on the GPU's stream)."""
    if device.type != "cuda":
        return None
    host = images.cpu().pin_memory()
    return time_ms(lambda: host.to(device, non_blocking=True), True, reps=10)


def data_images_per_s(cfg: Config, batches: int) -> float | None:
    """Synthetic loader (``hybrid_distill.data.build_loader``, main process) images/s after one warm-up batch."""
    if batches <= 0:
        return None
    from hybrid_distill.config import DataConfig
    from hybrid_distill.data import build_loader

    b = cfg.data.batch_size
    data_cfg = DataConfig(source="synthetic", synthetic_size=b * (batches + 1), batch_size=b, num_workers=0)
    it = iter(build_loader(data_cfg, img_size=cfg.student.img_size))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return b * batches / (time.perf_counter() - t0)


def describe(task: HybridDistillTask, cfg: Config) -> dict[str, Any]:
    """Models, sizes and token counts of a preset as benchmarked."""
    def model(t: Any) -> str:
        return f"{t.library}:{t.model}"

    s = flops.shape_of(task.trainable.student)
    return {"student": cfg.student.model, "student_dim": s.dim, "student_depth": s.depth,
            "mim_teacher": model(cfg.mim_teacher), "feature_teacher": model(cfg.feature_teacher),
            "feature_teacher_img": task.feature_teacher.img_size, "img_size": cfg.student.img_size,
            "tokens": 1 + s.num_patches, "mask_layers": task.mask_layers,
            "student_params_m": sum(p.numel() for p in task.trainable.parameters()) / 1e6}


def run_preset(preset: str, batch: int | None, args: argparse.Namespace, device: torch.device,
               peak: dict[str, Any], report: dict[str, Any], out: Path | None, t_start: float) -> None:
    """Every variant of one preset on one task, appending rows to ``report`` (written after each variant)."""
    cfg = bench_config(preset, batch, args.override, args.keep_open_clip)
    t0 = time.perf_counter()
    task = build_task(cfg, device)
    b, s = cfg.data.batch_size, cfg.student.img_size
    entry: dict[str, Any] = {"preset": preset, "batch": b, **describe(task, cfg),
                             "build_s": time.perf_counter() - t0, "variants": []}
    report["runs"].append(entry)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    entry["h2d_ms"] = h2d_ms(images, device)
    entry["data_synthetic_images_per_s"] = data_images_per_s(cfg, args.data_batches)
    images = images.to(device)
    for name in args.variants:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            entry["variants"].append({"variant": name, "error": "skipped: --time-budget spent"})
            continue
        entry["variants"].append(guarded(lambda name=name: measure_variant(task, name, images, args, device,
                                                                           peak["tflops"]), name, device))
        print(table([entry]).splitlines()[-1], flush=True)
        write(out, report)


def guarded(fn: Callable[[], dict[str, Any]], name: str, device: torch.device) -> dict[str, Any]:
    """Run one variant; an out-of-memory or other failure becomes an error row (the others still run)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"variant": name, "error": "out of memory"}
    except Exception as e:  # noqa: BLE001 - report it and go on with the next variant
        return {"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Report


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of every variant of every run."""
    head = ("| preset | B | variant | N' | images/s | step ms | teachers ms (MIM+feat) | student fwd ms | loss fwd ms "
            "| backward ms | optimizer ms | loss alone fwd+bwd ms | peak MiB (activations) | TFLOP/s | MFU "
            "| first step s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        for v in run["variants"]:
            lead = f"| {run['preset']} | {run['batch']} | {v['variant']} "
            if "error" in v:
                lines.append(lead + f"| {v['error']} " + "| " * 13 + "|")
                continue
            p = v["parts_ms"]
            lines.append(
                lead + f"| {v['n_kept']} | {v['images_per_s']:.4g} | {v['step_ms']:.1f} "
                f"| {v['teachers_ms']:.1f} ({p['teacher_mim']:.1f}+{p['teacher_feature']:.1f}) "
                f"| {p['student_fwd']:.1f} | {p['loss_fwd']:.1f} | {p['backward']:.1f} | {p['optimizer']:.1f} "
                f"| {v['loss_fwd_bwd_ms']:.2f} | {fmt(v['peak_mib'], '.4g')}{peak_activations(v)} | {v['tflops']:.3g} "
                f"| {fmt(v['mfu'] and 100 * v['mfu'])}% | {fmt(v.get('first_step_s'), '.1f')} |")
    return "\n".join(lines)


def peak_activations(v: dict[str, Any]) -> str:
    act = v.get("peak_activation_mib")
    return "" if act is None else f" ({act:.3g})"


def summary(report: dict[str, Any]) -> str:
    """One paragraph (command, device, date, versions, measured peak) and the table."""
    peak = report["peak"]
    partial = "" if report.get("complete") else " INCOMPLETE: some variants failed or were skipped (see the rows)."
    head = (f"`{report['command']}` on {report['device']}, {report['date']}, torch {report['torch']}, "
            f"timm {report['timm']}, triton {report['triton']}; {report['steps']} timed steps after "
            f"{report['warmup']} warm-up, medians. Peak for MFU: {peak['what']} = {peak['tflops']:.4g} TFLOP/s. "
            f"FLOPs: {report['flop_model']}.{partial}")
    return head + "\n\n" + table(report["runs"])


def flops_table(args: argparse.Namespace) -> str:
    """Analytic GFLOP per image of every preset and variant, from the config alone (no model is built)."""
    lines = ["| preset | variant | N' | MIM teacher | feature teacher | student fwd | student bwd | relation loss "
             "| total GFLOP/image |", "|---|---|---|---|---|---|---|---|---|"]
    for preset, batch in preset_batches(args):
        for name in args.variants:
            cfg = bench_config(preset, batch, [*args.override, *(f"{k}={v}" for k, v in VARIANTS[name].items())],
                               keep_open_clip=True)
            shapes = flops.config_shapes(cfg)
            f = flops.step_flops(shapes)
            cells = " | ".join(f"{f[p] / 1e9:.2f}" for p in flops.PARTS)
            lines.append(f"| {preset} | {name} | {shapes.n_kept} | {cells} | {sum(f.values()) / 1e9:.1f} |")
    return "\n".join(lines)


def write(out: Path | None, report: dict[str, Any]) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def versions() -> dict[str, Any]:
    import timm

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "timm": timm.__version__, "triton": tv, "cuda": torch.version.cuda,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="comma-separated presets (default vitl_in21k_clip_mae)")
    p.add_argument("--batch", default=None, help="per-device batch, one or one per preset (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20; cpu-small 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; cpu-small 1)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every variant, e.g. masking.teacher_prunes=true")
    p.add_argument("--keep-open-clip", action="store_true", help="keep open_clip teachers (default: timm twins)")
    p.add_argument("--data-batches", type=int, default=None,
                   help="also time N batches of the synthetic loader on the CPU (default 0; cpu-small 2)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; variants not started by then are "
                   "skipped (the JSON says so)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-small", action="store_true", help="tiny preset, batch 8, few steps, on the CPU in fp32")
    p.add_argument("--out", default=None, help="write the JSON report here (rewritten after every variant)")
    p.add_argument("--table", default=None, metavar="JSON", help="print the table of a saved report and exit")
    p.add_argument("--flops-only", action="store_true", help="print the analytic FLOPs per image and exit")
    args = p.parse_args(argv)
    small = args.cpu_small
    args.preset = args.preset or ("tiny" if small else "vitl_in21k_clip_mae")
    args.batch = args.batch or ("8" if small else None)
    args.steps = args.steps if args.steps is not None else (3 if small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    args.data_batches = args.data_batches if args.data_batches is not None else (2 if small else 0)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def preset_batches(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    presets = [p for p in args.preset.split(",") if p]
    batches = [int(b) for b in args.batch.split(",")] if args.batch else [None]
    if len(batches) == 1:
        batches *= len(presets)
    if len(batches) != len(presets):
        raise SystemExit(f"--batch gives {len(batches)} values for {len(presets)} presets")
    return list(zip(presets, batches, strict=True))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.table:
        print(summary(json.loads(Path(args.table).read_text())))
        return {}
    if args.flops_only:
        print(flops_table(args))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_small else "cpu")
    cuda = device.type == "cuda"
    peak = matmul_peak(device.type == "cuda")
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/train_throughput.py", *argv]),
        "date": datetime.date.today().isoformat(),
        "device": device_name(device), **versions(), "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "peak": peak, "steps": args.steps, "warmup": args.warmup,
        "datasheet_peak_tflops": flops.peak_tflops(torch.cuda.get_device_name(device) if cuda else None),
        "flop_model": FLOP_MODEL, "loadavg_1min": os.getloadavg()[0], "complete": False, "runs": []}
    print(f"{report['device']}: {peak['what']}: {peak['tflops']:.3g} TFLOP/s", flush=True)
    out = Path(args.out) if args.out else None
    for preset, batch in preset_batches(args):
        run_preset(preset, batch, args, device, peak, report, out, t_start)
    report["complete"] = all("error" not in v for r in report["runs"] for v in r["variants"])
    report["seconds"] = time.perf_counter() - t_start
    write(out, report)
    print(summary(report))
    return report


if __name__ == "__main__":
    main()
