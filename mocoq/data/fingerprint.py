"""A cheap fingerprint of a dataset, so that a resumed run notices data changed on disk.

A checkpoint records where in the epoch training stood (:mod:`mocoq.data.sampling`); that
position means something only for the data it was written with. The data module saves the
training split's fingerprint next to the position and, on resume, compares it with the data it
has loaded now (:func:`describe_change`), warning with :class:`DataChangedWarning`.

The fingerprint is computed once per process and costs milliseconds for the in-memory splits
(Fashion-MNIST's 60,000 training images: 5-15 ms on a busy 2-core CPU, where hashing all 47 MB
takes about 190 ms), and less than the folder scan that listed the files for folder datasets
(about a second for ImageNet's 1.28 million paths). It samples: a change outside the sampled
part (a pixel of an image that is not sampled, a file rewritten with the same size) goes
unnoticed. A changed image count is always noticed.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from typing import Any, TypeGuard

import torch
from torch import Tensor

# Bump when the digest is computed differently: fingerprints of another scheme are compared by
# count only, so that a new mocoq version does not report unchanged data as changed.
SCHEME = 1
MAX_SAMPLED_IMAGES = 1024  # in-memory images hashed, spread evenly over the split
MAX_SAMPLED_BYTES = 8 * 2**20  # ... and at most this many bytes of them
MAX_STATTED_FILES = 1024  # files of a folder dataset whose size is read, spread evenly


class DataChangedWarning(UserWarning):
    """The training data differs from the data a resumed checkpoint was written with."""


def spread(count: int, samples: int) -> list[int]:
    """``min(count, samples)`` indices in ``[0, count)`` spread evenly, first and last included."""
    taken = min(count, samples)
    if taken <= 0:
        return []
    if taken == 1:
        return [0]
    return [(i * (count - 1)) // (taken - 1) for i in range(taken)]


def _length(dataset: object) -> int | None:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _tensor_digest(images: Tensor, targets: Tensor) -> str:
    """Hash of the shape, dtype, all targets and an evenly spread sample of the images.

    Args:
        images: (N, ...) of any dtype, e.g. uint8 (N, C, H, W).
        targets: (N,).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(images.shape)} {images.dtype} {targets.dtype}".encode())
    digest.update(targets.detach().cpu().contiguous().numpy().tobytes())
    count = int(images.shape[0])
    per_image = max(1, images[:1].numel() * images.element_size())
    budget = max(1, min(MAX_SAMPLED_IMAGES, MAX_SAMPLED_BYTES // per_image))
    indices = torch.tensor(spread(count, budget), dtype=torch.long)
    sampled = images.detach()[indices.to(images.device)].cpu().contiguous()  # (K, ...)
    digest.update(indices.numpy().tobytes())
    digest.update(sampled.numpy().tobytes())
    return digest.hexdigest()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # removed since the scan: a size no file has
        return -1


def _is_samples_list(samples: object) -> TypeGuard[list[tuple[str, int]]]:
    """Whether ``samples`` looks like a folder dataset's list of ``(path, target)``."""
    if not isinstance(samples, list):
        return False
    first = samples[0] if samples else ("", 0)
    return isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], str)


def _folder_digest(samples: list[tuple[str, int]], root: object) -> str:
    """Hash of every item's path (relative to ``root``) and target, and of the sizes of an
    evenly spread sample of at most :data:`MAX_STATTED_FILES` files."""
    prefix = os.path.join(os.fspath(root), "") if isinstance(root, str | os.PathLike) else ""
    start = len(prefix)
    paths = [path[start:] if path.startswith(prefix) else path for path, _ in samples]
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\n".join(paths).encode("utf-8", "surrogateescape"))
    digest.update(array("q", [target for _, target in samples]).tobytes())
    sizes = [
        (index, _file_size(samples[index][0])) for index in spread(len(samples), MAX_STATTED_FILES)
    ]
    digest.update(array("q", [value for pair in sizes for value in pair]).tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset: object) -> dict[str, Any]:
    """A cheap, deterministic fingerprint: ``{"scheme", "kind", "count", "digest"}``.

    * ``kind="tensor"``: a split held in memory (an ``images`` tensor (N, ...) and a ``targets``
      tensor (N,), as :class:`mocoq.data.datasets.ArrayImageDataset` has). The digest hashes the
      shape and dtype, all N targets and an evenly spread sample of the images: at most
      :data:`MAX_SAMPLED_IMAGES` of them and :data:`MAX_SAMPLED_BYTES` bytes (1,024 for
      Fashion-MNIST or CIFAR, 303 for STL-10's 96x96 images), not the whole tensor.
    * ``kind="folder"``: a folder dataset (``samples``, a list of ``(path, target)``, and
      ``root``, as :class:`mocoq.data.folders.ImageFolderDataset` has). The digest hashes every
      item's path relative to ``root`` with its target (files added, removed, renamed or moved
      between classes), and the sizes of an evenly spread sample of at most
      :data:`MAX_STATTED_FILES` files. Stat'ing all files would cost one ``os.stat`` per item:
      1.28 million for ImageNet's training split, minutes on a network file system; hashing the
      1.28 million paths costs about a second, less than the folder scan that listed them.
      Sizes, not modification times, so that a copy of the data (to a node's local disk) is
      the same data.
    * ``kind="other"``: any other dataset: its length only, ``digest`` None.

    ``count`` is ``len(dataset)`` (None when it has no length).
    """
    count = _length(dataset)
    images, targets = getattr(dataset, "images", None), getattr(dataset, "targets", None)
    if (
        isinstance(images, Tensor)
        and isinstance(targets, Tensor)
        and images.dim() >= 1
        and targets.shape == images.shape[:1]
    ):
        kind, digest = "tensor", _tensor_digest(images, targets)
        count = int(images.shape[0])
    elif _is_samples_list(samples := getattr(dataset, "samples", None)):
        kind, digest = "folder", _folder_digest(samples, getattr(dataset, "root", None))
        count = len(samples)
    else:
        kind, digest = "other", None
    return {"scheme": SCHEME, "kind": kind, "count": count, "digest": digest}


def describe_change(
    saved: dict[str, Any], current: dict[str, Any], split: str = "training"
) -> str | None:
    """One line saying how the data differs from the data the checkpoint was written with.

    ``saved`` and ``current`` are :func:`dataset_fingerprint` results (``saved`` read back from
    a checkpoint). None when they agree, or when they cannot be compared beyond the count
    (another kind of dataset or fingerprint scheme, or no digest) and the counts agree.
    """
    before, now = saved.get("count"), current.get("count")
    if isinstance(before, int) and isinstance(now, int) and before != now:
        return (
            f"the {split} split has {now:,} images now, {before:,} when the checkpoint was written"
        )
    comparable = (
        saved.get("scheme") == current.get("scheme")
        and saved.get("kind") == current.get("kind")
        and saved.get("digest") is not None
        and current.get("digest") is not None
    )
    if comparable and saved["digest"] != current["digest"]:
        return (
            f"the {split} split's images differ from those the checkpoint was trained on "
            "(same count, different fingerprint)"
        )
    return None
