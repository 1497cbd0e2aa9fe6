"""The trainer's online evaluation (``eval`` config section): is the student learning the right things?

At step 0 of a fresh run, every ``eval.every`` optimizer steps and at the last step, every rank:

1. copies the student's current weights out of the DeepSpeed engine into an evaluation copy (gathered from the
   ZeRO-3 partitions parameter by parameter; ``runtime.engine.copy_module_weights``);
2. embeds its share of two fixed labelled subsets (``eval.train_source``/``val_source``) with that copy and
   gathers the features (``eval.features``);
3. scores weighted k-NN and the linear probe on them (``eval.protocols``: ``knn``, ``linear``), CLS and
   mean-pooled (``eval.pools``);
4. measures the average attention distance and NMI of every block on a fixed batch of the val subset
   (``attention``; ``hybrid_distill.analysis``).

None of it touches the training loader, the optimizer or the engine's module, and the CPU/CUDA random states are
restored afterwards, so a run with evaluation trains exactly like one without. The teachers' attention statistics
are measured once, on the same fixed batch, when a fresh run starts.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hybrid_distill.analysis import iter_attention_maps, iter_backbone_attention_maps, summarise
from hybrid_distill.config import Config
from hybrid_distill.errors import DataError
from hybrid_distill.eval.data import EvalSet
from hybrid_distill.eval.features import normalise
from hybrid_distill.eval.protocols import CLASSIFIERS, evaluate_model
from hybrid_distill.model.student import build_student
from hybrid_distill.runtime.engine import copy_module_weights


def attention_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{prefix}attn_distance_b{i}`` (pixels) and ``{prefix}attn_nmi_b{i}`` per block from an ``analyse`` result."""
    out = {}
    for b in result["blocks"]:
        out[f"{prefix}attn_distance_b{b['block']}"] = b["head_distance"]
        out[f"{prefix}attn_nmi_b{b['block']}"] = b["nmi"]
    return out


def check_same_classes(train: EvalSet, val: EvalSet) -> None:
    """Two class-folder sources must list the same classes, or their label numbers mean different things."""
    if train.classes is not None and val.classes is not None and train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise DataError(f"{train.key} and {val.key} have different class folders ({len(train.classes)} vs "
                        f"{len(val.classes)}; e.g. {only}): labels are class-folder numbers, so both need the same "
                        "class folders")


class OnlineEval:
    """Evaluation sets, the fixed attention batch and the student's evaluation copy of one training job.

    Args:
        cfg: the run config (``eval``, ``student``, ``run.seed``, ``data.synthetic_size``).
        rank, world_size: this process and the number of processes.
        device: the training device.
        cache_dir: folder-index cache (the run's ``cache``).
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device, cache_dir: str) -> None:
        ev = self.cfg = cfg.eval
        common = dict(img_size=cfg.student.img_size, crop_pct=ev.crop_pct, seed=cfg.run.seed, rank=rank,
                      world_size=world_size, cache_dir=cache_dir, image_key=ev.image_key, streaming=ev.streaming,
                      synthetic_size=cfg.data.synthetic_size)
        self.train_set = EvalSet(ev.train_source, "eval.train_source", split=ev.train_split,
                                 num_samples=ev.train_samples, **common)
        self.val_set = EvalSet(ev.val_source, "eval.val_source", split=ev.val_split, num_samples=ev.val_samples,
                               **common)
        check_same_classes(self.train_set, self.val_set)
        self.device = device
        self.mean, self.std = tuple(cfg.student.mean), tuple(cfg.student.std)
        with torch.device("meta"):  # no initialisation: no draw from the training run's RNG, weights copied in
            student = build_student(cfg.student)
        self.student = student.to_empty(device=device).eval().requires_grad_(False)
        self.images = self.val_set.take(ev.attention_images)[0] if "attention" in ev.protocols else None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether step ``step`` (just completed) is evaluated: every ``eval.every`` steps and the last one."""
        return step % self.cfg.every == 0 or step == total_steps

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Metrics of the engine's current student (every rank must call it: it gathers)."""
        start = time.perf_counter()
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad():
            copy_module_weights(engine, "student", self.student)
            metrics: dict[str, float] = {}
            if any(p in CLASSIFIERS for p in self.cfg.protocols):
                metrics.update(evaluate_model(self.student, self.mean, self.std, self.train_set, self.val_set,
                                              self.cfg, device=self.device))
            if self.images is not None:
                x = normalise(self.images.to(self.device), self.mean, self.std)
                chunks = (iter_attention_maps(self.student, c) for c in x.split(self.cfg.batch_size))
                patch = self.student.patch_embed.patch_size
                metrics.update(attention_metrics(summarise(chunks, x.shape[0], x.shape[-2:], patch)))
        metrics["eval_time_s"] = time.perf_counter() - start
        return metrics

    def teacher_metrics(self, teachers: dict[str, Any]) -> dict[str, float]:
        """``{role}_attn_distance_b{i}`` / ``{role}_attn_nmi_b{i}`` of each teacher on the fixed batch (or {})."""
        if self.images is None:
            return {}
        out: dict[str, float] = {}
        with torch.random.fork_rng(devices=self._rng_devices()), torch.no_grad():
            for role, teacher in teachers.items():
                x = teacher.prepare(self.images.to(self.device))  # its own size and normalisation
                patch = teacher.img_size // teacher.backbone.grid_size[0]
                chunks = (iter_backbone_attention_maps(teacher.backbone, c) for c in x.split(self.cfg.batch_size))
                out.update(attention_metrics(summarise(chunks, x.shape[0], x.shape[-2:], patch), f"{role}_"))
        return out
