"""The sbatch scripts on a real SLURM cluster (two slurmd "nodes" on loopback, see ``tests/slurm_cluster.py``).

Each test submits ``launchers/*.sbatch`` unchanged with the ``tiny`` preset on CPU (gloo), overriding only
the resources a CPU box has (``--ntasks-per-node=1 --gpus-per-node=0``). Needs root (apt-get install of
Debian's slurm packages when missing, munged, slurmd); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import MARKER, SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SRUN = REPO / "launchers" / "slurm_srun.sbatch"
DEEPSPEED = REPO / "launchers" / "slurm_deepspeed.sbatch"
JOB_TIMEOUT = 240  # seconds for one run of a job (start-up of two DeepSpeed ranks on 2 shared cores included)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """A running two-node cluster for this module, torn down (leftover processes killed) after its last test."""
    cluster = SlurmCluster(nodes=("n1", "n2"), cpus=2)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no SLURM cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The cluster, with every job a test left behind (a failed test's) cancelled before the next test."""
    yield cluster
    cluster.cancel_all()


class Job:
    """One submitted training job: its id, run directory and logs."""

    def __init__(self, cluster: SlurmCluster, script: Path, tmp: Path, overrides: list[str],
                 options: tuple[str, ...] = (), nodes: int = 2, env: dict[str, str] | None = None,
                 time_limit: int = 20) -> None:
        self.cluster, self.tmp = cluster, tmp
        self.run_dir, self.log_dir = tmp / "run", tmp / "logs"
        tmp.mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
        env = {"HD_ACCELERATOR": "cpu", "HD_GPUS_PER_NODE": "1", "HD_LOG_DIR": str(self.log_dir),
               "OMP_NUM_THREADS": "1", "HD_DIST_TIMEOUT_S": "120", "PYTHONPATH": str(REPO), **(env or {})}
        sbatch_args = [f"--nodes={nodes}", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                       f"--time={time_limit}", f"--output={tmp}/job-%j.out"]
        args = [*options, "--preset", "tiny", "--output-dir", str(self.run_dir), "run.log_every=1", *overrides]
        self.id = cluster.submit(script, args, sbatch_args=sbatch_args, env=env, cwd=REPO)

    def wait(self, states: tuple[str, ...], timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        try:
            return self.cluster.wait_for(self.id, states, timeout)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.report()}") from None

    def steps(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def log(self) -> str:
        path = self.tmp / f"job-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def report(self) -> str:
        """The job log, each task log's tail and the scheduler's view, for assertion messages."""
        parts = [f"==> job log <==\n{self.log()}"]
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-25:]
            parts.append(f"==> {path.name} <==\n" + "\n".join(lines))
        parts.append(f"==> scontrol <==\n{self.cluster.job(self.id)}")
        parts.append(self.cluster.logs())
        return "\n".join(parts)

    def wait_for_steps(self, count: int, timeout: float = JOB_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while len(self.steps()) < count:
            if time.monotonic() > deadline or self.cluster.state(self.id) not in ("PENDING", "RUNNING"):
                raise AssertionError(f"job {self.id} never logged {count} steps\n{self.report()}")
            time.sleep(0.2)

    def preempt_and_resume(self, batch: bool) -> None:
        """Signal as --signal would and expect a checkpoint + requeue; SLURM restarts the job by itself (after
        ``cred_expire``, see ``tests/slurm_cluster.py``)."""
        self.cluster.signal_job(self.id, "USR1", batch=batch)
        info = self.wait(("PENDING", "COMPLETED", "FAILED", "CANCELLED"))
        assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", self.report()


def assert_completed(job: Job, info: dict[str, str]) -> None:
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", job.report()


def assert_continuous(job: Job, max_steps: int) -> None:
    """Steps 1..max_steps each logged exactly once: the resumed run repeated nothing and skipped nothing."""
    assert job.steps() == list(range(1, max_steps + 1)), job.report()


def test_srun_two_nodes_zero2(slurm: SlurmCluster, tmp_path: Path) -> None:
    """2 nodes x 1 task, ZeRO-2: completes, world size 2, metrics and a checkpoint written; a RANK/WORLD_SIZE
    left in the submitting shell (sbatch exports it) does not split the job into one-rank worlds."""
    stale = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    job = Job(slurm, SRUN, tmp_path, ["run.max_steps=4"], options=("--ds_config", "ds_configs/zero2.json"), env=stale)
    assert_completed(job, job.wait(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
    assert_continuous(job, 4)
    assert {m["world_size"] for m in job.metrics()} == {2}
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir(), job.report()
    assert sorted(p.name for p in job.log_dir.glob("*.task*.log")) == [
        f"hybrid-distill-{job.id}.r0.task0.log", f"hybrid-distill-{job.id}.r0.task1.log"]
    assert "rendezvous 127.0.0.1:" in job.log()  # NodeAddr of n1, although "n1" does not resolve


def test_srun_preemption_requeue_resume(slurm: SlurmCluster, tmp_path: Path) -> None:
    """SIGUSR1 to the job steps' tasks (--signal=USR1@T): checkpoint, exit 75, requeue, resume, finish."""
    max_steps = 40
    job = Job(slurm, SRUN, tmp_path, [f"run.max_steps={max_steps}", "run.ckpt_every=1000"])
    job.wait_for_steps(2)
    job.preempt_and_resume(batch=False)
    first_run = job.steps()
    assert 2 <= len(first_run) < max_steps, job.report()
    saved = sorted(p.name for p in (job.run_dir / "checkpoints").glob("step_*"))
    assert saved == [f"step_{first_run[-1]:08d}"], f"the stop checkpoint is the last trained step\n{job.report()}"
    assert_completed(job, job.wait(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
    assert_continuous(job, max_steps)
    log = job.log()
    assert "requeueing" in log and "(restart 1)" in log, job.report()


def test_deepspeed_launcher_variant_preemption(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The per-node deepspeed launcher: SIGUSR1 to the batch shell only (--signal=B:USR1@T) becomes a stop file;
    the run checkpoints, is requeued, resumes and completes."""
    max_steps = 40
    job = Job(slurm, DEEPSPEED, tmp_path, [f"run.max_steps={max_steps}", "run.ckpt_every=1000"])
    job.wait_for_steps(2)
    job.preempt_and_resume(batch=True)
    assert "batch shell received SIGUSR1" in job.log(), job.report()
    assert_completed(job, job.wait(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
    assert_continuous(job, max_steps)
    assert {m["world_size"] for m in job.metrics()} == {2}
    assert (job.run_dir / "checkpoints" / f"step_{max_steps:08d}").is_dir(), job.report()


def test_the_scripts_own_signal_directives_checkpoint_and_requeue_before_the_time_limit(slurm: SlurmCluster,
                                                                                       tmp_path: Path) -> None:
    """Nothing but the scripts' #SBATCH lines: --time=4 min with --signal=USR1@180 (srun variant: to the tasks) or
    B:USR1@180 (deepspeed variant: to the batch shell) and --requeue. SLURM signals within a minute or two; the job
    checkpoints, exits 75 and requeues itself. (Both jobs at once, one node each.)"""
    jobs = [Job(slurm, script, tmp_path / script.stem, ["run.max_steps=100000", "run.ckpt_every=100000"], nodes=1,
                time_limit=4) for script in (SRUN, DEEPSPEED)]
    for job in jobs:
        info = job.wait(("PENDING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
        while info["JobState"] == "PENDING" and info.get("Restarts") == "0":  # not started yet
            info = job.wait(("RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
            info = job.wait(("PENDING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=240)
        assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", job.report()
        assert "stopped on request (exit 75" in job.log() and "SIGUSR1" in job.log(), job.report()
        saved = sorted(p.name for p in (job.run_dir / "checkpoints").glob("step_*"))
        assert saved == [f"step_{job.steps()[-1]:08d}"], job.report()  # the stop checkpoint, not a periodic one
        slurm.run("scancel", job.id)


def test_srun_preemption_during_the_start_up_requeues_and_resumes(slurm: SlurmCluster, tmp_path: Path) -> None:
    """SIGUSR1 while the tasks are still importing torch and building the run used to kill them (-10): no requeue."""
    job = Job(slurm, SRUN, tmp_path, ["run.max_steps=6"])
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list(job.log_dir.glob("*.task1.log")) and time.monotonic() < deadline:  # srun started the tasks
        time.sleep(0.1)
    time.sleep(0.5)
    job.cluster.signal_job(job.id, "USR1")
    info = job.wait(("PENDING", "COMPLETED", "FAILED", "CANCELLED"))
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", job.report()
    assert job.steps() == [], job.report()  # stopped before its first step: nothing to save
    assert_completed(job, job.wait(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")))
    assert_continuous(job, 6)


def test_a_stopped_rank_fails_the_job_within_the_timeout_naming_it(slurm: SlurmCluster, tmp_path: Path) -> None:
    """kill -STOP of one task: the job ends within HD_DIST_TIMEOUT_S plus a few seconds, and the log names the rank
    and host (the process-group timeout alone took 67-80 s and named nobody)."""
    job = Job(slurm, SRUN, tmp_path, ["run.max_steps=100000"], env={"HD_DIST_TIMEOUT_S": "20"})
    job.wait_for_steps(2)
    victims = _job_tasks(slurm.token, procid="1")
    assert victims, job.report()
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    info = job.wait(("FAILED", "COMPLETED", "CANCELLED"), timeout=120)
    assert info["JobState"] == "FAILED", job.report()  # srun reports the killed task (137); task 0 exited 69
    assert time.monotonic() - start < 20 + 15, job.report()
    assert "srun: error: n1: task 0: Exited with exit code 69" in job.log(), job.report()
    assert "rank 1 on host" in job.log() and "stopped answering" in job.log(), job.report()
    assert "requeueing" not in job.log(), job.report()


def test_a_second_job_on_a_live_output_dir_is_refused(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Two jobs on one --output-dir 3 s apart: one crashed in the other's save and 7 of 10 metrics rows were lost."""
    first = Job(slurm, SRUN, tmp_path, ["run.max_steps=100000"], nodes=1)
    first.wait_for_steps(1)
    second = Job(slurm, SRUN, tmp_path, ["run.max_steps=100000"], nodes=1)
    info = second.wait(("FAILED", "COMPLETED", "CANCELLED"), timeout=120)
    assert info["JobState"] == "FAILED" and info.get("ExitCode", "").startswith("2:"), second.report()
    refusal = second.log()
    assert "is in use by another job (host" in refusal and f"SLURM job {first.id}" in refusal, second.report()
    assert slurm.state(first.id) == "RUNNING", first.report()
    slurm.run("scancel", first.id)
    first.wait(("CANCELLED", "COMPLETED", "FAILED"), timeout=120)
    rows = first.steps()
    assert rows == list(range(1, rows[-1] + 1)), first.report()


def test_scancel_stays_cancelled(slurm: SlurmCluster, tmp_path: Path) -> None:
    """scancel sends SIGTERM to the batch shell and every task: no self-requeue, the job stays cancelled."""
    job = Job(slurm, SRUN, tmp_path, ["run.max_steps=100000"])
    job.wait_for_steps(2)
    slurm.run("scancel", job.id)
    deadline = time.monotonic() + 90
    while "not requeueing" not in job.log() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # a requeue would show now
    info = slurm.job(job.id)
    assert "not requeueing" in job.log(), job.report()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", job.report()


def test_dead_rank_fails_the_job_fast_and_is_named(slurm: SlurmCluster, tmp_path: Path) -> None:
    """SIGKILL one rank mid-run: the job fails within a bounded time and the log names the task and node."""
    job = Job(slurm, SRUN, tmp_path, ["run.max_steps=100000"])
    job.wait_for_steps(2)
    victims = [pid for pid in _job_tasks(slurm.token, procid="1")]
    assert victims, job.report()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    info = job.wait(("FAILED", "COMPLETED", "CANCELLED"), timeout=120)
    assert info["JobState"] == "FAILED", job.report()
    assert time.monotonic() - start < 90, job.report()
    assert "task 1" in job.log() and "FAILED" in job.log(), job.report()


def _job_tasks(token: str, procid: str) -> list[int]:
    """PIDs of launch.py processes of this cluster with SLURM_PROCID=procid (from /proc, start-up environment)."""
    wanted = {f"{MARKER}={token}".encode(), f"SLURM_PROCID={procid}".encode()}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if wanted <= environ and b"launch.py" in cmdline:
            pids.append(int(entry.name))
    return pids
