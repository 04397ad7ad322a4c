"""The circular queue of negative keys (MoCo's dictionary)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """A circular FIFO of L2-normalised keys.

    The keys, the write pointer and the fill count are persistent buffers, so a checkpoint holds
    the queue exactly and a resumed run continues with the same negatives. A fresh queue is filled
    with random unit vectors (as in the MoCo reference) so the loss is defined from step one;
    ``filled`` counts how many slots hold real keys.

    ``written_at`` (K,) holds, for every slot, the number of the enqueue call that wrote it (0
    for the first call, -1 for a slot never written), also persistent; the count of calls is
    not stored apart (it is one more than the largest entry). :func:`mocoq.diagnostics.mean_key_age`
    reads the keys' ages from it. A checkpoint from before this buffer existed loads with every
    slot's age unknown (-1); the ages fill in as the run overwrites the slots.

    Args:
        size: number of keys K.
        dim: key dimension D.
    """

    keys: Tensor
    ptr: Tensor
    filled: Tensor
    written_at: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        if dim < 1:
            raise ValueError(f"queue dim must be positive, got {dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        # The pointer lives in a buffer for checkpoints; the hot path reads the host mirror
        # so that enqueue never synchronises with the device.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("written_at", torch.full((size,), -1, dtype=torch.long))  # (K,)
        self._ptr = 0
        self._filled = 0
        self._writes = 0  # enqueue calls so far (host mirror: max(written_at) + 1)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write a batch of keys (N, D) over the oldest slots, wrapping in two slices if needed."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (N, {self.dim}), got {tuple(keys.shape)}")
        batch = keys.shape[0]
        if batch > self.size:
            raise ValueError(
                f"batch of {batch} keys is larger than the queue of {self.size}: "
                f"raise model.queue_size to at least {batch} or lower the batch size"
            )
        keys = keys.detach().to(self.keys.dtype)
        start = self._ptr
        head = min(batch, self.size - start)  # slots left before the end of the buffer
        self.keys[start : start + head] = keys[:head]
        self.written_at[start : start + head] = self._writes  # a fill from a host int: no sync
        if head < batch:  # wrap: the rest goes to the front
            self.keys[: batch - head] = keys[head:]
            self.written_at[: batch - head] = self._writes
        self._writes += 1
        self._ptr = (start + batch) % self.size
        self._filled = min(self.size, self._filled + batch)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)

    @property
    def pointer(self) -> int:
        """Index of the slot the next key is written to."""
        return self._ptr

    @property
    def num_filled(self) -> int:
        """How many slots hold enqueued keys (the rest still hold the random initial keys)."""
        return self._filled

    @property
    def num_writes(self) -> int:
        """How many times :meth:`enqueue` has been called (over the run, resumes included)."""
        return self._writes

    def ordered(self) -> Tensor:
        """The enqueued keys from oldest to newest, shape (num_filled, D)."""
        if self._filled < self.size:
            return self.keys[: self._filled].clone()
        return torch.roll(self.keys, shifts=-self._ptr, dims=0)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "keys")
        if saved is not None and tuple(saved.shape) != tuple(self.keys.shape):
            raise ValueError(
                f"checkpoint queue holds {saved.shape[0]} keys of dim "
                f"{saved.shape[1]}, but this model's queue is {self.size} x {self.dim}: "
                "resume with the checkpoint's model.queue_size (and head.out_dim), or start a "
                "new run from its weights with init_weights=<checkpoint> instead of resuming"
            )
        if saved is not None and prefix + "written_at" not in state_dict:
            # A checkpoint from before the slots' write times were kept: ages unknown.
            state_dict[prefix + "written_at"] = torch.full_like(self.written_at, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr = int(self.ptr)
        self._filled = int(self.filled)
        self._writes = int(self.written_at.max()) + 1
