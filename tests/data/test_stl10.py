"""STL-10 loader on tiny fakes written in the official binary layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mocoq.data.datasets import DatasetNotFoundError
from mocoq.data.stl10 import STL10_CLASSES, stl10

IMAGE_BYTES = 3 * 96 * 96
TRAIN_LABELS = [1, 10, 5, 3]  # as stored: 1..10
TEST_LABELS = [2, 9]
STARTS = {"train": 0, "test": 50, "unlabeled": 100}  # image numbers, distinct per split
COUNTS = {"train": 4, "test": 2, "unlabeled": 3}


def pixel(n: Any, c: Any, y: Any, x: Any) -> Any:
    """Value of pixel (c, y, x) (row y, column x) of image n; y and x weigh differently."""
    return (n * 31 + c * 7 + y + 3 * x) % 256


def column_major_bytes(start: int, count: int) -> bytes:
    """Images as the X files store them: per channel, column by column (x outer, y inner)."""
    n, c, x, y = torch.meshgrid(
        torch.arange(start, start + count),
        torch.arange(3),
        torch.arange(96),
        torch.arange(96),
        indexing="ij",
    )
    return pixel(n, c, y, x).to(torch.uint8).numpy().tobytes()


def expected_images(split: str) -> torch.Tensor:
    """(N, 3, 96, 96) with axes (image, channel, row, column)."""
    start = STARTS[split]
    n, c, y, x = torch.meshgrid(
        torch.arange(start, start + COUNTS[split]),
        torch.arange(3),
        torch.arange(96),
        torch.arange(96),
        indexing="ij",
    )
    return pixel(n, c, y, x).to(torch.uint8)


def write_stl10(root: Path) -> Path:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split in ("train", "test", "unlabeled"):
        (folder / f"{split}_X.bin").write_bytes(column_major_bytes(STARTS[split], COUNTS[split]))
    (folder / "train_y.bin").write_bytes(bytes(TRAIN_LABELS))
    (folder / "test_y.bin").write_bytes(bytes(TEST_LABELS))
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return folder


@pytest.fixture(scope="module")
def stl_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stl10")
    write_stl10(root)
    return root


def test_train_images_are_transposed_to_rows_and_columns(stl_root: Path) -> None:
    dataset = stl10(stl_root, "train")
    assert dataset.images.shape == (4, 3, 96, 96)
    assert dataset.images.dtype == torch.uint8
    assert torch.equal(dataset.images, expected_images("train"))
    # Row 0, column 1 is 3 and row 1, column 0 is 1: a missing transpose would swap them.
    assert int(dataset.images[0, 0, 0, 1]) == 3
    assert int(dataset.images[0, 0, 1, 0]) == 1
    # Byte c*96*96 + x*96 + y of the file is pixel (c, y, x).
    raw = (stl_root / "stl10_binary" / "train_X.bin").read_bytes()
    c, y, x = 2, 5, 70
    assert int(dataset.images[0, c, y, x]) == raw[c * 96 * 96 + x * 96 + y]


def test_train_labels_are_shifted_to_zero_based(stl_root: Path) -> None:
    dataset = stl10(stl_root, "train")
    assert dataset.targets.dtype == torch.int64
    assert dataset.targets.tolist() == [0, 9, 4, 2]
    assert dataset.classes == STL10_CLASSES
    image, target = dataset[1]
    assert target == 9
    assert torch.equal(image, expected_images("train")[1])


def test_test_split(stl_root: Path) -> None:
    dataset = stl10(stl_root, "test")
    assert torch.equal(dataset.images, expected_images("test"))
    assert dataset.targets.tolist() == [1, 8]


def test_unlabeled_split(stl_root: Path) -> None:
    dataset = stl10(stl_root, "unlabeled")
    assert torch.equal(dataset.images, expected_images("unlabeled"))
    assert dataset.targets.tolist() == [-1, -1, -1]


def test_train_plus_unlabeled_concatenates_train_first(stl_root: Path) -> None:
    dataset = stl10(stl_root, "train+unlabeled")
    assert len(dataset) == COUNTS["train"] + COUNTS["unlabeled"]
    assert dataset.images.is_contiguous()
    assert torch.equal(dataset.images[:4], expected_images("train"))
    assert torch.equal(dataset.images[4:], expected_images("unlabeled"))
    assert dataset.targets.tolist() == [0, 9, 4, 2, -1, -1, -1]


def test_root_may_be_the_binary_folder(stl_root: Path) -> None:
    dataset = stl10(stl_root / "stl10_binary", "test")
    assert torch.equal(dataset.images, expected_images("test"))


def test_missing_file_is_named(tmp_path: Path) -> None:
    folder = write_stl10(tmp_path)
    (folder / "unlabeled_X.bin").unlink()
    assert len(stl10(tmp_path, "train")) == 4
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(folder / "unlabeled_X.bin"))):
        stl10(tmp_path, "train+unlabeled")


def test_missing_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        stl10(tmp_path, "test")
    message = str(caught.value)
    assert str(tmp_path / "stl10_binary" / "test_X.bin") in message
    assert str(tmp_path / "stl10_binary" / "test_y.bin") in message
    assert "stl10_binary.tar.gz" in message
    assert "dataset.root" in message


def test_needs_a_root() -> None:
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.root"):
        stl10(None, "train")


def test_truncated_images_file_is_named(tmp_path: Path) -> None:
    folder = write_stl10(tmp_path)
    with (folder / "train_X.bin").open("ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ValueError, match=re.escape(str(folder / "train_X.bin"))) as caught:
        stl10(tmp_path, "train")
    assert str(IMAGE_BYTES) in str(caught.value)


def test_label_count_mismatch(tmp_path: Path) -> None:
    folder = write_stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ValueError, match=r"test_y\.bin holds 3 labels"):
        stl10(tmp_path, "test")


def test_zero_based_label_file_is_rejected(tmp_path: Path) -> None:
    folder = write_stl10(tmp_path)
    (folder / "test_y.bin").write_bytes(bytes([0, 9]))
    with pytest.raises(ValueError, match=r"1\.\.10"):
        stl10(tmp_path, "test")


def test_class_names_default_without_the_file(tmp_path: Path) -> None:
    folder = write_stl10(tmp_path)
    (folder / "class_names.txt").unlink()
    assert stl10(tmp_path, "test").classes == STL10_CLASSES


def test_bad_split(stl_root: Path) -> None:
    with pytest.raises(ValueError, match=r"'train\+unlabeled'") as caught:
        stl10(stl_root, "val")
    assert "'unlabeled'" in str(caught.value)
