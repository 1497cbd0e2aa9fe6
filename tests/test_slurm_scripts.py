"""Fast checks of the launcher scripts without SLURM: syntax, argument handling and the requeue decision.

``hd_finish`` is exercised with a fake ``scontrol`` on PATH that records its arguments; the real cluster runs
are in ``tests/test_slurm.py``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
COMMON = LAUNCHERS / "_common.sh"


@pytest.mark.parametrize("script", ["_common.sh", "slurm_srun.sbatch", "slurm_deepspeed.sbatch", "single_node.sh"])
def test_the_scripts_parse(script: str) -> None:
    """Syntax only; what the scripts and their #SBATCH directives do runs on a real cluster in tests/test_slurm.py
    (requeue, --signal to the tasks or to the batch shell, --kill-on-bad-exit, the per-node deepspeed launcher)."""
    subprocess.run(["bash", "-n", str(LAUNCHERS / script)], check=True)


def _bash(snippet: str, tmp_path: Path, env: dict[str, str] | None = None,
          scontrol_rc: int = 0) -> subprocess.CompletedProcess[str]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\nexit {scontrol_rc}\n')
    scontrol.chmod(0o755)
    full_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})}
    script = f"set -euo pipefail\nsource {COMMON}\n{snippet}\n"
    return subprocess.run(["bash", "-c", script], env=full_env, capture_output=True, text=True, check=False)


def test_build_args_adds_defaults_before_overrides(tmp_path: Path) -> None:
    out = _bash('hd_build_args --preset tiny run.max_steps=3; printf "%s\\n" "${HD_ARGS[@]}"', tmp_path)
    assert out.stdout.split() == ["--ds_config", "ds_configs/zero2.json", "--resume", "auto", "--preset", "tiny",
                                  "run.max_steps=3"]
    out = _bash('hd_build_args --ds_config z3.json --resume=none a=1; printf "%s\\n" "${HD_ARGS[@]}"', tmp_path)
    assert out.stdout.split() == ["--ds_config", "z3.json", "--resume=none", "a=1"]


@pytest.mark.parametrize("rc, marker, restarts, terminated, requeued, exit_code", [
    (0, "", "0", False, False, 0),                   # finished
    (75, "", "0", False, True, 0),                   # stopped on request, all ranks exited 75
    (143, "signal SIGUSR1", "0", False, True, 0),    # stopped on request, srun killed a rank in its shutdown
    (75, "stop file x.stop", "0", False, True, 0),
    (137, "", "0", False, False, 137),               # a crash: no requeue loop
    (1, "", "0", False, False, 1),
    (75, "", "50", False, False, 75),                # HD_MAX_REQUEUES reached
    (75, "signal SIGTERM", "0", False, False, 75),   # scancel/preemption reached the ranks: stay cancelled
    (75, "stop file x.stop", "0", True, False, 75),  # the batch shell got SIGTERM
])
def test_finish_requeue_decision(tmp_path: Path, rc: int, marker: str, restarts: str, terminated: bool,
                                 requeued: bool, exit_code: int) -> None:
    stopped = tmp_path / "job.stopped"
    if marker:
        stopped.write_text(f"{marker}\n")
    env = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": restarts, "HD_STOPPED_FILE": str(stopped),
           "HD_STOP_FILE": str(tmp_path / "job.stop"), "HD_TASK_LOG_PREFIX": str(tmp_path / "job")}
    if terminated:
        env["HD_TERMINATED"] = "1"
    out = _bash(f"hd_finish {rc}", tmp_path, env)
    assert out.returncode == exit_code, out.stdout + out.stderr
    calls = tmp_path / "scontrol.calls"
    assert (calls.read_text().split() == ["requeue", "42"]) if requeued else not calls.exists()
    assert not stopped.exists()


def test_batch_shell_signal_becomes_stop_file(tmp_path: Path) -> None:
    """hd_run_step: a USR1 to the batch shell while the step runs creates the stop file; the step's exit code
    is kept."""
    stop = tmp_path / "job.stop"
    snippet = f"""
        HD_STOP_FILE={stop}
        rm -f "$HD_STOP_FILE"
        HD_TERMINATED=0
        ( sleep 0.5; kill -USR1 $$ ) &
        hd_run_step bash -c 'for i in $(seq 50); do [[ -e {stop} ]] && exit 75; sleep 0.1; done; exit 3'
        echo "rc=$HD_STEP_RC requested=$HD_STOP_REQUESTED terminated=$HD_TERMINATED"
    """
    out = _bash(snippet, tmp_path)
    assert "rc=75 requested=1 terminated=0" in out.stdout, out.stdout + out.stderr
    assert "batch shell received SIGUSR1" in out.stdout
    out = _bash(snippet.replace("kill -USR1", "kill -TERM"), tmp_path)
    assert "rc=75 requested=1 terminated=1" in out.stdout, out.stdout + out.stderr


def _finish_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": "42", "HD_STOPPED_FILE": str(tmp_path / "job.stopped"),
            "HD_STOP_FILE": str(tmp_path / "job.stop"), "HD_TASK_LOG_PREFIX": str(tmp_path / "job"), **extra}


def test_no_requeue_allowed_on_a_first_run_exits_75_not_an_unbound_variable(tmp_path: Path) -> None:
    """SLURM sets SLURM_RESTART_COUNT only after a requeue; `set -u` must not trip on it."""
    out = _bash("hd_finish 75", tmp_path, _finish_env(tmp_path, HD_MAX_REQUEUES="0"))
    assert out.returncode == 75, out.stdout + out.stderr
    assert "already restarted 0 times; not requeueing" in out.stdout


def test_a_failed_requeue_says_so_and_keeps_the_stop_code(tmp_path: Path) -> None:
    out = _bash("hd_finish 75", tmp_path, _finish_env(tmp_path), scontrol_rc=1)
    assert out.returncode == 75, out.stdout + out.stderr
    assert "scontrol requeue FAILED" in out.stdout and "same --output-dir" in out.stdout


@pytest.mark.parametrize("env, expected", [
    ({"HD_GPUS_PER_NODE": "3", "CUDA_VISIBLE_DEVICES": "0,1"}, "3"),
    ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}, "4"),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2"),  # not every GPU of the machine
])
def test_processes_per_node(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    out = _bash("hd_gpus_per_node", tmp_path, env)
    assert out.stdout.strip() == expected, out.stdout + out.stderr


def test_a_stop_request_during_start_up_becomes_the_stop_file(tmp_path: Path) -> None:
    """B:USR1 can arrive while the batch shell is still setting up (before the training step runs)."""
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "hd", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1",
           "HD_REPO": str(REPO), "HD_LOG_DIR": str(tmp_path / "logs")}
    out = _bash('hd_slurm_setup --preset tiny; kill -USR1 $$; sleep 0.2; echo "requested=$HD_STOP_REQUESTED"',
                tmp_path, env)
    assert "requested=1" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "logs" / "hd-42.r0.stop").exists()
