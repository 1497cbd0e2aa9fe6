"""A real, throw-away SLURM cluster on this machine: munged, slurmctld and two slurmd "nodes" on loopback.

Used by ``tests/test_slurm.py`` (session fixture) and runnable by hand to poke at the launchers::

    sudo python tests/slurm_cluster.py            # starts the cluster, prints SLURM_CONF, Ctrl-C tears it down
    SLURM_CONF=/tmp/hd-slurm-XXXX/slurm.conf sinfo

Everything lives in one temporary directory: a private munge key and socket (``AuthInfo=socket=...``), free
TCP ports for slurmctld and each slurmd, state, spool and logs, so a system SLURM or munge on the same machine
is neither used nor disturbed. Debian 12's Slurm 22.05 supports several slurmd on one host (``slurmd -N``):
both nodes have ``NodeAddr=127.0.0.1`` and their own ``Port``. Node names (n1, n2) do not resolve, like on
many real clusters, which exercises the NodeAddr lookup in ``hybrid_distill.runtime.cluster``.

Teardown kills only what the harness started: the daemons it spawned (tracked ``Popen`` objects), then any
leftover process whose environment carries this cluster's unique ``HD_SLURM_HARNESS`` token (slurmstepd and
job tasks inherit it from the daemons and from ``submit``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
MARKER = "HD_SLURM_HARNESS"
CRED_EXPIRE_S = 15  # see _slurm_conf


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here for a reason that is not a bug (not root, no apt-get)."""


# ----------------------------------------------------------------------------------------------------------------
# Installation


def _missing_programs() -> list[str]:
    search = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in DAEMONS + CLIENTS if shutil.which(p, path=search) is None]


def ensure_installed(log: Path | None = None) -> None:
    """Install Debian's slurmctld, slurmd, slurm-client and munge with apt-get when any program is missing.

    Raises:
        SlurmUnavailable: not root or no apt-get (the caller skips).
        RuntimeError: apt-get failed (a real failure).
    """
    if not _missing_programs():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed ({', '.join(_missing_programs())} missing) and "
                               "installing it needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            if subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                raise RuntimeError(f"{' '.join(argv)} failed" + (f"; see {log}" if log else ""))
    finally:
        if log:
            out.close()
    if _missing_programs():
        raise RuntimeError(f"installed {' '.join(PACKAGES)} but still missing {', '.join(_missing_programs())}")


