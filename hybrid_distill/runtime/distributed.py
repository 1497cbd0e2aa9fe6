"""The one set of ``torch.distributed`` helpers; each also works without a process group (one process).

Model, loss and kernel code never import this module: only the runtime (engine, checkpoints, the stop
agreement) and the training loop talk to other ranks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, indexed by rank (picklable objects)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """Where the default group's collectives need their tensors: this rank's GPU for NCCL, else the CPU."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: int, device: Any = None) -> int:
    """MAX of the integer ``value`` over all ranks."""
    if not initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device if device is not None else comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: torch.Tensor) -> bool:
    """True on every rank when the boolean tensor ``flag`` is true on any rank (keeps collectives in step); the
    flag may live on any device (a ZeRO-3 CPU-offloaded partition's is on the CPU)."""
    t = flag.float().reshape(1)
    if initialized():
        t = t.to(comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all ranks (in place when on the group's device); returned."""
    if initialized():
        values = values.to(comm_device())
        dist.all_reduce(values)
    return values


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` ``(n_r, ...)`` concatenated in rank order (row counts may differ between ranks).

    The tensor must be on the process group's device (CUDA for NCCL, CPU for gloo).
    """
    if not initialized():
        return rows
    counts = all_gather_objects(rows.shape[0])
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return torch.cat([t[:n] for t, n in zip(out, counts, strict=True)])


def init(device: torch.device, timeout: timedelta) -> None:
    """Create the default process group through DeepSpeed: NCCL on CUDA, gloo on CPU."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    if device.type == "cpu":
        unlink_shm_buffer()


def unlink_shm_buffer(environ: Mapping[str, str] | None = None) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from ``/dev/shm`` once every rank has mapped it.

    DeepSpeed's CPU accelerator gives each rank a 66 MiB shared-memory segment, named after the master address and
    port, when all ranks are on one machine, and never unlinks it: every CPU run left ``ranks x 66 MiB`` of RAM in
    ``/dev/shm`` (22 GB after a day of tests here), and a later job on the same port could open a stale one. The
    mappings stay valid after the unlink; the memory goes when the last rank exits, also after a kill -9.
    """
    environ = os.environ if environ is None else environ
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_"
            f"{environ.get('MASTER_PORT', '')}_{rank()}")
    barrier()  # every rank's shm_initialize has opened every other rank's segment
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def close() -> None:
    """Destroy the default process group (every rank is past its last collective), as torch asks before exit."""
    if initialized():
        dist.destroy_process_group()
