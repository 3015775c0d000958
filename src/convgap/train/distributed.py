"""Training in several processes with PyTorch's own engine (torchrun + DistributedDataParallel).

A process launched by ``torchrun`` (or anything that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) with ``WORLD_SIZE > 1`` joins the
default process group (gloo on the CPU, NCCL on CUDA) unless the caller already did. A
plain process is a group of one: nothing is initialised and every collective here is a
no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .. import hardware
from ..errors import ConvgapError

__all__ = ["Group", "join", "leave", "choose_device", "sum_over", "gather", "shard",
           "share_buffers"]


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its
    node); ``created``: :func:`join` initialised the process group (so :func:`leave` ends
    it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and prints (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConvgapError(f"environment variable {name}={os.environ[name]!r} is not an "
                           "integer; launch with torchrun") from None


def choose_device(device: str | torch.device | None) -> torch.device:
    """``device`` checked, or (None) the GPU of this process (``cuda:LOCAL_RANK``) when CUDA
    is available, else the CPU. Under several processes a bare ``"cuda"`` also means this
    process's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = hardware.check_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = hardware.check_device(f"cuda:{_env_int('LOCAL_RANK', 0)}")
    return dev


def join(device: torch.device) -> Group:
    """This process's group: initialised from the environment when ``WORLD_SIZE > 1`` and
    no process group exists yet (gloo for a CPU ``device``, NCCL for CUDA)."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Group()
    if not dist.is_available():
        raise ConvgapError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return Group(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0),
                 created=True)


def leave(group: Group) -> None:
    """End the process group if :func:`join` began it, once every process got here: a
    process tearing gloo down while a peer still works (rank 0 writing the last
    checkpoint) can abort that peer ("terminate called without an active exception")."""
    if group.created:
        dist.barrier()
        dist.destroy_process_group()


def sum_over(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over every process (float64; returned as is in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather(obj: Any) -> list[Any]:
    """``obj`` from every process, by rank (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def share_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every process: after the
    last training step each process holds the statistics of its own batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, 0)


def shard(data: Dataset) -> Dataset:
    """This process's share of ``data`` for evaluation: every ``world_size``-th item from
    its rank, nothing repeated (so sums over processes count each item once)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return data
    return Subset(data, range(dist.get_rank(), len(data), dist.get_world_size()))
