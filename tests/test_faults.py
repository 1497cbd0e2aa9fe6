"""Fault injection on the real trainer (real DeepSpeed on CPU, real signals, real files): a run loses at most the
steps since its last checkpoint, never a checkpoint, and exits with the code the launchers act on.

Exit codes: 0 done, 2 bad input, 3 non-finite, 65 bad data, 69 a rank stopped answering, 74 disk full, 75 stopped
on request (resume with --resume auto). The SLURM launchers' part is in tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultlib import REPO, TINY, Job, alive, checkpoints, metrics, processes, run, steps

pytestmark = pytest.mark.slow


def _tree(out: Path) -> list[int]:
    """Processes of a job on ``out`` still running (their command line names the run directory)."""
    return [pid for pid, cmd in processes() if str(out) in cmd and alive(pid)]


def _ok(code: int, log: str, want: int = 0) -> None:
    assert code == want, f"exit {code} (want {want}):\n{log[-5000:]}"


# ----------------------------------------------------------------------------------------------------------------
# 1. non-finite losses: nothing saved, nothing pruned


def test_non_finite_exit_saves_nothing_and_the_good_checkpoint_resumes(tmp_path):
    """The issue's reproduction: exit 3 used to save step 5 with |w| = 6e29 as the newest complete checkpoint and
    prune the good step 4, so a resume with a sane lr looped into exit 3."""
    out = tmp_path / "run"
    _ok(*run(out, *TINY, "run.ckpt_every=2", "run.keep_last=1", "run.max_steps=4"))
    code, log = run(out, *TINY, "run.ckpt_every=2", "run.keep_last=1", "optim.lr=1e30", "run.max_steps=8")
    _ok(code, log, 3)
    assert checkpoints(out) == ["step_00000004"]  # kept, and still the newest
    assert not any((out / "checkpoints").glob("step_00000005*"))
    assert "not saved" in log and "the newest checkpoint is step_00000004" in log
    code, log = run(out, *TINY, "run.ckpt_every=2", "run.keep_last=1", "run.max_steps=6")
    _ok(code, log)
    assert "resumed from" in log and "at step 4" in log
    assert steps(out) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------------------------
# 2. SIGTERM to the DeepSpeed launcher / to launchers/single_node.sh


def test_sigterm_to_the_deepspeed_launcher_checkpoints_every_rank_and_leaves_no_orphans(tmp_path):
    """DeepSpeed's runner forwards no signal on one node: it used to exit -15 in 0.4 s while its ranks trained on
    unattended. Now the ranks notice it is gone, agree, checkpoint and exit 75."""
    out = tmp_path / "run"
    job = Job(out, *TINY, "run.max_steps=400", procs=2)
    job.wait_for_steps(2)
    ranks = [job.rank_pid(0), job.rank_pid(1)]
    job.proc.send_signal(signal.SIGTERM)
    job.wait(60)
    deadline = time.monotonic() + 120
    while _tree(out) and time.monotonic() < deadline:  # the ranks and DeepSpeed's per-node launcher
        time.sleep(0.2)
    assert not _tree(out) and not any(alive(p) for p in ranks), f"orphans {_tree(out)}\n{job.log()[-3000:]}"
    log = job.log()
    last = steps(out)[-1]
    assert f"stopping at step {last} (the deepspeed launcher (pid {job.proc.pid}) exited)" in log, log[-3000:]
    assert "exits with return code = 75" in log  # what the per-node launcher reports for its ranks
    assert checkpoints(out)[-1] == f"step_{last:08d}"
    code, log = run(out, *TINY, f"run.max_steps={last + 2}", procs=2)
    _ok(code, log)
    assert steps(out) == list(range(1, last + 3))


def test_kill_of_single_node_sh_checkpoints_and_exits_75(tmp_path):
    out = tmp_path / "run"
    job = Job(out, *TINY, "run.max_steps=400", procs=2, script="single_node")
    job.wait_for_steps(2)
    ranks = [job.rank_pid(0), job.rank_pid(1)]
    job.proc.send_signal(signal.SIGTERM)  # what `kill <pid>` sends
    code = job.wait(120)
    log = job.log()
    _ok(code, log, 75)
    assert "single_node.sh received SIGTERM" in log
    assert not any(alive(p) for p in ranks)
    assert checkpoints(out)[-1] == f"step_{steps(out)[-1]:08d}"


# ----------------------------------------------------------------------------------------------------------------
# 3. one job per run directory; a fresh start into a used one only on purpose


def test_a_second_job_on_a_live_run_directory_is_refused_naming_the_holder(tmp_path):
    """Two jobs 3 s apart on one --output-dir: one crashed in the other's save and 7 of 10 metric rows were lost."""
    out = tmp_path / "run"
    first = Job(out, *TINY, "run.max_steps=400")
    first.wait_for_steps(1)
    code, log = run(out, *TINY, "run.max_steps=400")
    _ok(code, log, 2)
    holder = json.loads((out / "LOCK").read_text())
    assert holder["pid"] == first.proc.pid
    assert f"is in use by another job (host {socket.gethostname()}, pid {first.proc.pid}" in log
    assert "Traceback" not in log
    (out / "STOP").touch()
    _ok(first.wait(120), first.log(), 75)
    assert not (out / "LOCK").exists() and not (out / "STOP").exists()
    rows = steps(out)
    assert rows == list(range(1, rows[-1] + 1))  # nothing lost or duplicated by the refused job


