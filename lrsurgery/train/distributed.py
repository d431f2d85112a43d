"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``--batch-size`` stays the global batch: each of the W processes takes its own 1/W slice of every
micro-batch, and DDP's all-reduce averages the gradients, so the same command is the same training
at any W (up to the order of floating-point sums). Only rank 0 writes files. gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lrsurgery.errors import TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from torchrun's environment (a single process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(w: World, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if w.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: nn.Module, w: World, device: torch.device) -> nn.Module:
    """The model DDP-wrapped when there are several processes, else itself."""
    if w.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(indices: list[int], w: World) -> list[int]:
    """This rank's contiguous slice of a global micro-batch (its size must divide evenly)."""
    if len(indices) % w.size:
        raise TrainingError(f"a micro-batch of {len(indices)} examples does not split over {w.size} processes; "
                            "make --batch-size a multiple of accumulation × processes")
    per = len(indices) // w.size
    return indices[w.rank * per:(w.rank + 1) * per]


def mean(value: float, w: World) -> float:
    """The mean of a scalar over all processes (itself for one process)."""
    if w.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / w.size


def barrier(w: World) -> None:
    if w.size > 1 and dist.is_initialized():
        dist.barrier()


def shutdown(w: World) -> None:
    """Leave the process group together: a rank exiting with gloo threads alive aborts (SIGABRT)."""
    if w.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
