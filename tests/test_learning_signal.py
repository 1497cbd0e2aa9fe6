"""A real learning signal on real images: does the distilled student inherit what its teachers know?

scikit-learn's 1797 handwritten digits (real scans shipped inside the package, 8x8, 10 classes; ``digits_testlib``)
upsampled to 32 px and split 70/30. The test trains a small supervised ViT on the training split, uses it as both
teachers, distils a randomly initialised student from it with the real trainer (``launch.py``: real ``main()``, real
DeepSpeed, ZeRO-2) on the training images without labels, and reads the online evaluation of the run: the student's
k-NN top-1 on the held-out digits must go from the random-init level to close to the teacher's, and the attention
statistics (NMI) of its relation-distilled blocks must move to the teacher's. Measured numbers: docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from digits_testlib import write_folders
from test_train_e2e import _ok, launch, metrics

from hybrid_distill.eval.data import EvalSet
from hybrid_distill.eval.features import normalise
from hybrid_distill.evaluate import main as evaluate

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)  # 4x4 patch grid
TEACHER = {"model": "vit_small_patch16_224", **{k: v for k, v in VIT.items() if k != "img_size"},
           "mean": ",".join(map(str, MEAN)), "std": ",".join(map(str, STD))}
STEPS = 400


def train_teacher(train_dir: Path, out: Path, cache: Path, epochs: int = 15) -> Path:
    """A supervised ViT (AdamW, cosine) on the training digits, saved as a timm local-dir (config + safetensors)."""
    import timm
    from timm.models import save_for_hf

    images, labels = EvalSet(f"folder:{train_dir}", "teacher", 32, crop_pct=1.0, cache_dir=cache).take(10_000)
    x = normalise(images, MEAN, STD)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", **VIT)  # 1000-way head: the trainer builds it that way
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = len(x) // 32
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * batches)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(batches):
            b = order[i * 32:(i + 1) * 32]
            loss = F.cross_entropy(model(x[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    save_for_hf(model.eval(), str(out), model_config={"model_args": VIT, "pretrained_cfg": {"mean": MEAN, "std": STD}},
                safe_serialization=True)
    return out


def distil_args(train_dir: Path, val_dir: Path, teacher_file: Path, *extra: str) -> list[str]:
    teachers = [f"{role}.{k}={v}" for role in ("mim_teacher", "feature_teacher")
                for k, v in {**TEACHER, "weights": teacher_file}.items()]
    return ["--preset", "tiny", *[f"student.{k}={v}" for k, v in VIT.items()], *teachers,
            f"data.source=folder:{train_dir}", "data.batch_size=32", "optim.global_batch_size=64",
            "data.crop_scale=0.5,1", "data.hflip=false", "optim.lr=1e-3", "optim.min_lr=1e-5", "optim.warmup_epochs=1",
            f"run.max_steps={STEPS}", "run.log_every=50", "run.ckpt_every=1000", "run.export_at_end=false",
            f"eval.train_source=folder:{train_dir}", f"eval.val_source=folder:{val_dir}", "eval.train_samples=null",
            "eval.val_samples=null", "eval.every=1000", "eval.num_workers=0", *extra]


@pytest.mark.slow
def test_distilled_student_reaches_its_teachers_knn_accuracy_on_held_out_digits(tmp_path, one_thread):
    train_dir, val_dir = write_folders(tmp_path / "digits", 32)
    teacher = train_teacher(train_dir, tmp_path / "teacher", tmp_path / "cache")
    assert evaluate([str(teacher), "--train", f"folder:{train_dir}", "--val", f"folder:{val_dir}", "--out",
                     str(tmp_path / "teacher.json"), "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"),
                     "--protocols", "knn", "--pools", "cls"]) == 0
    teacher_knn = __import__("json").loads((tmp_path / "teacher.json").read_text())["metrics"]["knn_cls_top1"]
    run = tmp_path / "run"
    _ok(launch(run, *distil_args(train_dir, val_dir, teacher / "model.safetensors")))
    rows = [r for r in metrics(run) if "knn_cls_top1" in r]
    assert [r["step"] for r in rows] == [0, STEPS]
    random_init, distilled = rows
    teachers = next(r for r in metrics(run) if "mim_teacher_attn_nmi_b1" in r)
    print(f"k-NN top-1: random-init student {random_init['knn_cls_top1']:.1f}, distilled "
          f"{distilled['knn_cls_top1']:.1f}, teacher {teacher_knn:.1f}")
    assert teacher_knn > 75  # the teacher knows the digits
    assert distilled["knn_cls_top1"] > random_init["knn_cls_top1"] + 20  # far above the same student at init
    assert distilled["knn_cls_top1"] > teacher_knn - 6  # and close to the teacher
    for block in (1, 2):  # the relation-distilled blocks L-3, L-2 attend like the teacher's
        key = f"attn_nmi_b{block}"
        target = teachers[f"mim_teacher_{key}"]
        assert abs(distilled[key] - target) < 0.3 * abs(random_init[key] - target), (block, distilled[key], target)
