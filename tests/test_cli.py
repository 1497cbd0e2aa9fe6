"""The trainer's command line before any heavy import: ``--help`` (presets, config sections) and ``--print-config``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import yaml
from ds_testlib import REPO

from hybrid_distill.config import Config, load_config, to_dict
from hybrid_distill.config.presets import PRESETS

PROBE = """
import sys
from hybrid_distill.train import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
sys.exit(code)
"""


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_presets_and_config_sections_in_under_2_s_without_torch():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hybrid_distill.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"
    for name, make in PRESETS.items():
        assert f"  {name}" in result.stdout and make.__doc__.strip().splitlines()[0] in result.stdout
    for name, section in vars(Config()).items():
        keys = ", ".join(f.name for f in dataclasses.fields(section))
        assert f"  {name}: {keys}" in result.stdout
    assert "--print-config" in result.stdout
    probe = _run("--help")
    assert probe.returncode == 0 and probe.stdout.strip().endswith("NO_TORCH")


def test_print_config_prints_the_resolved_config_and_exits_0_without_torch(tmp_path):
    args = ["--preset", "vitb_in1k_deit_mae", "optim.base_lr=1e-4", "eval.every=500", "--output-dir", str(tmp_path)]
    result = _run(*args, "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout.rsplit("\n", 2)[0])
    want = load_config("vitb_in1k_deit_mae", overrides=["optim.base_lr=1e-4", "eval.every=500"])
    want.run.output_dir = str(tmp_path)
    assert printed == to_dict(want)  # its data folder does not exist here: no file checks for printing
    assert result.stdout.strip().endswith("NO_TORCH")
    assert not any(tmp_path.iterdir())  # nothing written


def test_print_config_with_a_bad_key_is_exit_2_naming_it():
    result = _run("--print-config", "optim.lr_typo=1")
    assert result.returncode == 2 and "optim.lr_typo" in result.stderr


def test_a_missing_evaluation_folder_fails_before_torch_is_imported(tmp_path):
    result = _run("--output-dir", str(tmp_path / "run"), "eval.train_source=folder:/no/such/train",
                  "eval.val_source=synthetic")
    assert result.returncode == 2, result.stderr
    assert "eval.train_source=folder:/no/such/train: folder '/no/such/train' does not exist" in result.stderr
    assert result.stdout.strip().endswith("NO_TORCH")