def test_a_killed_jobs_lock_is_taken_over_by_the_next_job(tmp_path):
    out = tmp_path / "run"
    first = Job(out, *TINY, "run.max_steps=400", "run.ckpt_every=2")
    first.wait_for_steps(3)
    first.proc.kill()
    first.wait(30)
    assert (out / "LOCK").exists()  # SIGKILL releases nothing
    code, log = run(out, *TINY, "run.max_steps=6", "run.ckpt_every=2")
    _ok(code, log)
    assert "taking over the stale lock" in log and "is gone" in log


@pytest.fixture(scope="module")
def used_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("used") / "run"
    _ok(*run(out, *TINY, "run.max_steps=4", "run.ckpt_every=2", "run.export_at_end=false"))
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


def test_a_fresh_run_into_a_used_directory_is_refused_unless_asked(used_run, tmp_path):
    """`--resume none` into a directory with checkpoints overwrote step 4, cut metrics.jsonl and left a newer stale
    checkpoint for the next `auto`."""
    out = _copy(used_run, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    code, log = run(out, *TINY, "run.max_steps=2", "--resume", "none")
    _ok(code, log, 2)
    assert "already holds a run (checkpoints step_00000002, step_00000004; 4 rows of metrics.jsonl)" in log
    assert "--overwrite" in log and (out / "metrics.jsonl").read_text() == before
    code, log = run(out, *TINY, "run.max_steps=2", "--resume", "none", "--overwrite")
    _ok(code, log)
    assert steps(out) == [1, 2] and checkpoints(out) == ["step_00000002"]


def test_resume_auto_with_metrics_but_no_checkpoint_is_refused_unless_requeued(used_run, tmp_path):
    out = _copy(used_run, tmp_path)
    shutil.rmtree(out / "checkpoints")
    code, log = run(out, *TINY, "run.max_steps=2")
    _ok(code, log, 2)
    assert "4 rows of metrics.jsonl" in log and "no complete checkpoint to resume" in log
    # a requeued job whose first run died before its first checkpoint: its own rows, it starts over
    code, log = run(out, *TINY, "run.max_steps=2", extra_env={"SLURM_RESTART_COUNT": "1"})
    _ok(code, log)
    assert "ended before its first checkpoint; starting over" in log and steps(out) == [1, 2]


def test_a_requeued_job_applies_resume_none_to_its_first_run_only(used_run, tmp_path):
    """A requeue re-runs the command line: `--resume none --overwrite` must not wipe what the first run trained."""
    out = _copy(used_run, tmp_path)
    code, log = run(out, *TINY, "run.max_steps=6", "run.ckpt_every=2", "--resume", "none", "--overwrite",
                    extra_env={"SLURM_RESTART_COUNT": "1"})
    _ok(code, log)
    assert "resuming with --resume auto" in log and steps(out) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------------------------------
# 4. signals during the start-up and during the universal conversion


# The online evaluation of a fresh run starts with step 0; a stop requested before it must skip it, or its rows
# (and the minutes it takes) would make the next job's --resume auto refuse a directory with metrics but no checkpoint.
EVAL = ["eval.train_source=synthetic", "eval.val_source=synthetic", "eval.train_samples=16", "eval.val_samples=8",
        "eval.batch_size=8", "eval.num_workers=0", "eval.attention_images=2"]


@pytest.mark.parametrize("delay, extra", [(0.5, []), (3.0, EVAL)], ids=["imports", "start_up_with_eval"])
def test_a_signal_during_the_start_up_exits_75_and_the_next_job_starts(tmp_path, delay, extra):
    """SIGTERM/USR1 in the first seconds (imports, teachers, engine) used to kill the process (-15/-10)."""
    out = tmp_path / "run"
    job = Job(out, *TINY, "run.max_steps=2", *extra)
    time.sleep(delay)
    job.proc.send_signal(signal.SIGTERM if delay < 1 else signal.SIGUSR1)
    code = job.wait(120)
    _ok(code, job.log(), 75)
    assert steps(out) == [] and checkpoints(out) == []
    _ok(*run(out, *TINY, "run.max_steps=2"))  # nothing was used: the next job starts (and is not refused)


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory) -> Path:
    """A run directory whose newest checkpoint (step 2) was saved by 2 processes."""
    out = tmp_path_factory.mktemp("two") / "run"
    code, log = run(out, *TINY, "run.max_steps=6", "run.stop_after_steps=2", "run.export_at_end=false", procs=2)
    _ok(code, log, 75)
    return out


