"""Image sources: every dataset yields ``(image, target)`` with ``image`` a uint8 tensor (C, H, W).

Two kinds of source exist:

* :class:`ArrayImageDataset` holds a whole split in memory as one uint8 tensor (N, C, H, W)
  (Fashion-MNIST, CIFAR-10/100, STL-10, synthetic). Its ``images`` and ``targets`` attributes
  are public so that fast paths (batched augmentation, raw-pixel baselines) can use them.
* folder datasets (``image_folder``, ``imagenet``, in :mod:`mocoq.data.folders`) decode one file
  per item.

Unlabelled items have target ``-1``. Every loader has the signature ``loader(root, split, **opts)``
and raises :class:`DatasetNotFoundError` with a message naming the path and how to fix it.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CACHE_ROOT = Path("~/.cache/mocoq/FashionMNIST").expanduser()
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says where they were looked for and what to do."""


class ArrayImageDataset(Dataset[tuple[Tensor, int]]):
    """A split held in memory.

    Args:
        images: uint8 tensor (N, C, H, W).
        targets: int64 tensor (N,); ``-1`` marks unlabelled items.
        classes: class names, index-aligned with the targets.
    """

    def __init__(self, images: Tensor, targets: Tensor, classes: Sequence[str] = ()) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                "images must be a uint8 tensor (N, C, H, W), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must have shape ({images.shape[0]},) to match the images, "
                f"got {tuple(targets.shape)}"
            )
        self.images = images.contiguous()
        self.targets = targets.long()
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


def _read_idx(path: Path) -> Tensor:
    """Read an IDX file (optionally gzipped) as used by MNIST-style datasets."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = data[4 + 4 * ndim :]
    expected = 1
    for size in shape:
        expected *= size
    if len(payload) != expected:
        raise ValueError(f"{path} is truncated: expected {expected} bytes, found {len(payload)}")
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (
        root / stem,
        root / f"{stem}.gz",
        root / "raw" / stem,
        root / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist_root(root: str | os.PathLike[str] | None) -> Path:
    """Where Fashion-MNIST lives: ``root`` if given, else the Debian package's folder, else
    ``~/.cache/mocoq/FashionMNIST`` (where ``make data`` downloads it without the package)."""
    if root:
        return Path(root).expanduser()
    if _find_idx(FASHION_MNIST_DEBIAN_ROOT, "train-images-idx3-ubyte") is None and _find_idx(
        FASHION_MNIST_CACHE_ROOT, "train-images-idx3-ubyte"
    ):
        return FASHION_MNIST_CACHE_ROOT
    return FASHION_MNIST_DEBIAN_ROOT


def fashion_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "train", download: bool = False
) -> ArrayImageDataset:
    """Fashion-MNIST as 1-channel 28x28 uint8 images.

    ``root`` holds the four IDX files (gzipped or not, directly or under ``raw/``), as installed
    by the Debian package ``dataset-fashion-mnist`` (the default root,
    ``/usr/share/datasets/fashion-mnist``) or by torchvision's download (``root=None`` also
    looks in ``~/.cache/mocoq/FashionMNIST``). With ``download=True`` missing files are fetched
    with torchvision into ``root``.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000).
    """
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    base = fashion_mnist_root(root)
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(base, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(base, f"{prefix}-labels-idx1-ubyte")
    if (images_path is None or labels_path is None) and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(base), train=split == "train", download=True)
        base = base / "FashionMNIST"  # torchvision writes <root>/FashionMNIST/raw/
        images_path = _find_idx(base, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(base, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files not found under {base}: install them with "
            "'apt-get install dataset-fashion-mnist' (puts them in "
            f"{FASHION_MNIST_DEBIAN_ROOT}), run 'make data', or set dataset.root=<dir> and "
            "dataset.loader.download=true to fetch them with torchvision"
        )
    images = _read_idx(images_path).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    targets = _read_idx(labels_path).long()
    return ArrayImageDataset(images, targets, FASHION_MNIST_CLASSES)


def synthetic(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    num_samples: int = 512,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> ArrayImageDataset:
    """Learnable synthetic images: each class is a fixed random low-frequency pattern plus noise.

    Different splits draw different samples of the same classes, so kNN on ``test`` against a
    ``train`` bank is meaningful. ``root`` is ignored (present for the common loader signature).
    """
    if split not in ("train", "test", "unlabeled"):
        raise ValueError(f"synthetic has splits 'train', 'test' and 'unlabeled', not {split!r}")
    if num_samples < 1 or image_size < 1 or channels < 1 or num_classes < 1:
        raise ValueError(
            "synthetic needs positive num_samples, image_size, channels and num_classes, got "
            f"{num_samples}, {image_size}, {channels}, {num_classes}"
        )
    class_gen = torch.Generator().manual_seed(seed)
    coarse = max(2, image_size // 4)
    # One smooth prototype per class: (num_classes, C, coarse, coarse) upsampled to (.., S, S).
    prototypes = torch.rand(num_classes, channels, coarse, coarse, generator=class_gen)
    prototypes = torch.nn.functional.interpolate(
        prototypes, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    split_offset = {"train": 1, "test": 2, "unlabeled": 3}[split]
    sample_gen = torch.Generator().manual_seed(seed * 1000 + split_offset)
    targets = torch.randint(num_classes, (num_samples,), generator=sample_gen)
    noise = 0.15 * torch.randn(num_samples, channels, image_size, image_size, generator=sample_gen)
    images = (prototypes[targets] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    if split == "unlabeled":
        targets = torch.full_like(targets, -1)
    return ArrayImageDataset(images, targets, [f"class_{i}" for i in range(num_classes)])
