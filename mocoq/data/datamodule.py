"""The LightningDataModule: a two-view training loader and clean loaders for the kNN monitor."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mocoq.data.batched import BatchedMoCoAugmentation
from mocoq.data.fingerprint import DataChangedWarning, dataset_fingerprint, describe_change
from mocoq.data.sampling import ResumableLoader, ResumableSampler
from mocoq.data.transforms import EvalTransform, MoCoAugmentation
from mocoq.distributed import world_size

ImageDataset = Dataset[tuple[Tensor, int]]
Loader = Callable[..., ImageDataset]
AugmentFactory = Callable[..., Callable[[Tensor], Any]]

log = logging.getLogger(__name__)


def ignore_job_signals(worker_id: int) -> None:
    """Data-loading workers ignore SIGUSR1, SIGUSR2 and SIGTERM.

    SLURM signals every process of a job before its time limit; the training process handles
    the signal (checkpoint, requeue). A worker killed by it would fail the run first.
    """
    for name in ("SIGUSR1", "SIGUSR2", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class TransformedDataset(Dataset[tuple[Any, int]]):
    """Applies ``transform`` to the image of every ``(image, target)`` item of ``base``.

    A key is an index, or an ``(index, seed)`` pair from :class:`ResumableSampler`: then the
    transform's random draws are seeded with ``seed`` (and the caller's RNG state is restored),
    so the item's views are the same in any worker, on any rank, before and after a restart.
    """

    def __init__(self, base: ImageDataset, transform: Callable[[Tensor], Any]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        if isinstance(key, tuple):
            index, seed = key
            image, target = self.base[index]
            state = torch.get_rng_state()
            try:
                torch.default_generator.manual_seed(seed)
                return self.transform(image), target
            finally:
                torch.set_rng_state(state)
        image, target = self.base[key]
        return self.transform(image), target


class WithCleanView:
    """A two-view transform plus the clean view: ``image -> (view_a, view_b, clean)``, where
    ``clean`` is ``clean_transform(image)`` (the un-augmented image the online probe learns
    from). The clean transform draws nothing, so seeded items stay reproducible."""

    def __init__(
        self, augment: Callable[[Tensor], Any], clean_transform: Callable[[Tensor], Tensor]
    ) -> None:
        self.augment = augment
        self.clean_transform = clean_transform

    def __call__(self, image: Tensor) -> tuple[Tensor, ...]:
        """uint8 (C, H, W) -> three float (C, S, S)."""
        return (*self.augment(image), self.clean_transform(image))


class ImageBatch(NamedTuple):
    """A training batch of raw images, augmented on the device by the data module.

    Attributes:
        images: uint8 (N, C, H, W).
        targets: int64 (N,).
        seed: the seed of the batch's augmentation (the first item's seed from the sampler).
    """

    images: Tensor
    targets: Tensor
    seed: int


class InMemoryBatches(Dataset[tuple[Tensor, int]]):
    """Serves whole batches of an in-memory split by indexing its uint8 tensor.

    The DataLoader hands ``__getitems__`` a batch of :class:`ResumableSampler` keys
    ``(index, seed)`` and, with :func:`keep_batch` as ``collate_fn``, yields its
    :class:`ImageBatch` as it is.

    Args:
        images: uint8 (N, C, H, W).
        targets: int64 (N,).
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        return self.images[key[0]], int(self.targets[key[0]])

    def __getitems__(self, keys: list[tuple[int, int]]) -> ImageBatch:
        indices = torch.tensor([index for index, _ in keys])  # (N,)
        return ImageBatch(self.images[indices], self.targets[indices], keys[0][1])


def keep_batch(batch: Any) -> Any:
    """The collate function of :class:`InMemoryBatches`: the batch is already whole."""
    return batch


def in_memory_images(dataset: ImageDataset) -> tuple[Tensor, Tensor] | None:
    """``(images uint8 (N, C, H, W), targets (N,))`` of a split held in memory, else None."""
    images, targets = getattr(dataset, "images", None), getattr(dataset, "targets", None)
    if not isinstance(images, Tensor) or not isinstance(targets, Tensor):
        return None
    if images.dtype != torch.uint8 or images.dim() != 4 or targets.shape != images.shape[:1]:
        return None
    return images, targets


