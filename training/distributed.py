"""The process's place in a ``torchrun`` job: rank, world size, device, and rank 0's values.

One process per device, DistributedDataParallel (gloo on CPU, nccl on CUDA), the global batch
split evenly. Rank 0 owns the clock (its elapsed time is broadcast every step, so every rank
follows the same schedule and stops at the same step), evaluation, files and the model store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process in the job: ``rank`` of ``world``; ``active`` under ``torchrun``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files, evaluates and stores."""
        return self.rank == 0

    def broadcast(self, value: float, device: torch.device) -> float:
        """Rank 0's ``value`` on every rank (``value`` itself outside ``torchrun``)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.broadcast(t, 0)
        return float(t)

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """``flag`` (a one-element float tensor, 0 or 1) or-ed over the ranks, in place."""
        if self.active:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in DistributedDataParallel under ``torchrun``, else ``model`` itself."""
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def end_run(self) -> None:
        """Ranks > 0 wait for rank 0 (its export) before the next run or exit; a group this
        process joined for one run is left."""
        if self.active:
            torch.distributed.barrier()
            if self.owns_group:
                torch.distributed.destroy_process_group()


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """The process's rank and device; joins the process group under ``torchrun``.

    Idempotent: an already initialized group is reused (``active``), never re-initialized;
    ``owns_group`` says whether this call joined it.

    Args:
        device_name: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ValueError: ``cuda`` without CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but CUDA is not available; use --device cpu or auto"
        )
    device = torch.device(f"cuda:{local_rank}") if device_name == "cuda" else torch.device("cpu")
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True, owns_group), device
