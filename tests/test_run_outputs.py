"""What a run leaves for the tools users already run: DeepSpeed's zero_to_fp32.py, timm, W&B."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from faultlib import TINY, run

from hybrid_distill.config import RunConfig
from hybrid_distill.runtime.metrics import WANDB_ID_FILE, MetricsLogger


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "run"
    code, log = run(out, *TINY, "run.max_steps=2", "run.ckpt_every=2")
    assert code == 0, log[-4000:]
    return out


@pytest.mark.slow
def test_deepspeeds_own_zero_to_fp32_works_without_a_tag(finished_run, tmp_path):
    """It failed with "Unable to find 'latest' file": the trainer now writes DeepSpeed's ``latest`` pointer."""
    ckpts = finished_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    result = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    weights = torch.load(tmp_path / "fp32" / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("student.") for k in weights)


@pytest.mark.slow
def test_the_export_records_the_input_size_and_is_readable_like_its_other_files(finished_run):
    """timm got input_size 224 for the 64 px student from the load line; model.safetensors was mode 0600."""
    import timm

    export = finished_run / "export"
    info = json.loads((export / "export.json").read_text())
    assert "input_size=(3, 64, 64)" in info["load"]
    for model in (eval(info["load"], {"timm": timm}), timm.create_model(f"local-dir:{export}", pretrained=True)):
        assert tuple(model.pretrained_cfg["input_size"]) == (3, 64, 64)
        assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 64, 64)
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
    mode = stat.S_IMODE((export / "model.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((export / "config.json").stat().st_mode) and mode & 0o044 == 0o044, oct(mode)


def test_wandb_keeps_one_run_id_per_run_directory(tmp_path, monkeypatch):
    """Every resume or requeue started a new W&B run. wandb is an optional extra: a stand-in records the calls."""
    calls = []

    class Run:
        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = RunConfig(wandb=True, tensorboard=False)
    for run_dir in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):  # a resumed twice, then another run
        MetricsLogger(run_dir, cfg, is_main=True, total_steps=2).close()
    assert [c["resume"] for c in calls] == ["allow"] * 3
    assert calls[0]["id"] == calls[1]["id"] != calls[2]["id"]
    assert (tmp_path / "a" / WANDB_ID_FILE).read_text().strip() == calls[0]["id"]
