"""runtime.resume: which config keys may change when a run continues from a checkpoint.

``--resume auto`` refuses a checkpoint saved with another recipe (RESUME_FIXED, minus RESUME_FREE), lists every
changed key, and lets everything else (run length, logging, data location, workers, weights paths, kernels)
change with a warning. ``--resume PATH`` continues with any change, on purpose.
"""

from __future__ import annotations

import logging

import pytest

from hybrid_distill.config import ConfigError, get_key, load_config, to_dict
from hybrid_distill.runtime import checkpoint as ck
from hybrid_distill.runtime.resume import RESUME_FIXED, RESUME_FREE, check_resume

ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.fixture()
def saved(tmp_path):
    """A checkpoint whose marker records the tiny preset's config, saved at ZeRO stage 2."""
    tag = tmp_path / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    ck.write_marker(tag, {"step": 4, "world_size": 1, "zero_stage": 2, "config": to_dict(load_config("tiny"))})
    return tag


@pytest.mark.parametrize("override", [
    "student.depth=5", "student.img_size=56", "mim_teacher.model=vit_small_patch16_224", "feature_teacher.depth=3",
    "masking.drop_ratio=0.5", "masking.layers=[0,2]", "loss.alpha=0.5", "loss.head_reduce=mean",
    "optim.global_batch_size=32", "data.batch_size=4", "data.crop_scale=0.5,1.0", "run.seed=1",
])
def test_a_recipe_key_changed_is_refused_on_auto_and_allowed_on_purpose(saved, override, caplog):
    cfg = load_config("tiny", overrides=[override])
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        check_resume(cfg, ZERO2, saved, on_purpose=False)
    assert f"{key}: " in str(e.value) and "--resume PATH" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.resume"):
        check_resume(cfg, ZERO2, saved, on_purpose=True)
    assert f"changed config keys: {key}" in caplog.text


@pytest.mark.parametrize("override", [
    "run.max_steps=100", "run.epochs=10", "run.log_every=5", "run.ckpt_every=10", "run.keep_last=5",
    "data.num_workers=2", "data.source=folder:/elsewhere", "mim_teacher.weights=/ckpt/mae.pth",
    "feature_teacher.weights=pretrained", "loss.relation_impl=torch", "optim.lr=1e-3", "run.tensorboard=false",
])
def test_a_free_key_changed_is_only_logged(saved, override, caplog):
    cfg = load_config("tiny", overrides=[override])
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.resume"):
        check_resume(cfg, ZERO2, saved, on_purpose=False)
    assert f"changed config keys: {override.split('=')[0]}" in caplog.text


def test_an_unchanged_config_resumes_silently(saved, caplog):
    with caplog.at_level(logging.WARNING, logger="hybrid_distill.resume"):
        check_resume(load_config("tiny"), ZERO2, saved, on_purpose=False)
    assert caplog.text == ""


def test_another_zero_stage_is_refused_even_on_purpose(saved):
    for on_purpose in (False, True):
        with pytest.raises(ConfigError, match="saved with ZeRO stage 2 but --ds_config has stage 3.*zero2.json"):
            check_resume(load_config("tiny"), {"zero_optimization": {"stage": 3}}, saved, on_purpose=on_purpose)


def test_every_fixed_and_free_key_names_a_config_key():
    """A renamed config field must not silently drop out of the resume rules."""
    cfg = load_config("tiny")
    for key in (*RESUME_FIXED, *RESUME_FREE):
        get_key(cfg, key)  # AttributeError for a key that does not exist
