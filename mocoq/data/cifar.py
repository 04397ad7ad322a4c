"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

The archives unpack to ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
``test_batch``, ``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``). Each
data file is a pickle holding ``b"data"``, a uint8 array (N, 3072) whose rows are the R, G and B
planes of a 32x32 image, each plane row-major, and the labels as a list of ints.

The files are pickles, so only load archives from a trusted source.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocoq.data.datasets import ArrayImageDataset, DatasetNotFoundError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_IMAGE_BYTES = 3 * 32 * 32
_SPLITS = ("train", "test")


def _check_split(name: str, split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"{name} has splits 'train' and 'test', not {split!r}")


def _data_dir(
    name: str, root: str | os.PathLike[str] | None, folder: str, probe: str, url: str
) -> tuple[Path, Path]:
    """``(root, data folder)``: the data folder is ``root/folder``, or ``root`` if it holds them."""
    if not root:
        raise DatasetNotFoundError(
            f"{name} needs a root folder: set dataset.root=<dir> to the folder that holds "
            f"{folder}/ (extracted from {url})"
        )
    base = Path(root).expanduser()
    nested = base / folder
    if not nested.is_dir() and (base / probe).is_file():
        return base, base
    return base, nested


def _require(name: str, base: Path, directory: Path, files: Sequence[str], url: str) -> list[Path]:
    paths = [directory / file for file in files]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} files not found under {base}: expected {', '.join(missing)}; "
            f"download {url} and extract it into {base}, "
            "or set dataset.root=<dir> to the folder that holds it"
        )
    return paths


def _unpickle(path: Path) -> dict[bytes, Any]:
    with path.open("rb") as handle:
        # The official files were written by Python 2; "bytes" keeps their str keys and values
        # as bytes instead of guessing a text encoding.
        content = pickle.load(handle, encoding="bytes")
    if not isinstance(content, dict):
        raise ValueError(f"{path} is not a CIFAR pickle: expected a dict, got {type(content)}")
    return content


def _field(content: dict[bytes, Any], key: bytes, path: Path) -> Any:
    if key not in content:
        raise ValueError(f"{path} has no {key!r} entry (found {sorted(content)})")
    return content[key]


def _read_batches(paths: Sequence[Path], label_key: bytes, num_classes: int) -> tuple[Any, Any]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 as numpy arrays, batches concatenated."""
    images, labels = [], []
    for path in paths:
        content = _unpickle(path)
        data = np.asarray(_field(content, b"data", path))
        batch_labels = np.asarray(_field(content, label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
            raise ValueError(
                f"{path}: b'data' must be a uint8 array (N, {_IMAGE_BYTES}), "
                f"got {data.dtype} {data.shape}"
            )
        if batch_labels.shape != (data.shape[0],):
            raise ValueError(
                f"{path}: {data.shape[0]} images but {batch_labels.shape[0]} labels "
                f"in {label_key!r}"
            )
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise ValueError(
                f"{path}: labels must lie in [0, {num_classes}), "
                f"got [{batch_labels.min()}, {batch_labels.max()}]"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _class_names(meta_path: Path, key: bytes) -> list[str]:
    names = _field(_unpickle(meta_path), key, meta_path)
    return [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]


def _load(
    name: str,
    root: str | os.PathLike[str] | None,
    folder: str,
    data_files: Sequence[str],
    meta_file: str,
    label_key: bytes,
    names_key: bytes,
    url: str,
) -> ArrayImageDataset:
    base, directory = _data_dir(name, root, folder, meta_file, url)
    *data_paths, meta_path = _require(name, base, directory, [*data_files, meta_file], url)
    classes = _class_names(meta_path, names_key)
    images, labels = _read_batches(data_paths, label_key, len(classes))
    return ArrayImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes)


def cifar10(root: str | os.PathLike[str] | None, split: str = "train") -> ArrayImageDataset:
    """CIFAR-10 as 3-channel 32x32 uint8 images: ``images`` (N, 3, 32, 32), ``targets`` (N,).

    Args:
        root: folder holding ``cifar-10-batches-py/``, or that folder itself.
        split: ``train`` (``data_batch_1`` .. ``data_batch_5``, 50,000 images) or ``test``
            (``test_batch``, 10,000 images).
    """
    _check_split("CIFAR-10", split)
    if split == "train":
        data_files = [f"data_batch_{index}" for index in range(1, 6)]
    else:
        data_files = ["test_batch"]
    return _load(
        "CIFAR-10",
        root,
        CIFAR10_DIR,
        data_files,
        "batches.meta",
        b"labels",
        b"label_names",
        CIFAR10_URL,
    )


def cifar100(root: str | os.PathLike[str] | None, split: str = "train") -> ArrayImageDataset:
    """CIFAR-100 with its 100 fine labels: ``images`` (N, 3, 32, 32) uint8, ``targets`` (N,).

    Args:
        root: folder holding ``cifar-100-python/``, or that folder itself.
        split: ``train`` (50,000 images) or ``test`` (10,000 images).
    """
    _check_split("CIFAR-100", split)
    return _load(
        "CIFAR-100",
        root,
        CIFAR100_DIR,
        [split],
        "meta",
        b"fine_labels",
        b"fine_label_names",
        CIFAR100_URL,
    )
