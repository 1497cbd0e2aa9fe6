"""Cluster integration: rank discovery (deepspeed launcher, torchrun, SLURM, single process), preemption, exit codes.

The trainer calls, in this order::

    hold_stop_signals(early)                       # launch.py, first lines: signals are stop requests from here on
    stop = StopRequest().install()                 # train.main, before torch is imported (and before data-loader
    stop.add_stop_file(run_dir / "STOP")           # workers fork, so they inherit the flag-only handlers)
    env = cluster.setup_dist_env()                 # RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* in os.environ
    deepspeed.init_distributed(dist_backend=backend, timeout=cluster.dist_timeout())
    for step in ...:
        ...
        if stop.should_stop(device):             # every rank, at every step boundary: one tiny all_reduce
            save_checkpoint()                      # complete on every rank before anyone exits
            dist.barrier()                         # after the last file is written (logs, plots) ...
            return cluster.EXIT_REQUEUE            # ... so all ranks exit 75 together; the scripts requeue

Rank discovery (docs/dependencies.md): ``RANK`` set means a launcher (deepspeed, torchrun) already did the work. Else a
SLURM task started by ``srun`` (``SLURM_STEP_ID`` set) is mapped: ``SLURM_PROCID/LOCALID`` and the step's task
count become ``RANK/LOCAL_RANK/WORLD_SIZE``, ``MASTER_ADDR`` is the ``NodeAddr`` of the step's first node (node
names may not resolve) and ``MASTER_PORT`` is derived from the job id, so all tasks agree without talking.
Anything else is a single process.

Preemption: SLURM sends SIGUSR1 (``--signal``) or SIGTERM (preemption, ``scancel``, time limit); the
deepspeed-launcher variant cannot pass SIGUSR1 through the launcher, so its batch shell creates a stop file
(``HD_STOP_FILE``) instead, as ``launchers/single_node.sh`` does for SIGTERM, SIGUSR1 and Ctrl-C. A rank started
by DeepSpeed's launcher also treats that launcher's exit as a request (it forwards no signal on one node).
``StopRequest`` only records the request; ``should_stop`` makes every rank agree.

Also a small CLI for the sbatch scripts: ``python -m hybrid_distill.runtime.cluster master-addr`` (``master-port``) and
``python -m hybrid_distill.runtime.cluster hostfile --slots N --out FILE``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from hybrid_distill.errors import ConfigError

# Exit codes of the trainer (the README's table), in one place: the launchers and the SLURM scripts act on them.
EXIT_BAD_INPUT = 2  # bad input (config, files, a checkpoint that does not fit, a run directory in use)
EXIT_NONFINITE = 3  # too many non-finite losses in a row; nothing saved: the newest checkpoint is the last good one
EXIT_BAD_DATA = 65  # EX_DATAERR: more undecodable samples than data.max_bad_fraction (checkpoint saved first)
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: a rank stopped answering (named in the log)
EXIT_IO = 74  # EX_IOERR: the run directory cannot be written (disk full, quota); older checkpoints are intact
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "stopped on request after a checkpoint; requeue me"
DEFAULT_DIST_TIMEOUT_S = 600.0
# MASTER_PORT = PORT_BASE + job_id % PORT_SPAN: 12000-31999, below Linux's ephemeral range (32768-60999), where
# any outgoing connection on the first node may already hold the port.
PORT_BASE, PORT_SPAN = 12000, 20000
STOP_FILE_ENV = "HD_STOP_FILE"
STOPPED_FILE_ENV = "HD_STOPPED_FILE"
DIST_TIMEOUT_ENV = "HD_DIST_TIMEOUT_S"

# Stop codes, MAX-reduced across ranks: 0 none, 1 stop file, 2 the DeepSpeed launcher exited, 100 + signum a signal.
_SIGNAL_CODE_BASE = 100
_FILE_CODE = 1
_LAUNCHER_CODE = 2


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``source`` is ``"launcher"``, ``"slurm"`` or ``"single"``."""

    rank: int
    local_rank: int
    world_size: int
    source: str
    master_addr: str = ""
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    def device_index(self, device_count: int) -> int:
        """The accelerator this rank should use among the ``device_count`` it sees.

        ``local_rank`` when every rank of the node sees all GPUs (the sbatch scripts, the deepspeed launcher);
        ``local_rank % device_count`` when the site binds GPUs per task (``--gpus-per-task``, ``--gpu-bind``)
        and each task sees only its own.
        """
        return self.local_rank % device_count if device_count > 0 else 0

    def describe(self) -> str:
        """One log line: ``rank 1/8 (local 1) via slurm, master 10.0.0.5:21234 on host gpu017``."""
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}) via {self.source}, "
                f"master {self.master_addr}:{self.master_port} on host {socket.gethostname()}")


