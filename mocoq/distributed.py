"""Collectives for MoCo under DDP; exact no-ops when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (N, ...) from every rank in rank order: (world * N, ...), no grad."""
    size = world_size()
    if size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)  # (world * N, ...)
