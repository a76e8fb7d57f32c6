"""The processes of a command under torchrun / accelerate launch: who this one is, waiting for the others,
and sums over all of them. One process (no launcher): rank 0 of 1, and each of these does nothing."""

from __future__ import annotations

import os

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of this process, as torchrun / accelerate launch set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (the process group the Trainer's arguments started)."""
    if _group():
        torch.distributed.barrier()


def leave_group() -> None:
    """Destroy the process group the Trainer's arguments started (the Trainer leaves it to the caller),
    once the command is done."""
    if _group():
        torch.distributed.destroy_process_group()


def all_sum(values: list[float], device: torch.device | str) -> list[float]:
    """Each value summed over the processes (float64; on ``device``, where the backend wants it: NCCL
    reduces GPU tensors)."""
    if not _group():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()
