"""Which rank stopped answering: per-rank heartbeat files, and a watchdog that ends the job naming it.

A rank that is stopped (``kill -STOP``, a frozen node, a process stuck in the kernel) blocks every other rank in
its next collective. The process-group timeout (``HD_DIST_TIMEOUT_S``) then fails them, but does not say who
is to blame, and the launchers wait another 30 s for the stopped process before killing it. So every rank runs a
daemon thread that writes ``<run_dir>/heartbeat/rank_NNNNN.json`` (host, pid, start time, last step) every
``interval`` seconds; rank 0 watches every rank's file and the other ranks watch rank 0's. When a watched file is
older than ``HD_DIST_TIMEOUT_S`` (measured with the file system's own clock: the age relative to the watcher's own
file, just written), the watcher logs one line naming the rank, its host, pid and last step, kills it with
SIGKILL (a moment later, from a detached helper) when it runs on the same host, so its launcher has nothing to
wait for, and ends its own process with
``EXIT_PEER_LOST``. A collective that fails first (its timeout, or a peer's connection closing) is reported the
same way by ``Watchdog.blame``.

A watcher that was itself stopped (its own previous beat is long ago, e.g. the whole job was suspended) skips one
round, so a job resumed after ``scontrol suspend`` is not killed for it. Files of an earlier job in the same run
directory carry another token and are ignored. Each rank deletes its file when it ends normally.

Load on a shared file system: one small file replaced per rank and interval (``interval`` = ``HD_DIST_TIMEOUT_S``
/ 10, between 1 and 30 s), and rank 0 reads one file per rank per interval.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybrid_distill.runtime.cluster import EXIT_PEER_LOST, process_start_time

log = logging.getLogger("hybrid_distill.watchdog")

HEARTBEAT_DIR = "heartbeat"
BEFORE_EXIT: list[Callable[[], None]] = []
KILL_DELAY_S = 2.0  # DeepSpeed's per-node launcher polls its ranks every second
# The detached helper that kills a stopped rank (argv: pid, its start time, delay), checking it is the same process.
_KILL_LATER = """
import os, signal, sys, time
pid, start, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
time.sleep(delay)
try:
    if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == start:
        os.kill(pid, signal.SIGKILL)
except (OSError, IndexError):
    pass
"""  # run before the watchdog ends the process (the run lock's release)


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between beats: a tenth of the timeout, between 1 and 30 s."""
    return min(30.0, max(1.0, timeout_s / 10))


