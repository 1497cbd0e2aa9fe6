"""Packaging: a non-editable install ships every module of both packages and the ``hybrid-distill`` command, and
``import kernels`` is ours (PyPI has an unrelated ``kernels``)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (setuptools' build/ must not hold stale modules)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "runs", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, cwd=out)
    return next(out.glob("hybrid_distill-*.whl"))


def test_the_wheel_ships_every_module_of_both_packages(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(REPO)) for pkg in ("hybrid_distill", "kernels") for p in (REPO / pkg).rglob("*.py")}
    assert sources and sources <= names, sorted(sources - names)


def test_the_wheel_installs_the_hybrid_distill_command(wheel):
    archive = zipfile.ZipFile(wheel)
    entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
    text = archive.read(entry_points).decode()
    assert "hybrid-distill = hybrid_distill.train:main" in text


def test_import_kernels_resolves_to_this_repository():
    import kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"
    assert hasattr(kernels, "relation_loss") and hasattr(kernels, "gather_relations")


@pytest.mark.slow
def test_a_non_editable_install_gives_a_hybrid_distill_command_that_runs(wheel, tmp_path):
    """``pip install .`` (here: its wheel) into a fresh environment: ``hybrid-distill`` and ``python -m
    hybrid_distill.train`` run from anywhere, with the installed copy of the package (not this checkout)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python, command = venv / "bin" / "python", venv / "bin" / "hybrid-distill"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "elsewhere"
    out.mkdir()
    help_text = subprocess.run([str(command), "--help"], cwd=out, env=env, capture_output=True, text=True, check=True)
    assert "presets (--preset NAME):" in help_text.stdout and "vitl_in21k_clip_mae" in help_text.stdout
    printed = subprocess.run([str(command), "--preset", "tiny", "--print-config", "run.max_steps=3"], cwd=out, env=env,
                             capture_output=True, text=True, check=True)
    assert "max_steps: 3" in printed.stdout
    where = subprocess.run([str(python), "-c", "import hybrid_distill; print(hybrid_distill.__file__)"], cwd=out,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(REPO) not in where
    module = subprocess.run([str(python), "-m", "hybrid_distill.train", "--help"], cwd=out, env=env,
                            capture_output=True, text=True)
    assert module.returncode == 0 and "--print-config" in module.stdout