def test_preemption_during_the_universal_conversion_exits_75_and_the_next_job_converts(two_rank_checkpoint,
                                                                                      tmp_path):
    """A preemption signal reaches the converter too (SLURM signals every process of the step): it used to make the
    conversion fail with exit 2, which is not requeued."""
    out = _copy(two_rank_checkpoint, tmp_path)
    tmp = out / "checkpoints" / "step_00000002_universal.tmp"
    job = Job(out, *TINY, "run.max_steps=4", "run.export_at_end=false")
    deadline = time.monotonic() + 120
    while not tmp.exists() and time.monotonic() < deadline and job.proc.poll() is None:
        time.sleep(0.05)
    assert tmp.exists(), job.log()[-3000:]
    converter = [pid for pid, cmd in processes() if "ds_to_universal" in cmd and str(out) in cmd]
    for pid in [job.proc.pid, *converter]:  # as SLURM does: every process of the step
        os.kill(pid, signal.SIGUSR1)
    code = job.wait(120)
    _ok(code, job.log(), 75)
    assert "stop requested during the universal conversion" in job.log()
    assert not tmp.exists() and not (out / "checkpoints" / "step_00000002_universal").exists()
    code, log = run(out, *TINY, "run.max_steps=4", "run.export_at_end=false")
    _ok(code, log)
    assert steps(out) == [1, 2, 3, 4]
    pointer = (out / "checkpoints" / "latest_universal").read_text().strip()
    assert pointer == "step_00000002_universal"  # not the .tmp folder ds_to_universal wrote into


def test_the_by_hand_universal_route_resumes_and_reuses_the_conversion(two_rank_checkpoint, tmp_path):
    """docs/cluster.md's route (ds_to_universal, then --resume ..._universal) used to exit 2; the trainer also
    converted again instead of reusing the folder."""
    out = _copy(two_rank_checkpoint, tmp_path)
    tag = out / "checkpoints" / "step_00000002"
    converted = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(tag), "--output_folder", f"{tag}_universal"], cwd=REPO, capture_output=True,
                               text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert converted.returncode == 0, converted.stdout + converted.stderr
    code, log = run(out, *TINY, "run.max_steps=4", "run.export_at_end=false", "--resume", f"{tag}_universal")
    _ok(code, log)
    assert "reusing the universal conversion" in log and "converting" not in log
    assert steps(out) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# 5 + 12. bad data: counted over all ranks, too much of it saves and exits 65


def _salted_folder(root: Path, good: int, bad: int) -> None:
    from PIL import Image

    (root / "a").mkdir(parents=True)
    for i in range(good):
        Image.new("RGB", (40, 40), (i * 5 % 255, 80, 160)).save(root / "a" / f"{i:03d}.jpg")
    for i in range(bad):
        (root / "a" / f"broken_{i:03d}.jpg").write_bytes(b"not a jpeg")


def test_bad_samples_are_counted_over_all_ranks(tmp_path):
    """metrics/TensorBoard/train.log logged rank 0's count (7 of 18 on 2 ranks)."""
    _salted_folder(tmp_path / "imgs", good=56, bad=8)
    out = tmp_path / "run"
    code, log = run(out, *TINY, f"data.source=folder:{tmp_path / 'imgs'}", "data.max_bad_fraction=0.5",
                    "run.max_steps=4", "run.export_at_end=false", procs=2)
    _ok(code, log)
    skipped = log.count("skipped undecodable sample")  # every rank's warnings, both ranks log to this output
    assert skipped > 0 and metrics(out)[-1]["bad_samples"] == skipped


