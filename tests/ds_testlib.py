"""Run DeepSpeed test bodies in fresh processes, and tiny trainable modules for them.

DeepSpeed and torch.distributed keep global state (process group, accelerator, comm backend), so every test
that builds an engine runs its body in new Python processes::

    results = run_ranks(_scenario, world_size=2, tmp=str(tmp_path))   # _scenario: module-level function in a test file

Each process gets ``MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE`` and ``DS_ACCELERATOR=cpu``, calls
``deepspeed.init_distributed(dist_backend="gloo")`` and then ``_scenario(**kwargs)``; the return values (JSON)
come back as a list indexed by rank. A failing process fails the test with its output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(func: Callable[..., Any], world_size: int = 1, timeout: float = 240, **kwargs: Any) -> list[Any]:
    """Call module-level ``func(**kwargs)`` in ``world_size`` fresh processes joined by gloo; results by rank."""
    module_file = sys.modules[func.__module__].__file__
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world_size):
            out = Path(tmp) / f"rank{rank}.json"
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                       DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
            cmd = [sys.executable, __file__, module_file, func.__name__, json.dumps(kwargs), str(out)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outputs = [_wait(p, timeout) for p in procs]
        failed = [f"rank {rank} of {func.__name__} exited {proc.returncode}:\n{output[-6000:]}"
                  for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)) if proc.returncode != 0]
        if failed:  # every failing rank's output: the first to fail is often not rank 0
            raise AssertionError("\n\n".join(failed))
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world_size)]


def _wait(proc: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        output += f"\n[timed out after {timeout} s]"
    return output


def tiny_trainable(seed: int = 0, embed_dim: int = 32):
    """``nn.Module`` with children ``student`` (tiny timm ViT, 32 px, 8 px patches) and ``head`` (Linear)."""
    import timm
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Trainable(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=embed_dim,
                                             depth=2, num_heads=2, num_classes=0)
            self.head = nn.Linear(embed_dim, 24)

        def forward(self, x):
            return self.head(self.student.forward_features(x))

    return Trainable()


def tiny_config(batch_size: int = 2, global_batch_size: int = 2, **optim: Any):
    """A ``Config`` whose data/optim sections suit ``tiny_trainable`` (the rest is the ``tiny`` preset)."""
    from hybrid_distill.config.presets import tiny

    cfg = tiny()
    cfg.data.batch_size, cfg.optim.global_batch_size = batch_size, global_batch_size
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    return cfg


def train_steps(engine, steps: int, seed: int = 0) -> list[float]:
    """Run ``steps`` micro-batches of a fixed regression loss on rank-dependent random images; the losses."""
    import torch

    losses = []
    for i in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + i * 10 + engine.global_rank)
        x = torch.randn(2, 3, 32, 32, generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _worker(module_file: str, func_name: str, kwargs_json: str, out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    spec = importlib.util.spec_from_file_location(Path(module_file).stem, module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, func_name)(**json.loads(kwargs_json))
    Path(out).write_text(json.dumps(result))
    import torch.distributed as dist

    dist.barrier()  # no rank tears down gloo while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
