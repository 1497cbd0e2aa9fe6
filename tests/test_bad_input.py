"""Bad input is refused with exit 2 and one line naming the key or file and the fix, before the slow start-up.

The unit tests call the checks; the end-to-end ones run the real ``launch.py`` and also assert how fast it fails
(no torch import before the refusal) and that no traceback is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybrid_distill.config import ConfigError, load_config
from hybrid_distill.config.files import (
    DS_TOP_LEVEL_KEYS,
    DS_ZERO_KEYS,
    check_device_support,
    check_output_dir,
    read_ds_config,
)
from hybrid_distill.runtime import checkpoint as ck
from hybrid_distill.runtime.cluster import dist_timeout

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# a key given twice, presets that contradict each other


def test_a_shell_expanded_brace_pattern_is_refused_with_the_quoting_fix():
    """The README's unquoted ``wds:.../shard-{0000..2047}.tar`` becomes 2048 data.source= arguments; last-wins trained
    on the last shard only."""
    shards = [f"data.source=wds:/data/in21k/shard-{i:04d}.tar" for i in range(2048)]
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=shards)
    message = str(e.value)
    assert "data.source is given 2048 times" in message and "quote it" in message
    assert "'data.source=wds:/data/in21k/shard-{0000..2047}.tar'" in message


def test_a_yaml_key_given_twice_is_refused_naming_the_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  max_steps: 4\n  log_every: 1\n  max_steps: 8\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: key 'max_steps' is given twice in one mapping \(first on line"):
        load_config("tiny", config_file=path)


def test_malformed_yaml_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {max_steps: 3\n  x")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:\d+: config file is not valid YAML"):
        load_config("tiny", config_file=path)


# ----------------------------------------------------------------------------------------------------------------
# values that passed every check


@pytest.mark.parametrize("override, needle", [
    ("masking.layers=[]", "masking.layers must be null"),  # was replaced by the default
    ("masking.layers=[-1,3]", "masking.layers must be null"),
    ("student.img_size=60", "student.img_size=60 is not a multiple of 8 (student.patch_size): the grid would "
                            "silently drop pixels; use 56 or 64"),
    ("optim.base_lr=inf", "optim.base_lr=inf must be a finite number"),  # all-NaN weights at the first step
    ("optim.betas=[0.9,nan]", "optim.betas=(0.9, nan) must be a finite number"),
    ("student.std=[0,0,0]", "student.std must be > 0 per channel"),  # division by zero: NaN inputs
    ("mim_teacher.std=[0.2,0,0.2]", "mim_teacher.std must be > 0 per channel"),
    ("student.drop_path_rate=2.0", "student.drop_path_rate must be in [0, 1)"),  # bernoulli_ traceback
])
def test_values_that_used_to_pass_are_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert needle in str(e.value)


def test_the_patch_size_of_a_timm_name_is_used_when_not_set():
    with pytest.raises(ConfigError, match="not a multiple of 16 .the patch of vit_base_patch16_224"):
        load_config("vitb_in1k_deit_mae", overrides=["student.img_size=200"])
    assert load_config("vitb_in1k_deit_mae", overrides=["student.img_size=192"]).student.img_size == 192


def test_hd_dist_timeout_must_be_a_positive_number():
    assert dist_timeout({"HD_DIST_TIMEOUT_S": "30"}).total_seconds() == 30
    for bad in ("abc", "0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"HD_DIST_TIMEOUT_S='{bad}' must be a positive number"):
            dist_timeout({"HD_DIST_TIMEOUT_S": bad})


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").touch()
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "afile")
    check_output_dir(tmp_path / "new" / "run")  # created later


def test_triton_relations_without_a_gpu_are_refused():
    cfg = load_config("tiny", overrides=["loss.relation_impl=triton"])
    with pytest.raises(ConfigError, match="loss.relation_impl=triton needs a CUDA GPU.*use loss.relation_impl=auto"):
        check_device_support(cfg, "cpu")
    check_device_support(cfg, "cuda")
    check_device_support(load_config("tiny"), "cpu")


def test_an_unknown_model_name_is_refused_naming_the_key():
    from hybrid_distill.loop import check_model_names

    for override, key in (("mim_teacher.model=vit_nonexistent_xx", "mim_teacher.model"),
                          ("student.model=vit_nope", "student.model")):
        with pytest.raises(ConfigError, match=f"{key}='vit_n.*' is not a timm model"):
            check_model_names(load_config("tiny", overrides=[override]))
    with pytest.raises(ConfigError, match="feature_teacher.model='ViT-Q-99' is not an open_clip model"):
        check_model_names(load_config("vitl_in21k_clip_mae", overrides=["feature_teacher.model=ViT-Q-99"]))
    check_model_names(load_config("vitl_in21k_clip_mae"))


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed JSON


def test_a_misspelt_deepspeed_section_names_the_closest_valid_key(tmp_path):
    """DeepSpeed ignores unknown top-level keys: "zero_optimisation" trained at ZeRO stage 0 with exit 0."""
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimisation": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    with pytest.raises(ConfigError, match="unknown key 'zero_optimisation'.*did you mean 'zero_optimization'"):
        read_ds_config(path)
    for shipped in (REPO / "ds_configs").glob("*.json"):
        read_ds_config(shipped)


def test_a_misspelt_zero_key_names_the_closest_valid_one(tmp_path):
    from hybrid_distill.runtime.engine import resolve_ds_config

    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"zero_optimization": {"stgae": 2}}))
    with pytest.raises(ConfigError, match="'zero_optimization.stgae'.*did you mean 'zero_optimization.stage'"):
        resolve_ds_config(path, load_config("tiny"), 1, "cpu")


def test_every_top_level_key_deepspeed_reads_is_known():
    """Record the keys DeepSpeed's own parser looks up, so a DeepSpeed upgrade that adds one fails here instead of
    refusing a valid config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Keys(set):
        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

    class Recording(dict):
        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            return Keys(super().keys())

    DeepSpeedConfig(Recording(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1))
    assert len(seen) > 40 and seen <= DS_TOP_LEVEL_KEYS, sorted(seen - DS_TOP_LEVEL_KEYS)


