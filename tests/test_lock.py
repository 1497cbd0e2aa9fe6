"""runtime.lock: one live job per run directory, with the holder named; the staleness rules of its docstring.

Real files and real processes; a "job on another host" is a lock file whose recorded host is not this one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hybrid_distill.errors import ConfigError
from hybrid_distill.runtime.lock import LOCK_NAME, RunLock


def _foreign(run_dir: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock file written by a job on another host, last refreshed ``age_s`` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": "gpu-node-17", "pid": 4242, "start": 1, "job": "", "restart": 0, "since": "earlier", **fields}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_a_second_job_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run", stale_s=300).acquire()
    try:
        with pytest.raises(ConfigError) as e:
            RunLock(tmp_path / "run", stale_s=300).acquire()
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in str(e.value)
        assert "another --output-dir" in str(e.value)
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run", stale_s=300).acquire().release()  # free again


def test_a_live_job_on_another_host_is_refused(tmp_path):
    _foreign(tmp_path / "run", age_s=10, job="77")
    with pytest.raises(ConfigError, match="host gpu-node-17, pid 4242, SLURM job 77"):
        RunLock(tmp_path / "run", stale_s=300).acquire()


def test_a_lock_without_heartbeat_is_taken_over(tmp_path, caplog):
    _foreign(tmp_path / "run", age_s=400)
    with caplog.at_level("WARNING", logger="hybrid_distill.lock"):
        lock = RunLock(tmp_path / "run", stale_s=300).acquire()
    try:
        assert "heartbeat is 400 s old" in caplog.text and "gpu-node-17" in caplog.text
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    """kill -9 leaves the lock behind; the next job on the same host takes it at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign(tmp_path / "run", host=socket.gethostname(), pid=dead.pid, start=123)
    RunLock(tmp_path / "run", stale_s=300).acquire().release()


def test_a_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job (same id, next restart) must not wait for its killed predecessor on another node."""
    _foreign(tmp_path / "run", job="123", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path / "run", stale_s=300).acquire().release()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    _foreign(tmp_path / "run", job="123", restart=0)  # the same run of the job: live
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path / "run", stale_s=300).acquire()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = RunLock(tmp_path / "run", stale_s=300, heartbeat_s=0.1).acquire()
    try:
        path = tmp_path / "run" / LOCK_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5
    finally:
        lock.release()


def _race_for_the_lock(run_dir, jobs: int = 6) -> list[str]:
    """``jobs`` threads (processes on several nodes in real life) acquire the lock at the same moment."""
    results: list[str] = []
    start = threading.Barrier(jobs)

    def job() -> None:
        start.wait()
        try:
            RunLock(run_dir, stale_s=300).acquire()
            results.append("got it")
        except ConfigError:
            results.append("refused")

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results)


def test_of_jobs_starting_together_exactly_one_gets_the_lock(tmp_path):
    """O_EXCL creation: several jobs (threads here, processes on several nodes in real life) starting at once."""
    assert _race_for_the_lock(tmp_path / "run") == ["got it"] + ["refused"] * 5


def test_of_jobs_taking_over_one_stale_lock_together_exactly_one_gets_it(tmp_path):
    _foreign(tmp_path / "run", age_s=1000)
    assert _race_for_the_lock(tmp_path / "run") == ["got it"] + ["refused"] * 5


def test_release_leaves_a_lock_taken_over_by_another_job_alone(tmp_path):
    lock = RunLock(tmp_path / "run", stale_s=300).acquire()
    _foreign(tmp_path / "run")  # someone judged ours stale and took it
    lock.release()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["host"] == "gpu-node-17"
