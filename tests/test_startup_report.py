"""The start-up report of each teacher: where its weights came from, parameter count, dtype; random teachers obvious."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from hybrid_distill.config import TeacherConfig, load_config
from hybrid_distill.loop import log_teachers
from hybrid_distill.model.task import HybridDistillTask
from hybrid_distill.model.teachers import describe, weights_origin

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_origin_names_the_file_the_hub_tag_or_random(tmp_path):
    assert weights_origin(TeacherConfig(weights="random")) == "random init"
    path = tmp_path / "mae.pth"
    assert weights_origin(TeacherConfig(weights=str(path))) == f"file {path.resolve()}"
    assert weights_origin(TeacherConfig(library="open_clip", model="ViT-L-14", weights="pretrained",
                                        pretrained_tag="openai")) == "open_clip hub ViT-L-14 pretrained=openai"
    hub = SimpleNamespace(backbone=SimpleNamespace(model=SimpleNamespace(pretrained_cfg={
        "tag": "mae", "hf_hub_id": "timm/vit_base_patch16_224.mae"})))
    assert weights_origin(TeacherConfig(model="vit_base_patch16_224.mae", weights="pretrained"), hub) == \
        "timm hub vit_base_patch16_224.mae (timm/vit_base_patch16_224.mae)"


def test_describe_counts_parameters_and_reports_the_placed_dtype():
    task = HybridDistillTask(load_config("tiny"))
    task.place_teachers(torch.device("cpu"), torch.bfloat16)
    info = describe(task.mim_teacher, task.cfg.mim_teacher, "mim_teacher")
    by_hand = sum(p.numel() for p in task.mim_teacher.backbone.model.parameters())
    assert info["parameters"] == by_hand and info["dtype"] == "bfloat16" and info["random"]
    assert (info["img_size"], info["depth"], info["num_heads"]) == (64, 6, 4)


def _report(caplog, *overrides: str) -> list[logging.LogRecord]:
    task = HybridDistillTask(load_config("tiny", overrides=list(overrides)))
    with caplog.at_level(logging.INFO, logger="hybrid_distill"):
        log_teachers(SimpleNamespace(task=task, cfg=task.cfg))
    return [r for r in caplog.records if r.name == "hybrid_distill"]


def test_tiny_random_teachers_are_reported_without_a_warning(caplog):
    records = _report(caplog)
    lines = [r.getMessage() for r in records]
    assert any(line.startswith("mim_teacher: timm vit_base_patch16_224.mae, weights: random init, 0.3M parameters, "
                               "float32, 64 px, 6 blocks x 4 heads") for line in lines), lines
    assert any(line.startswith("feature_teacher: timm vit_base_patch16_clip_224.openai") for line in lines)
    assert not [r for r in records if r.levelno >= logging.WARNING]


def test_a_random_teacher_of_real_size_is_a_warning_naming_the_key(caplog):
    records = _report(caplog, "feature_teacher.embed_dim=384", "feature_teacher.depth=6", "feature_teacher.num_heads=6")
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "feature_teacher" in warnings[0] and "RANDOM weights" in warnings[0]
    assert "feature_teacher.weights=pretrained" in warnings[0]
