"""Datasets read from folders of image files, decoded one file per item.

A folder either holds one subfolder per class (searched recursively) or holds all its images
directly (unlabelled, target ``-1``). Files are decoded with :func:`torchvision.io.decode_image`
(JPEG, PNG, WebP); formats it does not read (BMP, TIFF, PPM, PGM) fall back to Pillow.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from mocoq.data.datasets import DatasetNotFoundError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)
_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS)
IMAGENET_SPLITS = ("train", "val")


class CorruptImageError(ValueError):
    """An image file could not be decoded; the message names the file."""


def _is_image(name: str) -> bool:
    # Names starting with "." are skipped: macOS leaves "._photo.jpg" metadata files next to the
    # real ones, which carry an image extension but are not images.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _EXTENSIONS


def _walk_images(directory: str) -> list[str]:
    """Image files under ``directory`` (recursive), in the order torchvision's ImageFolder uses."""
    found: list[tuple[str, str]] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        # Links are followed because datasets are often assembled from symlinked folders; the
        # visited set stops a link back to an ancestor from looping forever.
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend((dirpath, name) for name in filenames if _is_image(name))
    found.sort()
    return [os.path.join(dirpath, name) for dirpath, name in found]


def _scan(root: Path) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    """``(samples, classes)`` for ``root``; see :class:`ImageFolderDataset` for the layouts."""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} not found: expected a folder of images ({_EXTENSIONS_TEXT}), "
            "either directly in it or in one subfolder per class; set dataset.root=<dir>"
        )
    top_images: list[str] = []
    subfolders: list[str] = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(entry.name)
            elif entry.is_file() and _is_image(entry.name):
                top_images.append(entry.path)
    class_files = {name: _walk_images(str(root / name)) for name in sorted(subfolders)}

    if any(class_files.values()):
        if top_images:
            raise ValueError(
                f"{root} mixes images at its top level (e.g. {sorted(top_images)[0]}) with class "
                "subfolders of images: put every image in a class subfolder (labelled), or all "
                "images directly in the folder with no image subfolders (unlabelled)"
            )
        empty = [name for name, files in class_files.items() if not files]
        if empty:
            # Dropping an empty class would shift the indices of the classes after it, so that
            # splits with the same class folders would disagree on labels.
            raise ValueError(
                f"class folders under {root} hold no images ({_EXTENSIONS_TEXT}): "
                f"{', '.join(empty)}; add images to them or remove them"
            )
        classes = tuple(class_files)
        samples = [
            (path, index) for index, name in enumerate(classes) for path in class_files[name]
        ]
        return samples, classes
    if top_images:
        return [(path, -1) for path in sorted(top_images)], ()
    raise DatasetNotFoundError(
        f"no images found under {root}: expected files with extensions {_EXTENSIONS_TEXT} "
        "(any case), either directly in it or in one subfolder per class; "
        "set dataset.root=<dir> to a folder of images"
    )


def _decode_with_pillow(data: bytearray, path: str, channels: int, cause: Exception) -> Tensor:
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB" if channels == 3 else "L"))
    # Pillow signals bad files with several unrelated exception types (OSError, SyntaxError,
    # ValueError, DecompressionBombError, ...); all of them mean the file cannot be used.
    except Exception as error:
        raise CorruptImageError(
            f"cannot decode image file {path}: torchvision: {cause}; Pillow: {error}"
        ) from error
    tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1).contiguous() if tensor.dim() == 3 else tensor.unsqueeze(0)


