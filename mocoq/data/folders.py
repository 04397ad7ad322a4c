"""Datasets read from folders of image files, decoded one file per item.

A folder either holds one subfolder per class (searched recursively) or holds all its images
directly (unlabelled, target ``-1``). Files are decoded with :func:`torchvision.io.decode_image`
(JPEG, PNG, WebP); formats it does not read (BMP, TIFF, PPM, PGM) fall back to Pillow.

A file that cannot be read or decoded stops the run (``on_bad_image="fail"``) or is left out
(``on_bad_image="skip"``): see :class:`ImageFolderDataset`.
"""

from __future__ import annotations

import io
import logging
import os
import re
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
ON_BAD_IMAGE_CHOICES = ("fail", "skip")
# The config key of ``on_bad_image``, as the messages tell the user to set it.
ON_BAD_IMAGE_KEY = "dataset.loader.on_bad_image"
# With on_bad_image="skip", the first _WARN_EACH bad files met by a process are each logged as a
# warning; later ones only when the count reaches a power of two (the rest at DEBUG level), so a
# folder with thousands of bad files does not flood the log once per worker.
_WARN_EACH = 20
_NAMES_SHOWN = 5

log = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image file could not be read or decoded; the message (one line) names the file."""


def check_on_bad_image(on_bad_image: str) -> str:
    """``on_bad_image`` if it is ``"fail"`` or ``"skip"``, else :class:`ValueError`."""
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        raise ValueError(
            f"{ON_BAD_IMAGE_KEY} must be 'fail' (stop at an unreadable image file) or 'skip' "
            f"(leave such files out), got {on_bad_image!r}"
        )
    return on_bad_image


def _one_line(error: BaseException) -> str:
    """``error``'s message on one line, without torchvision's C++ source location or Pillow's
    in-memory file object (which differs on every call)."""
    text = " ".join(str(error).split())
    text = re.sub(r"^\S+, \S+\.cpp:\d+, ", "", text)  # "decode_jpeg, /.../decode_jpeg.cpp:171, "
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text) or type(error).__name__


def _names(paths: list[str]) -> str:
    """The first few of ``paths``, and how many more."""
    shown = ", ".join(paths[:_NAMES_SHOWN])
    return shown if len(paths) <= _NAMES_SHOWN else f"{shown}, ... ({len(paths)} in all)"


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
            f"cannot decode image file {path}: torchvision: {_one_line(cause)}; "
            f"Pillow: {_one_line(error)}"
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

    Bad files. Files are decoded when an item is read (usually in DataLoader worker processes),
    so a corrupt file is only found then. With ``on_bad_image="fail"`` reading it raises
    :class:`CorruptImageError` naming the file. With ``"skip"`` the item is replaced by the next
    index (wrapping around) whose file decodes, with that file's target, so every index yields
    an item, the same one every time; the bad file is recorded in :attr:`skipped_files` and
    logged (logger ``mocoq.data.folders``) the first time this process meets it, with the number
    met so far. Each worker process keeps its own record, so counts and :attr:`skipped_files` are
    per process. A file that cannot be read (an :class:`OSError`) counts as bad too.

    With ``check_empty_files``, construction also finds empty (0-byte) files from their size,
    without decoding anything: ``"fail"`` refuses them (naming the first few), ``"skip"`` drops
    them from :attr:`samples` (kept in :attr:`empty_files`) and logs how many. Classes are kept
    even if all their files are dropped, so label indices do not change.

    Args:
        root: the folder.
        channels: 3 decodes to RGB, 1 to grayscale, whatever the file holds.
        on_bad_image: ``"fail"`` or ``"skip"`` (see above).
        check_empty_files: stat every file once at construction to find empty ones (a few
            seconds per million files on a local disk; slower on some network filesystems).

    Attributes:
        samples: ``(path, target)`` per item.
        classes: class names (the subfolder names), index-aligned with the targets.
        targets: int64 tensor (N,).
        channels: channels of every image.
        on_bad_image: ``"fail"`` or ``"skip"``.
        empty_files: paths of the empty files left out of :attr:`samples` (``"skip"`` only).

    Raises:
        DatasetNotFoundError: ``root`` is missing or holds no images.
        CorruptImageError: ``"fail"`` and empty files, or ``"skip"`` and every file empty.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        channels: int = 3,
        on_bad_image: str = "fail",
        check_empty_files: bool = True,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        self.on_bad_image = check_on_bad_image(on_bad_image)
        self.root = Path(root).expanduser()
        self.channels = channels
        self.samples, self.classes = _scan(self.root)
        self.empty_files: tuple[str, ...] = ()
        if check_empty_files:
            self._leave_out_empty_files()
        self.targets = torch.tensor([target for _, target in self.samples], dtype=torch.long)
        self._skipped: list[str] = []
        self._bad: set[str] = set()

    def _leave_out_empty_files(self) -> None:
        empty = [path for path, _ in self.samples if _is_empty(path)]
        if not empty:
            return
        what = f"{len(empty)} of the {len(self.samples)} image files under {self.root} are empty"
        if self.on_bad_image == "fail":
            raise CorruptImageError(
                f"{what} (0 bytes): {_names(empty)}; fix or remove them, or set "
                f"{ON_BAD_IMAGE_KEY}=skip to leave such files out"
            )
        if len(empty) == len(self.samples):
            raise CorruptImageError(
                f"every image file under {self.root} is empty (0 bytes): {_names(empty)}; "
                "there is nothing to load"
            )
        left_out = set(empty)
        self.samples = [sample for sample in self.samples if sample[0] not in left_out]
        self.empty_files = tuple(empty)
        log.warning(
            "%s (0 bytes) and left out (%s=skip): %s", what, ON_BAD_IMAGE_KEY, _names(empty)
        )

    @property
    def skipped_files(self) -> tuple[str, ...]:
        """Paths of the bad files this process has met and skipped, in the order met.

        Per process: each DataLoader worker has its own copy of the dataset, so this lists
        only what the process calling it read. Empty files dropped at construction are in
        :attr:`empty_files` instead.
        """
        return tuple(self._skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Item ``index``: ``(uint8 (channels, H, W), target)``; see the class for bad files."""
        path, target = self.samples[index]
        try:
            return self._load(path), target
        except CorruptImageError as error:
            if self.on_bad_image == "fail":
                raise CorruptImageError(
                    f"{error}; fix or remove it, or set {ON_BAD_IMAGE_KEY}=skip to leave such "
                    "files out"
                ) from error
        count = len(self.samples)
        start = index % count
        for step in range(1, count):
            other_path, other_target = self.samples[(start + step) % count]
            try:
                return self._load(other_path), other_target
            except CorruptImageError:
                continue
        raise CorruptImageError(
            f"none of the {count} image files under {self.root} can be read or decoded "
            f"(e.g. {_names(self._skipped)}): check that it is a folder of images"
        )

    def _load(self, path: str) -> Tensor:
        """Decode ``path`` to uint8 (channels, H, W); a bad file raises
        :class:`CorruptImageError` and, with ``"skip"``, is recorded and logged once."""
        if path in self._bad:
            raise CorruptImageError(f"image file {path} was found bad before")
        try:
            return decode_image_file(path, self.channels)
        except CorruptImageError as error:
            reason = str(error)
            cause: Exception = error
        except OSError as error:
            reason = f"cannot read image file {path}: {_one_line(error)}"
            cause = error
        if self.on_bad_image == "fail":
            raise CorruptImageError(reason) from cause
        self._bad.add(path)
        self._skipped.append(path)
        seen = len(self._skipped)
        level = logging.WARNING if seen <= _WARN_EACH or seen & (seen - 1) == 0 else logging.DEBUG
        log.log(
            level,
            "%s; skipped (%s=skip), its items load the next good file instead; %d bad image "
            "file(s) skipped so far in this process%s",
            reason,
            ON_BAD_IMAGE_KEY,
            seen,
            "; further ones are logged at DEBUG level, and at each power of two"
            if seen == _WARN_EACH
            else "",
        )
        raise CorruptImageError(reason) from cause


