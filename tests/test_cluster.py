"""Unit tests for ``runtime.cluster``: rank discovery from launcher/SLURM/nothing and the stop request."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from hybrid_distill.runtime import cluster
from hybrid_distill.runtime.cluster import DistEnv, StopRequest

SLURM_TASK = {
    "SLURM_JOB_ID": "12345", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


def _no_scontrol(host: str) -> str | None:
    raise AssertionError("scontrol must not be queried")


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[01-03,7],cpu1", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("a-b[009-010].x", ["a-b009.x", "a-b010.x"]),
    ("", []),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert cluster.expand_nodelist(nodelist) == hosts


def test_parse_node_addr() -> None:
    line = "NodeName=n1 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.1.2.3 NodeHostName=n1 Version=22.05.8"
    assert cluster.parse_node_addr(line) == "10.1.2.3"
    assert cluster.parse_node_addr("Node n9 not found") is None
    assert cluster.parse_node_addr("NodeName=x NodeAddr=(null)") is None


def test_job_port_is_stable_and_in_range() -> None:
    assert cluster.job_port("12345") == cluster.job_port(12345) == 12000 + 12345
    # below Linux's ephemeral range (32768-60999), where outgoing connections may already hold the port
    assert all(12000 <= cluster.job_port(j) < 32768 for j in (0, 19999, 20000, 987654321))


def test_launcher_env_is_kept() -> None:
    environ = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "h0", "MASTER_PORT": "29500",
               **SLURM_TASK}
    env, updates = cluster.resolve_dist_env(environ, node_addr=_no_scontrol)
    assert env == DistEnv(5, 1, 8, "launcher", "h0", 29500)
    assert updates == {}


def test_slurm_env_is_mapped() -> None:
    queried: list[str] = []

    def node_addr(host: str) -> str:
        queried.append(host)
        return "10.0.0.7"

    env, updates = cluster.resolve_dist_env(dict(SLURM_TASK), node_addr=node_addr)
    assert env == DistEnv(3, 1, 4, "slurm", "10.0.0.7", 12000 + 12345)
    assert queried == ["gpu07"]
    assert updates == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.7",
                       "MASTER_PORT": str(12000 + 12345)}


def test_slurm_falls_back_to_host_name_and_respects_preset_master() -> None:
    env, _ = cluster.resolve_dist_env(dict(SLURM_TASK), node_addr=lambda host: None)
    assert env.master_addr == "gpu07"
    preset = {**SLURM_TASK, "MASTER_ADDR": "192.168.1.1", "MASTER_PORT": "23456"}
    env, updates = cluster.resolve_dist_env(preset, node_addr=_no_scontrol)
    assert (env.master_addr, env.master_port) == ("192.168.1.1", 23456)
    assert "MASTER_ADDR" not in updates and "MASTER_PORT" not in updates


def test_slurm_step_task_count_wins_over_job_count() -> None:
    environ = {**SLURM_TASK, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "4"}
    assert cluster.resolve_dist_env(environ, node_addr=lambda h: "x")[0].world_size == 4


def test_batch_shell_is_single_process() -> None:
    batch = {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP")}
    env, updates = cluster.resolve_dist_env(batch, node_addr=_no_scontrol, port=lambda: 31337)
    assert env == DistEnv(0, 0, 1, "single", "127.0.0.1", 31337)
    assert updates["WORLD_SIZE"] == "1" and updates["MASTER_PORT"] == "31337"


def test_single_process() -> None:
    env, updates = cluster.resolve_dist_env({}, node_addr=_no_scontrol, port=lambda: 40001)
    assert env == DistEnv(0, 0, 1, "single", "127.0.0.1", 40001)
    assert updates == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "40001"}


def test_setup_dist_env_writes_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "query_node_addr", lambda host: "127.0.0.9")
    environ = dict(SLURM_TASK)
    env = cluster.setup_dist_env(environ)
    assert env.source == "slurm" and env.is_main is False
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["MASTER_ADDR"]) == ("3", "4", "127.0.0.9")
    assert "rank 3/4 (local 1) via slurm" in env.describe()
    assert cluster.setup_dist_env(environ) == DistEnv(3, 1, 4, "launcher", "127.0.0.9", 12000 + 12345)


def test_device_index() -> None:
    env = DistEnv(rank=13, local_rank=5, world_size=16, source="slurm")
    assert env.device_index(8) == 5  # all GPUs of the node visible
    assert env.device_index(1) == 0  # one GPU bound per task
    assert env.device_index(0) == 0


def test_bad_integer_is_named() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        cluster.resolve_dist_env({**SLURM_TASK, "SLURM_PROCID": "x"}, node_addr=lambda h: "a")


def test_dist_timeout() -> None:
    assert cluster.dist_timeout({}) == timedelta(seconds=600)
    assert cluster.dist_timeout({"HD_DIST_TIMEOUT_S": "90"}) == timedelta(seconds=90)
    for bad in ("abc", "0", "-5"):
        with pytest.raises(ValueError, match="HD_DIST_TIMEOUT_S"):
            cluster.dist_timeout({"HD_DIST_TIMEOUT_S": bad})


def test_hostfile_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    out = tmp_path / "hostfile"
    assert cluster.main(["hostfile", "--slots", "8", "--out", str(out)]) == 0
    assert out.read_text() == "n1 slots=8\nn2 slots=8\n"


def test_master_addr_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[3-4]")
    monkeypatch.delenv("SLURM_STEP_NODELIST", raising=False)
    monkeypatch.setattr(cluster, "query_node_addr", lambda host: f"addr-of-{host}")
    assert cluster.main(["master-addr"]) == 0
    assert capsys.readouterr().out.strip() == "addr-of-n3"


# ----------------------------------------------------------------------------------------------------------------
# StopRequest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HD_STOP_FILE", "HD_STOPPED_FILE", "RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture()
def handlers():
    """Restore the test process's SIGUSR1/SIGTERM handlers after a test installs the trainer's."""
    before = {sig: signal.getsignal(sig) for sig in StopRequest.DEFAULT_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


@pytest.fixture()
def stop(handlers):
    return StopRequest().install()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag(stop: StopRequest, sig: signal.Signals) -> None:
    assert stop.should_stop() is False and stop.reason is None
    os.kill(os.getpid(), sig)
    assert stop.local_requested
    assert stop.should_stop() is True
    assert stop.reason == f"signal {sig.name}"
    assert stop.should_stop() is True  # sticky


def test_signals_held_before_the_handlers_exist_become_the_stop_request(handlers) -> None:
    """launch.py holds SIGTERM/USR1 from its first line; StopRequest.install takes over what arrived meanwhile."""
    cluster.hold_stop_signals(received=[signal.SIGUSR1])  # as launch.py's own first handler got it
    os.kill(os.getpid(), signal.SIGTERM)  # would end the process with the default handler
    request = StopRequest().install()
    assert request.should_stop() is True and request.reason == "signal SIGTERM"


def test_stop_file_and_stopped_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, marker = tmp_path / "STOP", tmp_path / "STOPPED"
    monkeypatch.setenv("HD_STOP_FILE", str(path))
    monkeypatch.setenv("HD_STOPPED_FILE", str(marker))
    request = StopRequest()
    assert request.stop_files == (path,) and request.should_stop() is False
    assert not marker.exists()
    path.touch()
    assert request.should_stop() is True
    assert request.reason == f"stop file {path}"
    assert marker.read_text() == f"stop file {path}\n"
    assert not path.exists(), "a stop file is consumed, so the resumed run does not stop at once"


def test_explicit_stop_file_and_env_file_are_both_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_stop, job_stop = tmp_path / "run" / "STOP", tmp_path / "job.stop"
    run_stop.parent.mkdir()
    monkeypatch.setenv("HD_STOP_FILE", str(job_stop))
    for created in (run_stop, job_stop):
        request = StopRequest(stop_file=run_stop)
        assert request.stop_files == (run_stop, job_stop)
        assert request.should_stop() is False
        created.touch()
        assert request.should_stop() is True and request.reason == f"stop file {created}"
        assert not created.exists()


def test_no_stop_file() -> None:
    assert StopRequest().stop_files == () and StopRequest(stop_file="").stop_files == ()


def test_stop_files_left_at_the_end_are_discarded(tmp_path: Path) -> None:
    """A STOP touched after the last step check must not stop the next job at once (rank 0 discards it at exit)."""
    request = StopRequest(stop_file=tmp_path / "STOP")
    request.add_stop_file(tmp_path / "job.stop")
    (tmp_path / "STOP").touch()
    assert request.discard_stop_files() == [tmp_path / "STOP"]
    assert not (tmp_path / "STOP").exists() and request.discard_stop_files() == []


_LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_rank_notices_when_its_deepspeed_launcher_is_gone(tmp_path: Path) -> None:
    """The deepspeed launcher forwards no signal on one node: SIGTERM kills it and its ranks train on. A rank whose
    parent is ``deepspeed.launcher.launch`` watches it (and the runner above it) and stops when it exits."""
    import subprocess
    import sys

    script = tmp_path / "launch_stub.py"
    script.write_text(_LAUNCHER)
    # argv names deepspeed.launcher.launch, as the real per-node launcher's command line does
    launcher = subprocess.Popen([sys.executable, str(script), "--module=deepspeed.launcher.launch"],
                                stdout=subprocess.PIPE, text=True)
    try:
        rank = int(launcher.stdout.readline())
        watched = cluster.launcher_processes(rank)
        assert [pid for pid, _, _ in watched] == [launcher.pid]  # its parent (pytest) is no deepspeed runner
        assert cluster.launcher_processes(os.getpid()) == []  # not started by the deepspeed launcher
        request = StopRequest()
        request._launchers = watched  # what __init__ finds in a real rank
        assert request.should_stop() is False
        launcher.kill()
        launcher.wait()
        assert request.should_stop() is True
        assert request.reason == f"the DeepSpeed per-node launcher (pid {launcher.pid}) exited"
    finally:
        launcher.kill()
        subprocess.run(["kill", "-9", str(rank)], check=False, capture_output=True)


def test_should_stop_agrees_over_a_process_group(stop: StopRequest, tmp_path: Path) -> None:
    """One-process gloo group: the all_reduce path runs and keeps the answer."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert stop.should_stop(device="cpu") is False
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(device="cpu") is True
        assert stop.reason == "signal SIGUSR1"
    finally:
        dist.destroy_process_group()


