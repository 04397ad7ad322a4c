"""STL-10 from the official binary archive ``stl10_binary.tar.gz``.

The archive unpacks to ``stl10_binary/`` with ``{train,test,unlabeled}_X.bin`` (raw uint8 images,
each 3x96x96 stored channel by channel, each channel column-major), ``{train,test}_y.bin`` (one
uint8 label in 1..10 per image) and ``class_names.txt`` (one name per line).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from mocoq.data.datasets import ArrayImageDataset, DatasetNotFoundError

STL10_DIR = "stl10_binary"
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
_IMAGE_SHAPE = (3, 96, 96)
_IMAGE_BYTES = 3 * 96 * 96
# (images file, labels file or None for unlabelled) for each part of a split, in order.
_SPLITS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "train": (("train_X.bin", "train_y.bin"),),
    "test": (("test_X.bin", "test_y.bin"),),
    "unlabeled": (("unlabeled_X.bin", None),),
    "train+unlabeled": (("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)),
}
_ALL_FILES = (
    "train_X.bin",
    "train_y.bin",
    "test_X.bin",
    "test_y.bin",
    "unlabeled_X.bin",
    "class_names.txt",
)


def _data_dir(root: Path) -> Path:
    """``root/stl10_binary``, or ``root`` itself when it already is that folder."""
    nested = root / STL10_DIR
    if not nested.is_dir() and any((root / name).is_file() for name in _ALL_FILES):
        return root
    return nested


def _map_images(path: Path) -> Tensor:
    """The images of an X file as a (N, 3, 96, 96) uint8 view, rows and columns still swapped.

    The file is memory-mapped (copy-on-write, so the file is never modified) rather than read:
    the caller's transpose then makes the only in-memory copy, which matters for the 2.7 GB
    ``unlabeled_X.bin``.
    """
    size = path.stat().st_size
    if size == 0 or size % _IMAGE_BYTES:
        raise ValueError(
            f"{path} holds {size} bytes, not a positive multiple of 3*96*96 = {_IMAGE_BYTES}: "
            "the file is truncated or not an STL-10 image file; extract it again from "
            f"{STL10_URL}"
        )
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return data.view(-1, *_IMAGE_SHAPE)


def _read_labels(path: Path, count: int) -> Tensor:
    """Labels (count,) int64 in 0..9 from a y file holding 1..10."""
    labels = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    if labels.numel() != count:
        raise ValueError(
            f"{path} holds {labels.numel()} labels but its images file holds {count} images"
        )
    if count and (int(labels.min()) < 1 or int(labels.max()) > len(STL10_CLASSES)):
        raise ValueError(
            f"{path}: labels must lie in 1..{len(STL10_CLASSES)}, "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    return labels - 1


def _read_class_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        # The names are fixed by the dataset; the file only restates them.
        return STL10_CLASSES
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    names = tuple(line for line in lines if line)
    if len(names) != len(STL10_CLASSES):
        raise ValueError(f"{path} lists {len(names)} class names, STL-10 has {len(STL10_CLASSES)}")
    return names


def stl10(root: str | os.PathLike[str] | None, split: str = "train") -> ArrayImageDataset:
    """STL-10 as 3-channel 96x96 uint8 images: ``images`` (N, 3, 96, 96), ``targets`` (N,).

    Args:
        root: folder holding ``stl10_binary/``, or that folder itself.
        split: ``train`` (5,000 labelled images), ``test`` (8,000), ``unlabeled`` (100,000,
            targets -1) or ``train+unlabeled`` (the 105,000 of both, train first).

    The whole split is loaded into memory (about 2.9 GB for ``train+unlabeled``).
    """
    if split not in _SPLITS:
        raise ValueError(f"STL-10 has splits {', '.join(map(repr, _SPLITS))}, not {split!r}")
    if not root:
        raise DatasetNotFoundError(
            f"STL-10 needs a root folder: set dataset.root=<dir> to the folder that holds "
            f"{STL10_DIR}/ (extracted from {STL10_URL})"
        )
    base = Path(root).expanduser()
    directory = _data_dir(base)
    needed = [directory / name for part in _SPLITS[split] for name in part if name is not None]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"STL-10 {split} files not found under {base}: expected {', '.join(missing)}; "
            f"download {STL10_URL} and extract it into {base}, "
            "or set dataset.root=<dir> to the folder that holds it"
        )

    parts, targets = [], []
    for images_name, labels_name in _SPLITS[split]:
        images = _map_images(directory / images_name)
        if labels_name is None:
            targets.append(torch.full((images.shape[0],), -1, dtype=torch.long))
        else:
            targets.append(_read_labels(directory / labels_name, images.shape[0]))
        # The files store each channel column-major; swapping the last two axes gives (H, W).
        parts.append(images.transpose(2, 3))
    # One cat both applies the transpose and materialises the result, so there is a single copy.
    return ArrayImageDataset(
        torch.cat(parts).contiguous(),
        torch.cat(targets),
        _read_class_names(directory / "class_names.txt"),
    )