def decode_image_file(path: str, channels: int = 3) -> Tensor:
    """Decode one image file to uint8 (channels, H, W); ``channels`` is 3 (RGB) or 1 (gray).

    Raises:
        CorruptImageError: the file is empty or cannot be decoded; the message names it.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    if not data:
        raise CorruptImageError(f"cannot decode image file {path}: it is empty")
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        image = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode)
    except RuntimeError as error:
        return _decode_with_pillow(data, path, channels, error)
    if image.dtype != torch.uint8:
        # 16-bit PNGs decode to uint16; keep the high byte, as an 8-bit rendering would.
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """Images read from a folder, one file per item: yields ``(uint8 (C, H, W), target)``.

    Layouts:

    * ``root/<class>/**/<image>``: each subfolder (sorted by name) is a class and every image
      below it, at any depth, is an item of that class. Items are ordered as in torchvision's
      ``ImageFolder``, so indices agree with it.
    * ``root/<image>``: all images directly in ``root``, unlabelled (target ``-1``, no classes).

    Images are recognised by extension (:data:`IMAGE_EXTENSIONS`, any case); other files and
    names starting with ``.`` are ignored. Images in ``root`` next to class subfolders, or a class
    subfolder without images, raise :class:`ValueError`.

    Args:
        root: the folder.
        channels: 3 decodes to RGB, 1 to grayscale, whatever the file holds.

    Attributes:
        samples: ``(path, target)`` per item.
        classes: class names (the subfolder names), index-aligned with the targets.
        targets: int64 tensor (N,).
        channels: channels of every image.

    Raises:
        DatasetNotFoundError: ``root`` is missing or holds no images.
    """

    def __init__(self, root: str | os.PathLike[str], channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.root = Path(root).expanduser()
        self.channels = channels
        self.samples, self.classes = _scan(self.root)
        self.targets = torch.tensor([target for _, target in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.samples[index]
        return decode_image_file(path, self.channels), target


def image_folder(
    root: str | os.PathLike[str] | None, split: str = "train", channels: int = 3
) -> ImageFolderDataset:
    """A folder of images as an :class:`ImageFolderDataset`, uint8 (channels, H, W) per item.

    ``root/<split>`` is used when it is a folder; otherwise the ``train`` split is ``root``
    itself, so a single folder of images needs no ``train/`` level.

    Args:
        root: the folder (required).
        split: a subfolder name of ``root``, e.g. ``train`` or ``val``.
        channels: 3 (RGB) or 1 (grayscale).
    """
    if not root:
        raise DatasetNotFoundError(
            "image_folder needs a root folder: set dataset.root=<dir> to a folder of images "
            "(one subfolder per class, or all images directly in it), optionally split into "
            "<dir>/train, <dir>/val, ..."
        )
    if not split or split in (".", "..") or os.path.basename(split) != split:
        raise ValueError(f"split must be the name of a subfolder of the root, got {split!r}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(
            f"image folder {base} not found: set dataset.root=<dir> to a folder of images"
        )
    directory = base / split
    if directory.is_dir():
        return ImageFolderDataset(directory, channels)
    if split == "train":
        return ImageFolderDataset(base, channels)
    raise DatasetNotFoundError(
        f"image folder split {split!r} not found: expected a folder {directory}; create it, "
        "or choose another split, or set dataset.root=<dir>"
    )


def _class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def imagenet(root: str | os.PathLike[str] | None, split: str = "train") -> ImageFolderDataset:
    """ImageNet (ILSVRC-2012) in its usual folder layout, RGB uint8 (3, H, W) per item.

    Expects ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: the validation images
    must be sorted into class folders. Classes are the wnids, sorted (the torchvision indices).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``train`` or ``val``.
    """
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"ImageNet has splits 'train' and 'val', not {split!r}")
    if not root:
        raise DatasetNotFoundError(
            "ImageNet needs a root folder: set dataset.root=<dir> to the folder holding "
            "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG"
        )
    base = Path(root).expanduser()
    directory = base / split
    if split == "train":
        how = (
            "extract ILSVRC2012_img_train.tar there and each of its per-class tars into its own "
            "<wnid>/ folder"
        )
    else:
        how = (
            "extract ILSVRC2012_img_val.tar there and sort the images into <wnid>/ class "
            "folders (e.g. with the standard valprep.sh script)"
        )
    if not directory.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet {split} images not found: expected {directory}/<wnid>/*.JPEG; {how}, "
            "or set dataset.root=<dir>"
        )
    with os.scandir(directory) as entries:
        flat = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    if flat:
        raise DatasetNotFoundError(
            f"ImageNet {split} images must be in class folders {directory}/<wnid>/, but "
            f"{len(flat)} images lie directly in {directory} (e.g. {flat[0]}): {how}"
        )
    dataset = ImageFolderDataset(directory)
    train_directory = base / "train"
    if split == "val" and train_directory.is_dir():
        train_classes = _class_folders(train_directory)
        if tuple(train_classes) != dataset.classes:
            only_val = sorted(set(dataset.classes) - set(train_classes))
            only_train = sorted(set(train_classes) - set(dataset.classes))
            raise ValueError(
                f"ImageNet class folders differ between {train_directory} and {directory} "
                f"({len(only_train)} only in train, e.g. {only_train[:3]}; {len(only_val)} only "
                f"in val, e.g. {only_val[:3]}), so their class indices would not match"
            )
    return dataset