# ----------------------------------------------------------------------------------------------------------------
# Parsing helpers (pure, unit-tested)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist expression, e.g. ``"gpu[01-02,7],cpu1"`` -> ``gpu01 gpu02 gpu07 cpu1``.

    Zero padding is kept and several bracket groups in one name multiply out (``r[1-2]n[1-2]``).
    """
    hosts: list[str] = []
    for term in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_term(term))
    return hosts


def _split_top_level(text: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return [t.strip() for t in terms if t.strip()]


def _expand_term(term: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", term)
    if match is None:
        return [term]
    head, tail = term[:match.start()], term[match.end():]
    return [head + item + rest for item in _expand_ranges(match.group(1)) for rest in _expand_term(tail)]


def _expand_ranges(spec: str) -> list[str]:
    items: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not hi:
            items.append(lo)
            continue
        width = len(lo)
        items.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return items


def parse_node_addr(scontrol_output: str) -> str | None:
    """The ``NodeAddr=`` value of one ``scontrol show node -o NAME`` line, or None."""
    match = re.search(r"(?:^|\s)NodeAddr=(\S+)", scontrol_output)
    return match.group(1) if match and match.group(1) not in ("(null)", "") else None


def job_port(job_id: int | str) -> int:
    """The per-job rendezvous port: every task of a job computes the same one, jobs rarely collide."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def worker_signal_guard(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGTERM unless its parent (the rank) sends it.

    SLURM signals every process of a job step on preemption, ``scancel`` or the time limit, and the deepspeed
    launcher signals a rank's children too. PyTorch's workers die on a SIGTERM that is not their parent's, and
    the rank then fails at once ("DataLoader worker ... is killed by signal: Terminated") instead of reaching
    the step boundary where ``StopRequest`` checkpoints. Here SIGTERM is blocked in the worker and a daemon thread
    takes it: from the parent (multiprocessing's shutdown of daemon workers) it exits the worker; from anyone else
    it is dropped, and the worker keeps serving the rank until the rank stops it.
    """
    import threading

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == os.getppid():
                os._exit(0)

    threading.Thread(target=take_sigterm, name=f"sigterm-guard-{worker_id}", daemon=True).start()


def free_port() -> int:
    """A TCP port that is free on this host right now (single-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query_node_addr(host: str, timeout_s: float = 30.0) -> str | None:
    """``NodeAddr`` of a SLURM node via ``scontrol show node -o HOST`` (argv list, no shell); None if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True,
                             timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_node_addr(out.stdout) if out.returncode == 0 else None


def slurm_master_addr(environ: Mapping[str, str], node_addr: Callable[[str], str | None] | None = None) -> str:
    """Address of the first node of this step (or job): its ``NodeAddr`` (``node_addr``, default
    ``query_node_addr``), else its name."""
    node_addr = node_addr or query_node_addr
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get(
        "SLURM_NODELIST", "")
    hosts = expand_nodelist(nodelist)
    if not hosts:
        return environ.get("SLURMD_NODENAME") or socket.gethostname()
    return node_addr(hosts[0]) or hosts[0]


# ----------------------------------------------------------------------------------------------------------------
# Rank discovery


def resolve_dist_env(environ: Mapping[str, str], node_addr: Callable[[str], str | None] | None = None,
                     port: Callable[[], int] | None = None) -> tuple[DistEnv, dict[str, str]]:
    """Decide this process's rank and the environment variables to set; reads but never writes ``environ``.

    Args:
        environ: the environment to read.
        node_addr: host name -> NodeAddr (default ``query_node_addr``, which runs scontrol).
        port: a free port for single-process runs (default ``free_port``).

    Returns:
        The ``DistEnv`` and the variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that
        ``torch.distributed``'s env:// rendezvous needs and that are not already set.
    """
    if environ.get("RANK") not in (None, ""):
        env = DistEnv(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK", default=0),
                      world_size=_int(environ, "WORLD_SIZE", default=1), source="launcher",
                      master_addr=environ.get("MASTER_ADDR", ""), master_port=_int(environ, "MASTER_PORT", default=0))
        return env, {}
    if _is_slurm_task(environ):
        world = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or "1"
        addr = environ.get("MASTER_ADDR") or slurm_master_addr(environ, node_addr)
        master_port = environ.get("MASTER_PORT") or str(job_port(environ.get("SLURM_JOB_ID", "0")))
        env = DistEnv(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID", default=0),
                      world_size=int(world), source="slurm", master_addr=addr, master_port=int(master_port))
    else:
        addr = environ.get("MASTER_ADDR") or "127.0.0.1"
        master_port = environ.get("MASTER_PORT") or str((port or free_port)())
        env = DistEnv(rank=0, local_rank=0, world_size=1, source="single", master_addr=addr,
                      master_port=int(master_port))
    updates = {"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.world_size),
               "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port)}
    return env, {k: v for k, v in updates.items() if environ.get(k) != v}


def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    """A task of an ``srun`` step. The batch shell itself also has SLURM_PROCID=0 but no step id: a plain
    ``python launch.py`` in a batch script is one process, not rank 0 of SLURM_NTASKS."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    return bool(environ.get("SLURM_PROCID")) and step not in ("", "batch", "extern", "4294967294")


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key, "")
    if value == "" and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def setup_dist_env(environ: MutableMapping[str, str] | None = None) -> DistEnv:
    """Discover rank/world and write what ``torch.distributed`` (env://) needs into ``environ``.

    Args:
        environ: the environment to read and update; ``os.environ`` by default.
    """
    environ = os.environ if environ is None else environ
    env, updates = resolve_dist_env(environ)
    environ.update(updates)
    return env


def dist_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """Process-group timeout: a collective that waits longer (a rank died or hung) raises instead of hanging.

    Read from ``HD_DIST_TIMEOUT_S`` (seconds), default 600. The same limit ends a job whose rank stopped answering
    (``runtime.watchdog``).

    Raises:
        ConfigError: the variable is not a positive number (``train.main`` checks it before the start-up).
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(DIST_TIMEOUT_ENV, "") or str(DEFAULT_DIST_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{DIST_TIMEOUT_ENV}={raw!r} must be a positive number of seconds (default "
                          f"{DEFAULT_DIST_TIMEOUT_S:.0f})")
    return timedelta(seconds=seconds)


# ----------------------------------------------------------------------------------------------------------------
# Preemption


class Stopped(Exception):
    """Raised where a stop request ends work that cannot wait for a step boundary (a universal conversion):
    nothing was lost, the job exits ``EXIT_REQUEUE``."""


_HELD: list[int] = []  # stop signals received before StopRequest.install (see hold_stop_signals)


def hold_stop_signals(received: Iterable[int] = (),
                      signals: Iterable[signal.Signals] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Record SIGUSR1/SIGTERM from the first lines of an entry point until ``StopRequest.install`` takes them over.

    ``launch.py`` installs a list-appending handler as its first statement (before any import but ``signal``) and
    hands the signals it got to this function, so a preemption signal while Python imports the trainer is a stop
    request, not a kill. Only the interpreter's own start (about 0.1 s) is uncovered.

    Args:
        received: signal numbers already received by the entry point's own early handler.
        signals: the signals to hold.
    """
    _HELD.extend(received)
    for sig in signals:
        signal.signal(sig, lambda signum, frame: _HELD.append(signum))


class StopRequest:
    """A stop request, agreed on by all ranks: SLURM's SIGUSR1/SIGTERM, a stop file, or the DeepSpeed launcher gone.

    The signal handlers only set a flag (no I/O but one ``os.write`` to stderr); ``should_stop`` polls the stop
    files and the launcher and, when ``torch.distributed`` is initialised, MAX-reduces the local request code over
    the default group so that every rank stops at the same step. Once agreed, the answer stays True and rank 0
    (a) deletes the stop files (a stop file is a one-shot request: the resumed run must not stop at once) and
    (b) writes the reason to ``stopped_file``: the sbatch scripts requeue a job whose training step failed
    after an agreed stop even when srun reports a task killed during shutdown (137/143) instead of 75.

    The DeepSpeed launcher (``deepspeed``, i.e. ``deepspeed.launcher.runner``) forwards no signal on one node: a
    SIGTERM kills it at once and leaves its ranks running. So a rank started by it watches the launcher processes
    above it (``deepspeed.launcher.launch`` and the runner) and treats their exit as a stop request.

    Args:
        stop_file: a path whose existence requests a stop (e.g. ``<run_dir>/STOP``). ``$HD_STOP_FILE`` (set by
            the launcher scripts; the deepspeed-launcher variant's batch shell creates it on SIGUSR1) is polled
            as well. Both must be on a file system every rank sees.
        stopped_file: written by rank 0 once all ranks agreed to stop (default: ``$HD_STOPPED_FILE``).
        signals: the signals to handle.
    """

    DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file: str | os.PathLike[str] | None = None,
                 signals: Iterable[signal.Signals] = DEFAULT_SIGNALS,
                 stopped_file: str | os.PathLike[str] | None = None) -> None:
        self.stop_files: tuple[Path, ...] = ()
        self.add_stop_file(stop_file)
        self.add_stop_file(os.environ.get(STOP_FILE_ENV))
        self.stopped_file = _optional_path(stopped_file, STOPPED_FILE_ENV)
        self.signals = tuple(signals)
        self._seen_file: Path | None = None
        self._gone: str | None = None
        self._local_code = 0
        self._agreed_code = 0
        self._launchers = launcher_processes()

    def install(self) -> StopRequest:
        """Install the signal handlers (main thread only), taking over signals held since ``hold_stop_signals``."""
        for sig in self.signals:
            signal.signal(sig, self._handle)
        while _HELD:
            self._handle(_HELD.pop(0), None)
        return self

    def add_stop_file(self, path: str | os.PathLike[str] | None) -> None:
        """Poll ``path`` too (once the run directory is known)."""
        if path is not None and str(path):
            self.stop_files = tuple(dict.fromkeys((*self.stop_files, Path(path))))

    def _handle(self, signum: int, frame: Any) -> None:
        self._local_code = max(self._local_code, _SIGNAL_CODE_BASE + signum)
        name = signal.Signals(signum).name
        os.write(2, f"[hybrid_distill] pid {os.getpid()} received {name}: checkpoint and stop at the next "
                    "step boundary\n".encode())

    def local_requested(self) -> bool:
        """Whether this process received a signal, sees a stop file or lost its launcher (no collective)."""
        if self._local_code < _LAUNCHER_CODE:
            self._gone = next((what for pid, start, what in self._launchers if not _alive(pid, start)), None)
            if self._gone is not None:
                self._local_code = _LAUNCHER_CODE
        if self._local_code == 0:
            self._seen_file = next((path for path in self.stop_files if path.exists()), None)
            self._local_code = _FILE_CODE if self._seen_file is not None else 0
        return self._local_code > 0

    def should_stop(self, device: Any = None) -> bool:
        """True on every rank once any rank has a request; call it on all ranks at each step boundary.

        Args:
            device: where the one-element tensor for the all_reduce lives (the engine's device: a CUDA
                device under NCCL, ``"cpu"`` under gloo). Default: cpu.
        """
        if self._agreed_code:
            return True
        self.local_requested()
        self._agreed_code = _all_reduce_max(self._local_code, device)
        if self._agreed_code and _global_rank() == 0:
            self._acknowledge()
        return self._agreed_code > 0

    def _acknowledge(self) -> None:
        """Rank 0, once agreed: consume the stop files, leave the marker for the sbatch scripts."""
        self.discard_stop_files()
        if self.stopped_file is not None:
            self.stopped_file.write_text(f"{self.reason}\n")

    def discard_stop_files(self) -> list[Path]:
        """Delete the stop files (rank 0: once the ranks agreed, and when the job ends); returns those removed.

        A stop file touched after the last step (or while the job fails) would otherwise stop the next job at once.
        """
        removed = [path for path in self.stop_files if path.exists()]
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    @property
    def reason(self) -> str | None:
        """Why the run is stopping (for logs), or None."""
        code = self._agreed_code or self._local_code
        if not code:
            return None
        if code >= _SIGNAL_CODE_BASE:
            what = f"signal {signal.Signals(code - _SIGNAL_CODE_BASE).name}"
        elif code == _LAUNCHER_CODE:
            what = f"{self._gone} exited" if self._gone else "the DeepSpeed launcher exited"
        else:
            what = f"stop file {self._seen_file}" if self._seen_file else "stop requested"
        return what if code == self._local_code else f"{what} (received by another rank)"