def test_every_zero_key_deepspeed_accepts_is_known():
    """The recorded ``zero_optimization`` keys are exactly what DeepSpeed's model accepts (names and aliases), so the
    refusal before torch loads neither misses a typo nor refuses a valid key after a DeepSpeed upgrade."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields.items()
    accepted = {n for name, f in fields for n in (name, f.alias, f.validation_alias) if isinstance(n, str)}
    assert accepted == DS_ZERO_KEYS, (sorted(accepted - DS_ZERO_KEYS), sorted(DS_ZERO_KEYS - accepted))


# ----------------------------------------------------------------------------------------------------------------
# COMPLETE markers that are present but invalid


@pytest.mark.parametrize("text, why", [("{}", "lacks step, world_size"), ("[1, 2]", "holds a JSON list"),
                                       ('{"step": 8}', "lacks world_size"), ("{trunc", "unreadable")])
def test_resume_auto_refuses_to_skip_a_newer_checkpoint_with_an_invalid_marker(tmp_path, text, why):
    """``COMPLETE`` = ``{}`` raised KeyError: 'world_size'; a list marker made --resume auto fall back to an older
    checkpoint without saying so."""
    ckpts = tmp_path / "checkpoints"
    for step in (4, 8):
        (ckpts / ck.tag_name(step)).mkdir(parents=True)
    ck.write_marker(ckpts / "step_00000004", {"step": 4, "world_size": 1})
    (ckpts / "step_00000008" / "COMPLETE").write_text(text)
    with pytest.raises(ck.CheckpointError) as e:
        ck.resolve_resume("auto", tmp_path)
    assert "step_00000008" in str(e.value) and why in str(e.value) and "the older step_00000004" in str(e.value)
    assert ck.find_latest(ckpts).name == "step_00000004"  # export and prune still see it as incomplete
    with pytest.raises(ck.CheckpointError, match="step_00000008' is incomplete"):
        ck.resolve_resume(str(ckpts / "step_00000008"), tmp_path)


def test_resume_auto_skips_a_newer_checkpoint_whose_save_did_not_finish_and_says_so(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    for step in (4, 8):
        (ckpts / ck.tag_name(step)).mkdir(parents=True)
    ck.write_marker(ckpts / "step_00000004", {"step": 4, "world_size": 1})
    with caplog.at_level("INFO", logger="hybrid_distill.runtime.checkpoint"):
        assert ck.resolve_resume("auto", tmp_path).name == "step_00000004"
    assert "skipping" in caplog.text and "step_00000008: no COMPLETE marker (its save did not finish)" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# the real launch.py: exit 2, one line, before torch is imported


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "HD_DIST_TIMEOUT_S")}
    return dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None, ds: str = "ds_configs/zero2.json",
            out: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "launch.py", "--ds_config", ds, "--output-dir", str(out or tmp_path / "run"),
           "--preset", "tiny", *args]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=300)
    return result, time.monotonic() - start


def _fast_cases(tmp_path: Path) -> list[tuple[str, list[str], dict[str, str], str]]:
    (tmp_path / "typo.json").write_text('{"zero_optimisation": {"stage": 2}}')
    (tmp_path / "bad.yaml").write_text("run: {max_steps: 3\n  x")
    (tmp_path / "other.yaml").write_text("preset: vitb_in1k_deit_mae\n")
    (tmp_path / "afile").touch()
    (tmp_path / "zero0.json").write_text('{"zero_optimization": {"stage": 0}}')
    (tmp_path / "stgae.json").write_text('{"zero_optimization": {"stgae": 2}}')
    (tmp_path / "adamw.json").write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}')
    (tmp_path / "a_dir.yaml").mkdir()
    return [
        ("stage0", ["--ds_config", str(tmp_path / "zero0.json")], {}, "ZeRO stage 0, which is not supported"),
        ("zero_typo", ["--ds_config", str(tmp_path / "stgae.json")], {}, "did you mean 'zero_optimization.stage'"),
        ("optimizer", ["--ds_config", str(tmp_path / "adamw.json")], {}, "remove the 'optimizer' section"),
        ("not_a_file", ["--config", str(tmp_path / "a_dir.yaml")], {}, "a_dir.yaml' is not a file"),
        ("brace", [f"data.source=wds:/d/shard-{i:04d}.tar" for i in range(4)], {}, "quote it"),
        ("layers", ["masking.layers=[]"], {}, "masking.layers must be null"),
        ("timeout", [], {"HD_DIST_TIMEOUT_S": "abc"}, "HD_DIST_TIMEOUT_S='abc'"),
        ("ds_typo", ["--ds_config", str(tmp_path / "typo.json")], {}, "did you mean 'zero_optimization'"),
        ("yaml", ["--config", str(tmp_path / "bad.yaml")], {}, "bad.yaml:2:"),
        ("presets", ["--config", str(tmp_path / "other.yaml")], {}, "--preset tiny contradicts"),
        ("outfile", ["--output-dir", str(tmp_path / "afile")], {}, "is a file, not a directory"),
        ("twice", ["--output-dir", str(tmp_path / "a"), "run.output_dir=b"], {}, "the run directory is given twice"),
    ]


def test_bad_input_fails_in_a_second_with_one_line_and_exit_2(tmp_path):
    for name, args, env, needle in _fast_cases(tmp_path):
        result, seconds = _launch(tmp_path, *args, env=env)
        err = result.stderr.strip()
        assert result.returncode == 2, (name, err)
        assert needle in err and err.count("\n") == 0 and "Traceback" not in err, (name, err)
        assert seconds < 15, (name, seconds)  # no torch/DeepSpeed import before the refusal (~1 s; CI is slow)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["loss.relation_impl=triton"], "loss.relation_impl=triton needs a CUDA GPU"),
    (["mim_teacher.model=vit_nonexistent_xx"], "mim_teacher.model='vit_nonexistent_xx' is not a timm model"),
    # the cheap checks come before the evaluation sets are opened (an hf: set can take minutes to open)
    (["mim_teacher.model=vit_nonexistent_xx", "eval.train_source=hf:/no/such/set", "eval.val_source=hf:/no/such/set"],
     "mim_teacher.model='vit_nonexistent_xx' is not a timm model"),
], ids=["triton_on_cpu", "unknown_timm_model", "model_before_eval_sets"])
def test_bad_input_found_after_torch_loads_exits_2_with_one_line(tmp_path, args, needle):
    result, _ = _launch(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_empty_complete_marker_exits_2_naming_the_file(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000008").mkdir(parents=True)
    (ckpts / "step_00000008" / "COMPLETE").write_text("{}")
    result, _ = _launch(tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "step_00000008: its COMPLETE marker lacks step, world_size" in result.stderr
    assert "KeyError" not in result.stderr and "Traceback" not in result.stderr