def test_exit_code_is_ex_tempfail() -> None:
    assert cluster.EXIT_REQUEUE == os.EX_TEMPFAIL == 75


def test_preemption_signal_does_not_kill_forked_data_workers(stop: StopRequest) -> None:
    """SLURM signals every process of a step, data-loader workers included: forked after ``install``, they
    inherit the flag-only handler and keep serving batches."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(torch.arange(64), batch_size=4, num_workers=2, multiprocessing_context="fork")
    batches = iter(loader)
    first = next(batches)
    pids = [worker.pid for worker in batches._workers]  # the iterator's worker processes (private attribute)
    assert len(pids) == 2
    for pid in [*pids, os.getpid()]:
        os.kill(pid, signal.SIGUSR1)
    rest = list(batches)
    assert torch.cat([first, *rest]).tolist() == list(range(64))
    assert stop.should_stop() is True and stop.reason == "signal SIGUSR1"


def _kill_from_another_process(pids: list[int], sig: str) -> None:
    """Signal as slurmstepd does: the sender is not the workers' parent."""
    import subprocess

    subprocess.run(["kill", f"-{sig}", *map(str, pids)], check=True)


def test_preemption_sigterm_does_not_kill_guarded_data_workers(stop: StopRequest) -> None:
    """SIGTERM (time limit, scancel, preemption) reaches every process of the step. PyTorch's workers die on a
    SIGTERM that is not their parent's, which kills the rank before it can checkpoint; the trainer's loaders
    install ``worker_signal_guard``, so the workers keep serving and the rank stops at its step boundary."""
    import torch
    from torch.utils.data import DataLoader

    def run(guard):
        loader = DataLoader(torch.arange(64), batch_size=4, num_workers=2, multiprocessing_context="fork",
                            worker_init_fn=guard)
        batches = iter(loader)
        first = [next(batches), next(batches)]  # one from each worker: both have run their init function
        _kill_from_another_process([w.pid for w in batches._workers], "TERM")
        return torch.cat([*first, *batches]).tolist()

    assert run(cluster.worker_signal_guard) == list(range(64))
    # What the guard prevents: the rank fails (how depends on what the worker was doing: a RuntimeError naming the
    # signal, or a ConnectionResetError when it died while handing a batch over).
    with pytest.raises((RuntimeError, ConnectionError)):
        run(None)
    _kill_from_another_process([os.getpid()], "TERM")
    assert stop.should_stop() is True and stop.reason == "signal SIGTERM"


def test_the_trainers_data_loader_workers_are_guarded() -> None:
    from hybrid_distill.config import DataConfig
    from hybrid_distill.data import build_loader

    loader = build_loader(DataConfig(source="synthetic", batch_size=2, num_workers=2, synthetic_size=8), img_size=16)
    assert loader._dataloader_kwargs()["worker_init_fn"] is cluster.worker_signal_guard