def launcher_processes(pid: int | None = None) -> list[tuple[int, int, str]]:
    """``(pid, start time, description)`` of the DeepSpeed launcher processes above process ``pid`` (default: this
    one): ``deepspeed.launcher.launch`` (its parent) and the runner above that; empty when not started by it."""
    parent = _ppid(pid or os.getpid())
    if parent is None or "deepspeed.launcher.launch" not in _cmdline(parent):
        return []
    found = [(parent, process_start_time(parent), f"the DeepSpeed per-node launcher (pid {parent})")]
    runner = _ppid(parent)
    if runner is not None and runner > 1 and "deepspeed" in _cmdline(runner):
        found.append((runner, process_start_time(runner), f"the deepspeed launcher (pid {runner})"))
    return [(p, start, what) for p, start, what in found if start is not None]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (field 3, the state, first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _ppid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields else None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (tells a process from a later one with the same pid), or
    None when there is no such process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _alive(pid: int, start: int) -> bool:
    """``pid`` still runs (not a zombie) and is the same process that had start time ``start``."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == start


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _optional_path(value: str | os.PathLike[str] | None, env_key: str) -> Path | None:
    """``value``, else the path in ``$env_key``; None when both are empty."""
    path = value if value is not None else os.environ.get(env_key, "")
    return Path(path) if str(path) else None


def _distributed() -> Any:
    """``runtime.distributed`` once torch is loaded, else None: the batch-script CLI of this module never imports
    torch, and no process group exists before torch is imported."""
    if "torch" not in sys.modules:
        return None
    from hybrid_distill.runtime import distributed

    return distributed


def _global_rank() -> int:
    d = _distributed()
    return d.rank() if d is not None and d.initialized() else int(os.environ.get("RANK", "0") or 0)


def _all_reduce_max(value: int, device: Any) -> int:
    """MAX of ``value`` over the default process group, or ``value`` itself when not distributed."""
    d = _distributed()
    return value if d is None else d.all_reduce_max(value, device)


# ----------------------------------------------------------------------------------------------------------------
# CLI for the sbatch scripts


def write_hostfile(hosts: Iterable[str], slots: int, out: Path) -> None:
    """A DeepSpeed hostfile: one ``host slots=N`` line per node."""
    out.write_text("".join(f"{host} slots={slots}\n" for host in hosts))


def main(argv: list[str] | None = None) -> int:
    """``master-addr`` / ``master-port``: print this job's rendezvous address / port; ``hostfile``: write the
    DeepSpeed hostfile."""
    parser = argparse.ArgumentParser(prog="python -m hybrid_distill.runtime.cluster", description=main.__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("master-addr", help="NodeAddr of the job's first node (else its name)")
    sub.add_parser("master-port", help="the job's rendezvous port (from SLURM_JOB_ID)")
    host = sub.add_parser("hostfile", help="DeepSpeed hostfile from SLURM_JOB_NODELIST")
    host.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    host.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "master-addr":
        print(slurm_master_addr(os.environ))
        return 0
    if args.cmd == "master-port":
        print(job_port(os.environ.get("SLURM_JOB_ID", "0")))
        return 0
    hosts = expand_nodelist(os.environ.get("SLURM_JOB_NODELIST", "")) or [socket.gethostname()]
    write_hostfile(hosts, args.slots, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
