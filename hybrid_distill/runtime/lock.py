"""One live job per run directory: ``<run_dir>/LOCK``, safe on shared file systems (NFS, Lustre, GPFS).

Two jobs writing one run directory corrupt each other (checkpoints replaced mid-save, metrics rows lost), so
global rank 0 of every job takes the lock before anything is written, and a second live job is refused (exit 2)
with the holder named. The rule, in full:

* **Taking it**: ``LOCK`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFSv3+,
  Lustre and GPFS; ``flock`` is not reliable across nodes) and holds the holder as JSON: host, pid, process start
  time, SLURM job id and restart count, command line, time taken.
* **Heartbeat**: the holder touches ``LOCK`` every ``HEARTBEAT_S`` (30) seconds from a daemon thread, during the
  whole job (start-up, saves and conversions included).
* **Stale** (taken over, with a warning naming the old holder) when any of these holds:

  1. the holder ran on this host and its pid is gone (or is another process: start times differ);
  2. the holder is an earlier run of this same SLURM job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``):
     SLURM never runs two of them at once, and a requeued job must not wait for its killed predecessor;
  3. its heartbeat is older than ``HD_LOCK_STALE_S`` (default 300) seconds, measured with the file system's own
     clock (the mtime of a file touched just now beside it), so clock skew between nodes does not matter.

  Otherwise the lock is live and the job exits 2 naming the holder. Taking over a stale lock happens under a
  second, short-lived ``LOCK.takeover`` file (also ``O_EXCL``), so two jobs cannot both replace one stale lock.
* **Released** when the job ends (any exit code, also after a stop request or a watchdog exit); a job killed with
  SIGKILL leaves it behind, and rules 1-3 then let the next job take it.

The lock names no rank but rank 0 (the only process that calls ``acquire``), and imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hybrid_distill.errors import ConfigError
from hybrid_distill.runtime.cluster import process_start_time as _start_time

log = logging.getLogger("hybrid_distill.lock")

LOCK_NAME = "LOCK"
HEARTBEAT_S = 30.0
STALE_ENV = "HD_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
TAKEOVER_STALE_S = 60.0  # a LOCK.takeover older than this was left by a process that died while taking over


def stale_after(environ: dict[str, str] | os._Environ = os.environ) -> float:
    """Seconds without heartbeat after which a lock is stale (``HD_LOCK_STALE_S``, default 300)."""
    raw = environ.get(STALE_ENV, "") or str(DEFAULT_STALE_S)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 2 * HEARTBEAT_S or value == float("inf"):
        raise ConfigError(f"{STALE_ENV}={raw!r} must be a number of seconds > {2 * HEARTBEAT_S:.0f} (twice the "
                          "lock heartbeat)")
    return value


def this_holder() -> dict[str, Any]:
    """What the lock file records about the process taking it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid),
            "job": os.environ.get("SLURM_JOB_ID", ""), "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "command": " ".join(sys.argv)[:500], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict[str, Any]) -> str:
    """``host gpu017, pid 4242, SLURM job 123 (restart 0), since 2026-12-01T10:00:00+0000``."""
    job = f", SLURM job {holder['job']} (restart {holder.get('restart', 0)})" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('since')}"


class RunLock:
    """The lock of one run directory (rank 0 only).

    Args:
        run_dir: the run directory (created if missing).
        stale_s: heartbeat age after which a lock is stale (default: ``stale_after()``).
        heartbeat_s: seconds between heartbeats.
    """

    def __init__(self, run_dir: str | Path, stale_s: float | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stale_s = stale_after() if stale_s is None else stale_s
        self.heartbeat_s = heartbeat_s
        self.holder = this_holder()
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock (or a stale one) and start the heartbeat; returns self.

        Raises:
            ConfigError: another live job holds it (its host, pid and SLURM job are named).
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            if self._create():
                break
            current = self._read()
            if current is None:  # vanished (released) or being written right now: try again
                time.sleep(0.2)
                continue
            why = self.stale_reason(current)
            if why is None:
                raise ConfigError(f"run directory {str(self.run_dir)!r} is in use by another job "
                                  f"({describe(current)}); wait for it to end, stop it (touch "
                                  f"{self.run_dir / 'STOP'}), or use another --output-dir. If that job is gone, delete "
                                  f"{self.path}")
            self._take_over(current, why)
        else:
            raise ConfigError(f"could not take the lock {self.path} (another job keeps taking it); retry")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (safe to call twice)."""
        self._stop.set()
        if self._held and self.still_ours():
            self.path.unlink(missing_ok=True)
        self._held = False

    def still_ours(self) -> bool:
        """Whether ``LOCK`` still names this process."""
        current = self._read()
        return current is not None and (current.get("host"), current.get("pid"), current.get("start")) == (
            self.holder["host"], self.holder["pid"], self.holder["start"])

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the lock of ``holder`` is stale (rules 1-3 of the module docstring), or None when it is live."""
        if holder.get("host") == self.holder["host"]:
            pid, start = holder.get("pid"), holder.get("start")
            now = _start_time(pid) if isinstance(pid, int) else None
            if now is None or (start is not None and now != start):
                return f"its process {pid} on this host is gone"
        job = holder.get("job")
        if job and job == self.holder["job"] and int(holder.get("restart") or 0) < self.holder["restart"]:
            return f"it is an earlier run (restart {holder.get('restart')}) of this SLURM job {job}"
        age = self._age(self.path)
        if age is not None and age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (> {STALE_ENV}={self.stale_s:.0f})"
        return None

    # -- internals -----------------------------------------------------------------------------------------------

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.holder) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # e.g. a full disk: leave no empty lock behind
            self.path.unlink(missing_ok=True)
            raise
        self._held = True
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
            data = json.loads(text)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # empty (being written: look again) or foreign content (judged by its age)
            return None if not text.strip() else {"host": None, "pid": None}
            return {"host": None, "pid": None}
        return data if isinstance(data, dict) else {"host": None, "pid": None}

    def _take_over(self, old: dict[str, Any], why: str) -> None:
        """Remove a stale lock under ``LOCK.takeover``, if it is still the one judged stale."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            age = self._age(guard)
            if age is not None and age > TAKEOVER_STALE_S:
                guard.unlink(missing_ok=True)
            time.sleep(0.5)
            return
        os.close(fd)
        try:
            if self._read() == old:
                log.warning("taking over the stale lock of %s: %s (%s)", self.run_dir, why, describe(old))
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _age(self, path: Path) -> float | None:
        """Seconds since ``path`` was modified, by the file system's clock (None if it is gone)."""
        probe = self.run_dir / f".lock-clock-{self.holder['host']}-{self.holder['pid']}"
        try:
            probe.touch()
            now = probe.stat().st_mtime
            return now - path.stat().st_mtime
        except OSError:  # gone, or no room even for an empty file
            return None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.still_ours():
                    log.error("the lock %s no longer names this job (%s): another job took it over; two jobs may "
                              "now write %s", self.path, describe(self._read() or {}), self.run_dir)
                    return
                os.utime(self.path)
            except OSError as e:  # a full or flaky file system: the next beat retries
                log.warning("could not refresh the lock %s: %s", self.path, e)