class Watchdog:
    """This rank's heartbeat and its watch on the others.

    Args:
        run_dir: the run directory (shared by all ranks).
        rank: this process's global rank.
        world_size: number of ranks.
        timeout_s: a watched rank whose heartbeat is older than this is lost.
        token: the same string on every rank of this job (ignores files of earlier jobs).
        on_lost: called with the one-line message when a rank is lost; must end the process (default: log and
            ``os._exit(EXIT_PEER_LOST)``).
    """

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_s: float, token: str,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world_size, self.timeout_s, self.token = rank, world_size, timeout_s, token
        self.interval = heartbeat_interval(timeout_s)
        self.on_lost = on_lost or _exit_lost
        self.step = 0
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._seen: set[int] = set()

    def path(self, rank: int) -> Path:
        """The heartbeat file of ``rank``."""
        return self.dir / f"rank_{rank:05d}.json"

    def start(self) -> Watchdog:
        """Write the first beat and start the thread; returns self."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rank-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop the thread; delete this rank's file (a normal end)."""
        self._stop.set()
        if remove:
            with contextlib.suppress(OSError):
                self.path(self.rank).unlink()

    def watched(self) -> list[int]:
        """Rank 0 watches every other rank; the others watch rank 0."""
        return [r for r in range(self.world_size) if r != 0] if self.rank == 0 else [0]

    def lost(self, older_than: float | None = None) -> list[tuple[int, dict[str, Any], float]]:
        """``(rank, heartbeat, age)`` of the watched ranks whose heartbeat is older than ``older_than`` seconds
        (default: the timeout), whose process on this host is gone, or that never wrote one that long after this
        watchdog started. A file that was seen and is gone belongs to a rank that ended normally."""
        limit = self.timeout_s if older_than is None else older_than
        now = self._fs_now()
        if now is None:
            return []
        found = []
        for rank in self.watched():
            beat, mtime = self._read(rank)
            if beat is None:
                waited = time.monotonic() - self._started
                if rank not in self._seen and waited > limit:
                    found.append((rank, {"rank": rank}, waited))
                continue
            self._seen.add(rank)
            if now - mtime > limit or not _same_process_alive(beat, self.host):
                found.append((rank, beat, now - mtime))
        return found

    def blame(self, error: BaseException | None = None) -> str | None:
        """After a failed collective: the line naming the rank that stopped answering, or None if none did."""
        lost = self.lost(older_than=2 * self.interval)
        if not lost:
            return None
        return self._message(lost, error)

    # -- internals -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except OSError as e:
                log.warning("rank %d: could not write its heartbeat %s: %s", self.rank, self.path(self.rank), e)
            gap, last = time.monotonic() - last, time.monotonic()
            if gap > 3 * self.interval:  # this process was stopped itself: give the others one beat to catch up
                continue
            lost = self.lost()
            if lost:
                self.on_lost(self._message(lost, None))
                return

    def _message(self, lost: list[tuple[int, dict[str, Any], float]], error: BaseException | None) -> str:
        parts = []
        for rank, beat, age in lost:
            if "host" not in beat:
                parts.append(f"rank {rank} never answered: no heartbeat file {age:.0f} s after the start")
                continue
            alive = _same_process_alive(beat, self.host)
            state = f"stopped answering: no heartbeat for {age:.0f} s" if alive else "is gone"
            parts.append(f"rank {rank} on host {beat['host']} (pid {beat.get('pid')}) {state} (its last heartbeat "
                         f"was at step {beat.get('step', '?')})")
            self._kill_if_local(beat)
        cause = f"; a collective failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else ""
        return (f"{'; '.join(parts)} (HD_DIST_TIMEOUT_S={self.timeout_s:.0f}){cause}. Ending the job (exit "
                f"{EXIT_PEER_LOST}); check that node, then resume with --resume auto")

    def _kill_if_local(self, beat: dict[str, Any]) -> None:
        """SIGKILL a lost rank on this host a moment after this process has exited (a stopped process keeps its
        launcher waiting 30 s, and its GPU memory). The delay lets the launcher see this rank's exit code first."""
        if beat.get("host") == self.host and _same_process_alive(beat, self.host):
            pid, start = int(beat["pid"]), beat.get("start")
            with contextlib.suppress(OSError):
                subprocess.Popen([sys.executable, "-c", _KILL_LATER, str(pid), str(start), str(KILL_DELAY_S)],
                                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
                log.error("rank %s (pid %s) on this host will be killed in %.0f s", beat.get("rank"), pid,
                          KILL_DELAY_S)

    def _write(self) -> None:
        beat = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "start": process_start_time(os.getpid()),
                "step": self.step, "token": self.token}
        path = self.path(self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, path)

    def _read(self, rank: int) -> tuple[dict[str, Any] | None, float]:
        path = self.path(rank)
        try:
            mtime = path.stat().st_mtime
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            return None, 0.0
        return (beat, mtime) if isinstance(beat, dict) and beat.get("token") == self.token else (None, 0.0)

    def _fs_now(self) -> float | None:
        """The file system's time: the mtime of this rank's own heartbeat, written at most one interval ago."""
        try:
            return self.path(self.rank).stat().st_mtime
        except OSError:
            return None


def _same_process_alive(beat: dict[str, Any], host: str) -> bool:
    """False only when the beat is from this host and its process is gone (True when it cannot be told)."""
    if beat.get("host") != host or not isinstance(beat.get("pid"), int):
        return True
    start = process_start_time(beat["pid"])
    return start is not None and start == beat.get("start")


def _exit_lost(message: str) -> None:
    log.error("error: %s", message)
    for action in BEFORE_EXIT:
        with contextlib.suppress(Exception):
            action()
    for handler in logging.getLogger("hybrid_distill").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_PEER_LOST)