def _program(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


# ----------------------------------------------------------------------------------------------------------------
# The cluster


class SlurmCluster:
    """Start/stop a private SLURM cluster and talk to it.

    Args:
        nodes: node names; every node runs its own slurmd on 127.0.0.1.
        cpus: CPUs each node advertises (``SlurmdParameters=config_overrides``: may exceed the real count).
        root: working directory (default: a new temporary directory, removed by ``stop``).
    """

    def __init__(self, nodes: Sequence[str] = ("n1", "n2"), cpus: int = 2, root: Path | None = None) -> None:
        self.nodes = tuple(nodes)
        self.cpus = cpus
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="hd-slurm-")) if root is None else Path(root)
        self.conf = self.root / "slurm.conf"
        self.token = f"{os.getpid()}-{self.root.name}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- environment -------------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients and jobs: this cluster's ``SLURM_CONF`` plus the harness token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.update(SLURM_CONF=str(self.conf), **{MARKER: self.token})
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (argv list, no shell) against this cluster."""
        out = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
        return out

    # -- start ---------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> SlurmCluster:
        """Install if needed, write configuration, start munged, slurmctld and the slurmds; wait for idle nodes.

        Raises:
            SlurmUnavailable: not root (slurmd must run as root to start jobs) or no apt-get to install SLURM.
        """
        try:
            if os.geteuid() != 0:
                raise SlurmUnavailable("the test cluster needs root (slurmd starts job steps as root)")
            for sub in ("state", "spool", "log", "munge"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            ensure_installed(self.root / "log" / "apt.log")
            self._start_munge()
            ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
            self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
            self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(exist_ok=True)
                self._spawn(f"slurmd-{node}", [_program("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_program("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={munge / 'munge.socket'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}", f"--log-file={munge / 'munged.log'}"])
        self._wait(lambda: (munge / "munge.socket").exists(), 20, "munged socket")

    def _slurm_conf(self, ctld_port: int, node_ports: Iterable[int]) -> str:
        host = socket.gethostname().split(".")[0]
        root, log = self.root, self.root / "log"
        lines = [
            "# written by tests/slurm_cluster.py: a private two-node cluster on loopback",
            "ClusterName=hdtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire (default 120 s) is also how long a requeued job waits before it may start again: its
            # old credential stays revoked on the nodes until then, and an earlier start fails with "Job
            # credential revoked". 15 s keeps the preemption tests short without bypassing that wait.
            f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool' / '%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd.%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=15",
            "MinJobAge=600",
            "InactiveLimit=0",
            "MessageTimeout=30",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                         "RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - owned by the child
        self._procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        log.close()

    def wait_idle(self, timeout: float = 90) -> None:
        """Wait until every node is idle (raises with the daemon logs on timeout)."""
        def idle() -> bool:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

        self._wait(idle, timeout, "idle nodes")

    def _wait(self, predicate, timeout: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log (for failure messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"==> {path} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- jobs ------------------------------------------------------------------------------------------------------

    def submit(self, script: Path | str, args: Sequence[str] = (), sbatch_args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> str:
        """``sbatch --parsable [sbatch_args] script [args]``; returns the job id."""
        full_env = {**self.env, **(env or {})}
        argv = [_program("sbatch"), "--parsable", *sbatch_args, str(script), *args]
        out = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)
        if out.returncode:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty when the job is gone)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields: dict[str, str] = {}
        for item in out.stdout.split():
            key, sep, value = item.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def state(self, job_id: str) -> str:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...; ``""`` if unknown)."""
        return self.job(job_id).get("JobState", "")

    def wait_for(self, job_id: str, states: Iterable[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Wait for the job to reach one of ``states``; returns its fields. Raises on timeout."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in wanted:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout:.0f}s: {info}")
            time.sleep(poll)

    def signal_job(self, job_id: str, sig: str = "USR1", batch: bool = False) -> None:
        """What ``--signal`` does at its time: ``scancel -s SIG`` to the job steps' tasks, or with ``batch``
        (``--signal=B:SIG``) ``scancel -b`` to the batch shell only."""
        self.run("scancel", "-s", sig, *(["-b"] if batch else []), job_id)

    # -- stop ------------------------------------------------------------------------------------------------------

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job (and its steps) and wait until the queue is empty."""
        self.run("scancel", "--full", "--state=PENDING,RUNNING,SUSPENDED,REQUEUED", "-u", "root", check=False,
                 timeout=30)
        self.run("scancel", "-u", "root", check=False, timeout=30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=30).stdout.strip():
            time.sleep(1)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons this harness started, kill its leftovers, remove the directory."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.cancel_all()
        slurm = [proc for name, proc in self._procs.items() if name != "munged"]
        _terminate(slurm)  # all slurm daemons at once, then munged, which they use until they exit
        _terminate([proc for name, proc in self._procs.items() if name == "munged"])
        self._procs.clear()
        for pid in marked_pids(self.token):
            _kill_pid(pid)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float = 10) -> None:
    """SIGTERM every process, wait up to ``grace`` seconds in all, then SIGKILL the rest."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def marked_pids(token: str) -> list[int]:
    """PIDs (other than this process and its ancestors) whose environment has ``HD_SLURM_HARNESS=token``."""
    needle = f"{MARKER}={token}".encode()
    spared = {os.getpid(), *_ancestors()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C or SIGTERM tears it down", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    sys.exit(0)
