"""A training order that is a pure function of (seed, epoch) and survives a restart anywhere.

MoCo runs are preempted mid-epoch. To continue exactly, the rest of the epoch must be the same
images in the same order with the same augmentations. :class:`ResumableSampler` provides that:

* the epoch's order is a permutation drawn from ``(seed, epoch)`` over the whole dataset; the
  global batch ``j`` is the contiguous block ``order[j * B * W : (j + 1) * B * W]`` and rank ``r``
  takes its ``r``-th slice of ``B``, so the union of a step's batches over ranks does not depend
  on how many ranks there are;
* every item carries its own augmentation seed, also drawn from ``(seed, epoch)``, so an image's
  views do not depend on the worker, the rank, or the position in the epoch;
* the sampler counts the samples consumed in the epoch (``advance``, called by the data module
  for every batch the trainer takes) and saves ``(epoch, consumed, batches)``; after a restart
  the epoch resumes at the first sample not yet trained on, even with another batch size or
  rank count.

The keys it yields are ``(index, seed)`` pairs, understood by
:class:`mocoq.data.datamodule.TransformedDataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from mocoq.distributed import rank, world_size

_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart: seed s, epoch e -> s * stride + e


class ResumableSampler(Sampler[tuple[int, int]]):
    """This rank's ``(index, augmentation seed)`` keys for one epoch, resumable mid-epoch.

    Args:
        num_samples: dataset length.
        batch_size: images per rank per step (B); incomplete global batches are dropped.
        seed: run seed; the epoch's order and the items' augmentation seeds derive from it.
        shuffle: False keeps the dataset order (seeds are still drawn).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples, batch_size >= 1, got {num_samples}, {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already trained on, over all ranks
        self.batches = 0  # batches of this epoch already trained on, per rank

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; a new epoch starts at its first sample."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0
            self.batches = 0

    def advance(self, samples: int) -> None:
        """Record one more batch taken: ``samples`` samples summed over ranks."""
        self.consumed += samples
        self.batches += 1

    def plan(self, epoch: int | None = None) -> tuple[Tensor, Tensor]:
        """The epoch's global order (num_samples,) and per-item augmentation seeds (idem)."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        return order, seeds

    def _global_batch(self) -> int:
        return self.batch_size * world_size()

    def __len__(self) -> int:
        """Samples this rank yields in this epoch, counting the batches already taken.

        The trainer counts an epoch's batches from this length and, after a restart, continues
        its count from the batches taken before. So the length is (batches taken + batches
        left) x B: a whole epoch normally, and the right total when a run resumes with another
        batch size or number of ranks.
        """
        left = (self.num_samples - self.consumed) // self._global_batch()
        return (self.batches + max(0, left)) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self.plan()
        remaining = order[self.consumed :]
        step, offset = self._global_batch(), rank() * self.batch_size
        for start in range(0, len(remaining) - step + 1, step):
            block = remaining[start + offset : start + offset + self.batch_size]  # (B,)
            yield from zip(block.tolist(), seeds[block].tolist(), strict=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "batches": self.batches,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with seed={state['seed']} but this run has "
                f"seed={self.seed}: resume with seed={state['seed']}"
            )
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self.batches = int(state.get("batches", 0))


class ResumableLoader(DataLoader[Any]):
    """A DataLoader over a :class:`ResumableSampler` that Lightning checkpoints and restores
    (it has ``state_dict`` / ``load_state_dict``, Lightning's resumable-loader protocol).

    ``position`` (set by the data module) returns the state to save; by default the sampler's.
    """

    sampler: ResumableSampler
    position: Callable[[], dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.position() if self.position is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
