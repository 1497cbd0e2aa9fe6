"""Start the real trainer as users do (``python launch.py``, ``deepspeed``, ``launchers/single_node.sh``) and do bad
things to it: signals, SIGSTOP, SIGKILL, a full disk. Used by ``tests/test_faults.py`` and ``scripts/fault_soak.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_COUNT = itertools.count()
TINY = ["--preset", "tiny", "run.log_every=1", "data.synthetic_size=32"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """The test environment: CPU DeepSpeed, one thread, this checkout first on the path, no inherited rank."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "HD_RELATION_IMPL",
                        "HD_STOP_FILE", "HD_STOPPED_FILE", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")}
    out.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    out.update(extra)
    return out


class Job:
    """One trainer process tree started in the background; its output goes to ``<out>.jobN.log``.

    Args:
        out: the run directory (``--output-dir``).
        args: trainer arguments after ``--output-dir``.
        procs: 1: ``python launch.py``; more: ``python -m deepspeed.launcher.runner --num_gpus N launch.py``.
        script: ``"single_node"`` runs ``launchers/single_node.sh`` instead (``HD_GPUS_PER_NODE=procs``).
        extra_env: added to the environment.
        log_dir: where the output goes (default: beside ``out``).
    """

    def __init__(self, out: Path, *args: str, procs: int = 1, script: str | None = None,
                 ds: str = "ds_configs/zero2.json", extra_env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.out = Path(out)
        self.log_path = Path(log_dir or self.out.parent) / f"{self.out.name}.job{next(_COUNT)}.log"
        argv = ["launch.py", "--ds_config", ds, "--output-dir", str(self.out), *args]
        environ = env(**(extra_env or {}))
        if script == "single_node":
            cmd = ["bash", str(REPO / "launchers" / "single_node.sh"), *argv[1:]]
            environ.update(HD_ACCELERATOR="cpu", HD_GPUS_PER_NODE=str(procs), MASTER_PORT=str(free_port()))
        elif procs == 1:
            cmd = [sys.executable, *argv]
        else:
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
                   "--master_port", str(free_port()), *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=self.log_file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> int:
        """The exit code (kills the tree on timeout)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"job on {self.out} still running after {timeout} s\n{self.log()[-4000:]}") from None
        finally:
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def steps(self) -> list[int]:
        return steps(self.out)

    def wait_for_steps(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.steps()) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never logged {count} steps (exit {self.proc.poll()})\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def ranks(self) -> list[int]:
        """PIDs of this job's trainer processes (``launch.py ... --output-dir OUT``), rank order unknown."""
        return [pid for pid, cmd in processes() if "launch.py" in cmd and str(self.out) in cmd
                and "deepspeed.launcher" not in cmd]

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        """The pid of ``rank`` on one node: the trainer process the DeepSpeed launcher gave ``--local_rank=RANK``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [pid for pid in self.ranks() if f"--local_rank={rank} " in _cmdline(pid) + " "]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no process of rank {rank}\n{self.log()[-3000:]}")

    def kill_all(self) -> None:
        for pid in [*self.ranks(), self.proc.pid]:
            kill(pid, signal.SIGKILL)


def processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            out.append((int(entry.name), cmd))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def steps(out: Path) -> list[int]:
    """The ``step`` of every row of ``<out>/metrics.jsonl`` (torn lines skipped)."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return rows


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoints(out: Path) -> list[str]:
    """Names of the complete checkpoints of a run directory, oldest first."""
    from hybrid_distill.runtime.checkpoint import complete_checkpoints

    return [p.name for p in complete_checkpoints(Path(out) / "checkpoints")]


def run(out: Path, *args: str, procs: int = 1, timeout: float = 600, **kw) -> tuple[int, str]:
    """Run a job to its end: (exit code, its output)."""
    job = Job(out, *args, procs=procs, **kw)
    code = job.wait(timeout)
    return code, job.log()
