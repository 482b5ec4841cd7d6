"""``torchrun`` support: process group setup (gloo on CPU, NCCL on CUDA), ranks and reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "dist_info", "all_reduce_sum", "any_across_ranks", "barrier", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``is_main`` writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's rank and size (1 process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(device: str | torch.device = "cpu") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL for CUDA devices and gloo otherwise. Without ``WORLD_SIZE`` > 1 nothing happens.
    On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist_info()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one process); returns ``t``."""
    if dist_info().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_across_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
