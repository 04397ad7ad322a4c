"""The LightningDataModule: a two-view training loader and clean loaders for the kNN monitor."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mocoq.data.transforms import EvalTransform

ImageDataset = Dataset[tuple[Tensor, int]]
Loader = Callable[..., ImageDataset]
AugmentFactory = Callable[..., Callable[[Tensor], Any]]


class TransformedDataset(Dataset[tuple[Any, int]]):
    """Applies ``transform`` to the image of every ``(image, target)`` item of ``base``."""

    def __init__(self, base: ImageDataset, transform: Callable[[Tensor], Any]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.base[index]
        return self.transform(image), target


class MoCoDataModule(pl.LightningDataModule):
    """Loads one dataset's splits and serves MoCo's loaders.

    * ``train_dataloader``: batches ``((view_a, view_b), targets)``, each view (N, C, S, S),
      shuffled, ``drop_last`` so every step has the same batch size.
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
        self._splits: dict[str, ImageDataset] = {}

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

    def _loader(self, dataset: Dataset[Any], batch_size: int, train: bool) -> DataLoader[Any]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=train and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader[Any]:
        """Two augmented views per image: batches ``((view_a, view_b), targets)``."""
        dataset = TransformedDataset(self.split(self.train_split), self.augment)
        return self._loader(dataset, self.batch_size, train=True)

    def clean_dataloader(self, split: str) -> DataLoader[Any]:
        """Un-augmented images of ``split``: batches ``(images (N, C, S, S), targets (N,))``."""
        dataset = TransformedDataset(self.split(split), self.eval_transform)
        return self._loader(dataset, self.eval_batch_size, train=False)

    def knn_bank_dataloader(self) -> DataLoader[Any] | None:
        return None if self.bank_split is None else self.clean_dataloader(self.bank_split)

    def knn_val_dataloader(self) -> DataLoader[Any] | None:
        return None if self.val_split is None else self.clean_dataloader(self.val_split)