class MoCoDataModule(pl.LightningDataModule):
    """Loads one dataset's splits and serves MoCo's loaders.

    * ``train_dataloader``: batches ``((view_a, view_b), targets)``, each view (N, C, S, S),
      shuffled, ``drop_last`` so every step has the same batch size (with ``augment_on_device``,
      the views are made on the device, after the batch is moved there). With ``clean_view``
      set, ``((view_a, view_b, clean), targets)``: also the un-augmented image, as the clean
      loaders make it, for the online probe.
    * ``knn_bank_dataloader`` / ``knn_val_dataloader``: clean (un-augmented) images (N, C, S, S)
      and targets from ``bank_split`` and ``val_split`` for the kNN monitor.

    Args:
        loader: ``loader(root=..., split=...)`` returning an image dataset (a Hydra partial).
        augment: ``augment(image_size=, mean=, std=)`` returning the two-view transform.
        root: dataset folder; None lets the loader use its default location.
        train_split, bank_split, val_split: split names for pre-training, kNN bank, kNN queries.
        image_size: side S of the training views and clean images.
        channels: image channels (checked against the data).
        mean, std: per-channel normalisation.
        batch_size: images per device per step.
        num_workers: data-loading worker processes.
        eval_batch_size: images per batch for the clean loaders.
        eval_resize: shorter side before the centre crop of clean images (None: see EvalTransform).
        seed: seed of the training order and of every image's augmentation (the run's seed).
        augment_on_device: augment whole training batches on the training device
            (:class:`BatchedMoCoAugmentation`) when the split is in memory (a uint8 ``images``
            tensor, as :class:`mocoq.data.datasets.ArrayImageDataset` has) and ``augment`` is a
            :class:`MoCoAugmentation`; else (or False) each image is augmented in the workers.
        clean_view: add the clean view (``eval_transform`` of the image) to every training
            batch, for the online probe (``mocoq.train.build`` sets it from
            ``model.online_probe``).
    """

    def __init__(
        self,
        loader: Loader,
        augment: AugmentFactory,
        root: str | None = None,
        train_split: str = "train",
        bank_split: str | None = "train",
        val_split: str | None = "test",
        image_size: int = 32,
        channels: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        batch_size: int = 256,
        num_workers: int = 2,
        eval_batch_size: int = 512,
        eval_resize: int | None = None,
        seed: int = 0,
        augment_on_device: bool = False,
        clean_view: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"dataset.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"dataset.num_workers must be >= 0, got {num_workers}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"dataset.mean and dataset.std need {channels} values (one per channel), "
                f"got {len(mean)} and {len(std)}"
            )
        self.loader = loader
        self.root = os.path.expanduser(root) if root else None
        self.train_split = train_split
        self.bank_split = bank_split
        self.val_split = val_split
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size
        self.augment = augment(image_size=image_size, mean=list(mean), std=list(std))
        self.eval_transform = EvalTransform(image_size, list(mean), list(std), eval_resize)
        self.seed = seed
        self.augment_on_device = augment_on_device
        self.clean_view = clean_view
        self.batched_augment: BatchedMoCoAugmentation | None = None
        self._splits: dict[str, ImageDataset] = {}
        self._train_sampler: ResumableSampler | None = None
        self._resume_position: dict[str, Any] | None = None
        self._train_fingerprint: dict[str, Any] | None = None  # of the loaded train split
        self._saved_fingerprint: dict[str, Any] | None = None  # restored, not yet compared

    def split(self, name: str) -> ImageDataset:
        """The raw dataset (uint8 images) of one split, loaded once."""
        if name not in self._splits:
            dataset = self.loader(root=self.root, split=name)
            if len(dataset) == 0:  # type: ignore[arg-type]
                raise ValueError(f"split {name!r} of the dataset under {self.root} is empty")
            image, _ = dataset[0]
            if image.shape[0] != self.channels:
                raise ValueError(
                    f"the {name!r} images have {image.shape[0]} channels but dataset.channels is "
                    f"{self.channels}: set dataset.channels={image.shape[0]} (and mean/std)"
                )
            self._splits[name] = dataset
        return self._splits[name]

    def setup(self, stage: str | None = None) -> None:
        train = self.split(self.train_split)
        if len(train) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"dataset.batch_size={self.batch_size} is larger than the {len(train)} training "  # type: ignore[arg-type]
                "images: lower dataset.batch_size"
            )

    def train_dataloader(self) -> DataLoader[Any]:
        """Two augmented views per image: batches ``((view_a, view_b), targets)`` (and the
        clean view after them with ``clean_view``).

        With ``augment_on_device`` (and an in-memory split) the loader yields batches of raw
        images (:class:`ImageBatch`) instead, from this process, and
        :meth:`on_after_batch_transfer` makes the views on the training device.

        The order and the augmentations are drawn from ``seed`` and the epoch, and the loader
        resumes mid-epoch from a checkpoint (see :mod:`mocoq.data.sampling`). Under DDP it gives
        each rank its share of every global batch itself.
        """
        self._check_sampler_not_replaced()
        base = self.split(self.train_split)
        self._warn_if_data_changed()
        arrays = self._arrays_to_augment_on_device(base)
        dataset: Dataset[Any]
        if arrays is not None:  # batches of raw images, augmented in on_after_batch_transfer
            dataset, num_workers, collate = InMemoryBatches(*arrays), 0, keep_batch
        else:
            transform: Callable[[Tensor], Any] = self.augment
            if self.clean_view:
                transform = WithCleanView(self.augment, self.eval_transform)
            dataset, num_workers = TransformedDataset(base, transform), self.num_workers
            collate = None
        sampler = ResumableSampler(len(base), self.batch_size, self.seed)  # type: ignore[arg-type]
        if self._resume_position is not None:  # restored from a checkpoint
            sampler.load_state_dict(self._resume_position)
            self._resume_position = None
        elif self._train_sampler is not None:  # a reloaded loader continues where the last stood
            sampler.load_state_dict(self._train_sampler.state_dict())
        self._train_sampler = sampler
        loader = ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_job_signals,
            collate_fn=collate,
        )
        loader.position = self.train_position
        return loader

    def _arrays_to_augment_on_device(self, base: ImageDataset) -> tuple[Tensor, Tensor] | None:
        """The split's ``(images, targets)`` tensors when its batches are augmented on the
        device (and ``batched_augment`` set for them), else None; logs which path is taken."""
        self.batched_augment = None
        if not self.augment_on_device:
            return None
        arrays, reason = in_memory_images(base), ""
        if arrays is None:
            reason = "the training split is not one in-memory uint8 tensor"
        elif not isinstance(self.augment, MoCoAugmentation):
            reason = f"{type(self.augment).__name__} has no batched version"
        else:
            try:
                self.batched_augment = BatchedMoCoAugmentation.from_transform(self.augment)
            except ValueError as error:
                reason = str(error)
        if reason:
            log.info("augment_on_device: augmenting each image in the workers instead (%s)", reason)
            return None
        log.info(
            "augment_on_device: training batches are augmented on the training device "
            "(dataset.num_workers applies to the kNN loaders only)"
        )
        return arrays

    def train_position(self) -> dict[str, Any]:
        """Where the next training sample comes from: ``{"epoch", "consumed", "batches", "seed"}``.

        Saved in checkpoints (by the loader, and by this module's ``state_dict``). At the end of
        an epoch (including a ``limit_train_batches`` end) it points at the next epoch's start.
        The restored position is applied before the loader's first iterator exists: the trainer
        creates that iterator, and worker processes draw indices, before it sets the epoch.
        """
        if self._train_sampler is None:
            return dict(self._resume_position or {})
        state = self._train_sampler.state_dict()
        epoch_loop = getattr(getattr(self.trainer, "fit_loop", None), "epoch_loop", None)
        epoch_over = getattr(epoch_loop, "_num_ready_batches_reached", None)
        if epoch_over is not None and epoch_over():
            state.update(epoch=state["epoch"] + 1, consumed=0, batches=0)
        return state

    def train_fingerprint(self) -> dict[str, Any] | None:
        """The training split's :func:`~mocoq.data.fingerprint.dataset_fingerprint`, computed
        once per process; None until the split is loaded (it is not loaded for this)."""
        if self._train_fingerprint is None and self.train_split in self._splits:
            self._train_fingerprint = dataset_fingerprint(self._splits[self.train_split])
        return self._train_fingerprint

    def state_dict(self) -> dict[str, Any]:
        """``train_position`` (see :meth:`train_position`) and ``train_fingerprint`` (the
        training data the position refers to), each when known."""
        state: dict[str, Any] = {}
        position = self.train_position()
        if position:
            state["train_position"] = position
        fingerprint = self.train_fingerprint() or self._saved_fingerprint
        if fingerprint is not None:
            state["train_fingerprint"] = dict(fingerprint)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the training position; the saved fingerprint is compared with the data
        when the training loader is built (:meth:`train_dataloader`, which Lightning calls after
        this on resume). Checkpoints without one (older ones) are not checked."""
        self._resume_position = state_dict.get("train_position")
        saved = state_dict.get("train_fingerprint")
        self._saved_fingerprint = dict(saved) if isinstance(saved, dict) else None

    def _warn_if_data_changed(self) -> None:
        """Warn (:class:`~mocoq.data.fingerprint.DataChangedWarning`, once, from rank 0) when
        the training split differs from the one the restored checkpoint was written with."""
        saved, self._saved_fingerprint = self._saved_fingerprint, None
        current = self.train_fingerprint()
        if saved is None or current is None:
            return
        change = describe_change(saved, current)
        if change is not None:
            rank_zero_warn(
                f"resuming on changed data: {change}. The resumed run continues the "
                "checkpoint's order and its position within the epoch on the new data, so the "
                "rest of this epoch may not line up with what was trained (images repeated or "
                "skipped); training goes on.",
                category=DataChangedWarning,
            )

    def _check_sampler_not_replaced(self) -> None:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "trainer.use_distributed_sampler must be false: mocoq's training loader gives each "
                "rank its share of the global batch itself (set trainer.use_distributed_sampler="
                "false, as conf/trainer/*.yaml do)"
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the samples the trainer takes, so that a checkpoint knows where the epoch is."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_sampler is not None:
            targets = batch.targets if isinstance(batch, ImageBatch) else batch[1]
            self._train_sampler.advance(len(targets) * world_size())
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment a batch of raw training images on the device they were moved to.

        :class:`ImageBatch` (uint8 images (N, C, H, W), targets (N,), seed) becomes
        ``((view_a, view_b), targets)`` with views (N, C, S, S), drawn from a generator seeded
        with the batch's seed (a function of the run seed, the epoch and the batch's place in
        it), so a resumed run draws the same views. With ``clean_view`` the clean view
        (``eval_transform`` of the whole batch, (N, C, S, S)) follows the two views. Other batches
        pass through.
        """
        if isinstance(batch, ImageBatch) and self.batched_augment is not None:
            generator = torch.Generator(device=batch.images.device).manual_seed(batch.seed)
            views: tuple[Tensor, ...] = self.batched_augment(batch.images, generator)
            if self.clean_view:
                views = (*views, self.eval_transform(batch.images))
            return views, batch.targets
        return batch

    def clean_dataloader(self, split: str) -> DataLoader[Any]:
        """Un-augmented images of ``split``: batches ``(images (N, C, S, S), targets (N,))``."""
        return DataLoader(
            TransformedDataset(self.split(split), self.eval_transform),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=ignore_job_signals,
        )

    def knn_bank_dataloader(self) -> DataLoader[Any] | None:
        return None if self.bank_split is None else self.clean_dataloader(self.bank_split)

    def knn_val_dataloader(self) -> DataLoader[Any] | None:
        return None if self.val_split is None else self.clean_dataloader(self.val_split)
