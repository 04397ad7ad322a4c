"""Collectives for MoCo under DDP; exact no-ops when not distributed.

Besides the even-sized gather of keys, this holds what evaluation needs to split a dataset over
ranks and put it back together: rank ``r`` of ``W`` takes the items ``r, r + W, r + 2W, ...``
(:class:`StridedShardSampler`), the shards of different lengths are gathered in rank order
(:func:`gather_uneven`) and interleaved back into dataset order (:func:`unshard_strided`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (N, ...) from every rank in rank order: (world * N, ...), no grad."""
    size = world_size()
    if size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)  # (world * N, ...)


@torch.no_grad()
def gather_uneven(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (N_r, ...) from every rank in rank order, N_r free to differ.

    Every rank must call this with the same dtype and the same trailing shape. Each shard is
    padded to the largest N_r for the gather and trimmed after. Returns (sum_r N_r, ...) on
    every rank, without gradient; the input itself when not distributed.
    """
    size = world_size()
    if size == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = concat_all_gather(count).tolist()  # (world,): N_r of every rank
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))  # (max N_r, ...)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded)
    return torch.cat([shard[:n] for shard, n in zip(gathered, counts, strict=True)])


@torch.no_grad()
def all_reduce(tensor: Tensor, op: Literal["sum", "max"] = "sum") -> Tensor:
    """Element-wise sum or max of ``tensor`` (any shape) over ranks, as a new tensor.

    The input is left as it is; when not distributed it is returned unchanged.
    """
    if world_size() == 1:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return reduced


def _shard_of(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """(rank, W) of a shard, each defaulting to the process's own."""
    replicas = world_size() if num_shards is None else num_shards
    index = rank() if shard is None else shard
    if replicas < 1 or not 0 <= index < replicas:
        raise ValueError(f"need 0 <= rank < num_replicas, got rank {index} of {replicas}")
    return index, replicas


class StridedShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` below ``length``: this rank's shard, in order.

    Over the W ranks every index in ``[0, length)`` appears exactly once (no padding, so shards
    differ in length by at most one). Deterministic; at W = 1 it yields ``0 .. length - 1``.

    Args:
        length: size of the dataset.
        rank: this shard's rank; the process's rank when None.
        num_replicas: W, the number of shards; the world size when None.
    """

    def __init__(
        self, length: int, rank: int | None = None, num_replicas: int | None = None
    ) -> None:
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        self.length = length
        self.rank, self.num_replicas = _shard_of(rank, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def unshard_strided(gathered: Tensor, num_replicas: int | None = None) -> Tensor:
    """Dataset order from the rank-ordered concatenation of :class:`StridedShardSampler` shards.

    Args:
        gathered: (N, ...) rows of rank 0's shard (items 0, W, 2W, ...), then rank 1's shard
            (items 1, W + 1, ...), and so on, as :func:`gather_uneven` returns them.
        num_replicas: W; the world size when None.

    Returns:
        (N, ...) with row i holding dataset item i; the input itself when W = 1.
    """
    replicas = world_size() if num_replicas is None else num_replicas
    if replicas < 1:
        raise ValueError(f"num_replicas must be positive, got {replicas}")
    if replicas == 1:
        return gathered
    length = gathered.shape[0]
    # Row j of ``gathered`` is dataset item ``order[j]``; a rank past the end holds nothing.
    device = gathered.device
    order = torch.cat(
        [torch.arange(min(r, length), length, replicas, device=device) for r in range(replicas)]
    )  # (N,)
    restored = torch.empty_like(gathered)
    restored[order] = gathered
    return restored
