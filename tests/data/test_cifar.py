"""CIFAR-10/100 loaders on tiny fakes written in the official "python version" layout."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mocoq.data.cifar import cifar10, cifar100
from mocoq.data.datasets import ArrayImageDataset, DatasetNotFoundError

CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]
PER_BATCH = 2
TEST_COUNT = 3
TEST_START = 100  # image numbers of the test split, so no test image equals a train image


def pixel(n: Any, c: Any, y: Any, x: Any) -> Any:
    """Value of pixel (c, y, x) of image n; y and x weigh differently so a swap would show."""
    return (n * 11 + c * 67 + y * 5 + x) % 256


def rows(start: int, count: int) -> np.ndarray:
    """(count, 3072) uint8 rows as in the official files: R, G, B planes, each row-major."""
    out = np.zeros((count, 3072), dtype=np.uint8)
    for n in range(count):
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    out[n, c * 1024 + y * 32 + x] = pixel(start + n, c, y, x)
    return out


def expected_images(start: int, count: int) -> torch.Tensor:
    n, c, y, x = torch.meshgrid(
        torch.arange(start, start + count),
        torch.arange(3),
        torch.arange(32),
        torch.arange(32),
        indexing="ij",
    )
    return pixel(n, c, y, x).to(torch.uint8)


def dump(path: Path, content: dict[bytes, Any]) -> None:
    # Protocol 2 with bytes keys, like the Python 2 pickles of the official archive.
    with path.open("wb") as handle:
        pickle.dump(content, handle, protocol=2)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for batch in range(1, 6):
        start = (batch - 1) * PER_BATCH
        dump(
            folder / f"data_batch_{batch}",
            {
                b"batch_label": f"training batch {batch} of 5".encode(),
                b"labels": [(start + n) % 10 for n in range(PER_BATCH)],
                b"data": rows(start, PER_BATCH),
                b"filenames": [f"img_{start + n}.png".encode() for n in range(PER_BATCH)],
            },
        )
    dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [9 - n for n in range(TEST_COUNT)],
            b"data": rows(TEST_START, TEST_COUNT),
            b"filenames": [f"test_{n}.png".encode() for n in range(TEST_COUNT)],
        },
    )
    dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": PER_BATCH, b"label_names": CIFAR10_NAMES, b"num_vis": 3072},
    )
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, start, fine in (("train", 0, [99, 0, 42, 7]), ("test", TEST_START, [5, 98])):
        dump(
            folder / split,
            {
                b"filenames": [f"{split}_{n}.png".encode() for n in range(len(fine))],
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [label // 5 for label in fine],
                b"data": rows(start, len(fine)),
            },
        )
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    )
    return folder


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root)
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root)
    return root


def test_rows_follow_the_official_layout() -> None:
    # Guards the fake itself: green channel, row 2, column 3 of image 0.
    assert rows(0, 1)[0, 1024 + 2 * 32 + 3] == pixel(0, 1, 2, 3)


def test_cifar10_train(cifar10_root: Path) -> None:
    dataset = cifar10(cifar10_root, "train")
    assert isinstance(dataset, ArrayImageDataset)
    assert dataset.images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert dataset.images.dtype == torch.uint8
    assert dataset.targets.dtype == torch.int64
    assert torch.equal(dataset.images, expected_images(0, 5 * PER_BATCH))
    assert int(dataset.images[3, 2, 7, 1]) == pixel(3, 2, 7, 1)
    assert int(dataset.images[3, 2, 1, 7]) == pixel(3, 2, 1, 7)
    assert dataset.targets.tolist() == [n % 10 for n in range(5 * PER_BATCH)]
    assert dataset.classes == tuple(name.decode() for name in CIFAR10_NAMES)
    assert dataset.channels == 3
    image, target = dataset[PER_BATCH + 1]  # second image of data_batch_2
    assert torch.equal(image, expected_images(PER_BATCH + 1, 1)[0])
    assert target == PER_BATCH + 1
    assert isinstance(target, int)


def test_cifar10_test(cifar10_root: Path) -> None:
    dataset = cifar10(cifar10_root, "test")
    assert len(dataset) == TEST_COUNT
    assert torch.equal(dataset.images, expected_images(TEST_START, TEST_COUNT))
    assert dataset.targets.tolist() == [9, 8, 7]


def test_cifar10_root_may_be_the_batches_folder(cifar10_root: Path) -> None:
    direct = cifar10(cifar10_root / "cifar-10-batches-py", "test")
    assert torch.equal(direct.images, cifar10(cifar10_root, "test").images)


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(folder / "data_batch_3"))):
        cifar10(tmp_path, "train")
    assert len(cifar10(tmp_path, "test")) == TEST_COUNT


def test_cifar10_missing_folder(tmp_path: Path) -> None:
    expected = re.escape(str(tmp_path / "cifar-10-batches-py" / "data_batch_1"))
    with pytest.raises(DatasetNotFoundError, match=expected) as caught:
        cifar10(tmp_path, "train")
    message = str(caught.value)
    assert "cifar-10-python.tar.gz" in message
    assert "dataset.root" in message
    assert "\n" not in message


def test_cifar10_needs_a_root() -> None:
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.root"):
        cifar10(None, "train")


def test_cifar_bad_split(cifar10_root: Path) -> None:
    with pytest.raises(ValueError, match="'train' and 'test'"):
        cifar10(cifar10_root, "val")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        cifar100(cifar10_root, "unlabeled")


def test_cifar10_malformed_batch_names_the_file(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    dump(folder / "test_batch", {b"labels": [0], b"data": np.zeros((1, 1024), dtype=np.uint8)})
    with pytest.raises(ValueError, match=re.escape(str(folder / "test_batch"))):
        cifar10(tmp_path, "test")


def test_cifar100_train_and_test(cifar100_root: Path) -> None:
    train = cifar100(cifar100_root, "train")
    assert train.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert torch.equal(train.images, expected_images(0, 4))
    assert train.targets.tolist() == [99, 0, 42, 7]
    assert len(train.classes) == 100
    assert train.classes[42] == "fine_42"
    test = cifar100(cifar100_root, "test")
    assert torch.equal(test.images, expected_images(TEST_START, 2))
    assert test.targets.tolist() == [5, 98]


def test_cifar100_root_may_be_the_python_folder(cifar100_root: Path) -> None:
    direct = cifar100(cifar100_root / "cifar-100-python", "test")
    assert direct.targets.tolist() == [5, 98]


def test_cifar100_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "cifar-100-python"))):
        cifar100(tmp_path, "test")