def _is_empty(path: str) -> bool:
    """Whether ``path`` is a 0-byte file; a file that cannot be stat'ed is left to the decoder."""
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def image_folder(
    root: str | os.PathLike[str] | None,
    split: str = "train",
    channels: int = 3,
    on_bad_image: str = "fail",
    check_empty_files: bool = True,
) -> ImageFolderDataset:
    """A folder of images as an :class:`ImageFolderDataset`, uint8 (channels, H, W) per item.

    ``root/<split>`` is used when it is a folder; otherwise the ``train`` split is ``root``
    itself, so a single folder of images needs no ``train/`` level.

    Args:
        root: the folder (required).
        split: a subfolder name of ``root``, e.g. ``train`` or ``val``.
        channels: 3 (RGB) or 1 (grayscale).
        on_bad_image: ``"fail"`` or ``"skip"`` an unreadable image file (see
            :class:`ImageFolderDataset`).
        check_empty_files: find empty (0-byte) files at construction.
    """
    check_on_bad_image(on_bad_image)
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
        return ImageFolderDataset(directory, channels, on_bad_image, check_empty_files)
    if split == "train":
        return ImageFolderDataset(base, channels, on_bad_image, check_empty_files)
    raise DatasetNotFoundError(
        f"image folder split {split!r} not found: expected a folder {directory}; create it, "
        "or choose another split, or set dataset.root=<dir>"
    )


def _class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def imagenet(
    root: str | os.PathLike[str] | None,
    split: str = "train",
    on_bad_image: str = "fail",
    check_empty_files: bool = True,
) -> ImageFolderDataset:
    """ImageNet (ILSVRC-2012) in its usual folder layout, RGB uint8 (3, H, W) per item.

    Expects ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``: the validation images
    must be sorted into class folders. Classes are the wnids, sorted (the torchvision indices).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``train`` or ``val``.
        on_bad_image: ``"fail"`` or ``"skip"`` an unreadable image file (see
            :class:`ImageFolderDataset`).
        check_empty_files: find empty (0-byte) files at construction.
    """
    check_on_bad_image(on_bad_image)
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
    dataset = ImageFolderDataset(
        directory, on_bad_image=on_bad_image, check_empty_files=check_empty_files
    )
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