def test_too_many_bad_samples_save_then_exit_65_naming_the_source_and_count(tmp_path):
    """It used to be a traceback with exit 1 and no checkpoint."""
    _salted_folder(tmp_path / "imgs", good=40, bad=24)
    out = tmp_path / "run"
    code, log = run(out, *TINY, f"data.source=folder:{tmp_path / 'imgs'}", "data.max_bad_fraction=0.05",
                    "run.max_steps=40", procs=2)
    _ok(code, log, 65)
    line = next(x for x in log.splitlines() if "could not be decoded" in x and "ERROR" in x)
    assert f"data.source='folder:{tmp_path / 'imgs'}'" in line and "(checkpoint saved)" in line
    assert "Traceback" not in log
    assert checkpoints(out) == [f"step_{steps(out)[-1]:08d}"]


# ----------------------------------------------------------------------------------------------------------------
# 6. a rank that stops answering


def test_a_stopped_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    """kill -STOP of one of 2 ranks with HD_DIST_TIMEOUT_S=30 used to end the job after 67-80 s, naming nobody (the
    launcher even named the wrong rank)."""
    out = tmp_path / "run"
    job = Job(out, *TINY, "run.max_steps=100000", procs=2,
              extra_env={"HD_DIST_TIMEOUT_S": "20"})
    job.wait_for_steps(2)
    victim = job.rank_pid(1)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    code = job.wait(120)
    took = time.monotonic() - stopped
    log = job.log()
    assert code == 69, f"exit {code}\n{log[-4000:]}"
    assert took < 20 + 12, f"{took:.0f} s\n{log[-3000:]}"
    assert f"rank 1 on host {socket.gethostname()} (pid {victim}) stopped answering" in log, log[-3000:]
    assert not alive(victim) and not job.ranks()


# ----------------------------------------------------------------------------------------------------------------
# 7. durability: STOP files, a full disk


def test_a_stop_file_touched_after_the_last_step_does_not_stop_the_next_job(tmp_path):
    out = tmp_path / "run"
    job = Job(out, *TINY, "run.max_steps=3")
    job.wait_for_steps(3)  # the last step is done: no stop check follows
    (out / "STOP").touch()
    _ok(job.wait(120), job.log())
    assert not (out / "STOP").exists()
    code, log = run(out, *TINY, "run.max_steps=5")
    _ok(code, log)
    assert steps(out) == [1, 2, 3, 4, 5]


@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB tmpfs (needs root to mount); a filler file there can take all the space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_bytes: int) -> None:
    """Take all free space of ``disk`` but ``leave_bytes``."""
    free = shutil.disk_usage(disk).free
    with open(disk / f"filler{time.monotonic_ns()}", "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(0, free - leave_bytes))


def test_a_full_disk_ends_with_exit_74_and_one_line_and_a_retry_does_too(small_disk, tmp_path):
    """Disk full ended in a traceback blaming loss.png; a retry while still full crashed truncating metrics.jsonl."""
    out = small_disk / "run"
    args = [*TINY, "run.ckpt_every=2", "run.keep_last=3", "run.export_at_end=false"]
    _ok(*run(out, *args, "run.max_steps=2", log_dir=tmp_path))
    _fill(small_disk, leave_bytes=1 << 20)  # 1 MiB: the config and a few rows fit, the next checkpoint does not
    code, log = run(out, *args, "run.max_steps=4", log_dir=tmp_path)
    _ok(code, log, 74)
    error = next(line for line in log.splitlines() if "ERROR" in line)  # one line, naming the file and the space
    assert "could not write checkpoint" in error and "MiB free there" in error, error
    assert "the newest complete checkpoint is step_00000002" in error and "Traceback" not in log
    assert checkpoints(out) == ["step_00000002"] and not (out / "checkpoints" / "step_00000004").exists()
    _fill(small_disk, leave_bytes=0)
    code, log = run(out, *args, "run.max_steps=4", log_dir=tmp_path)
    _ok(code, log, 74)
    assert "No space left on device" in log and "Traceback" not in log
    for filler in small_disk.glob("filler*"):
        filler.unlink()
    code, log = run(out, *args, "run.max_steps=4", log_dir=tmp_path)
    _ok(code, log)
    assert steps(out) == [1, 2, 3, 4] and checkpoints(out) == ["step_00000002", "step_00000004"]
