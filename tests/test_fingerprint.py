"""A dataset changed on disk between a checkpoint and its resume is noticed, cheaply, and warned
about: the fingerprint itself, the data module's state, and a real resume through ``run``."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from mocoq.data import datamodule as datamodule_module
from mocoq.data.datamodule import MoCoDataModule
from mocoq.data.datasets import ArrayImageDataset, synthetic
from mocoq.data.fingerprint import (
    MAX_SAMPLED_IMAGES,
    MAX_STATTED_FILES,
    SCHEME,
    DataChangedWarning,
    dataset_fingerprint,
    describe_change,
    spread,
)
from mocoq.data.folders import ImageFolderDataset
from mocoq.data.transforms import MoCoAugmentation
from mocoq.train import run


def array_dataset(count: int = 64, seed: int = 0) -> ArrayImageDataset:
    """``count`` random uint8 images (count, 1, 8, 8) with targets (count,)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, 10, (count,), generator=generator)
    return ArrayImageDataset(images, targets)


def changed_image(dataset: ArrayImageDataset, index: int) -> ArrayImageDataset:
    """A copy of ``dataset`` with one pixel of image ``index`` changed."""
    images = dataset.images.clone()  # (N, C, H, W)
    images[index, 0, 0, 0] ^= 1
    return ArrayImageDataset(images, dataset.targets.clone())


# --- in-memory datasets ------------------------------------------------------------------------


def test_fingerprint_of_an_in_memory_split_is_deterministic() -> None:
    first, second = dataset_fingerprint(array_dataset()), dataset_fingerprint(array_dataset())
    assert first == second
    assert first["kind"] == "tensor" and first["count"] == 64 and first["scheme"] == SCHEME
    assert isinstance(first["digest"], str) and int(first["digest"], 16) >= 0
    assert dataset_fingerprint(array_dataset(seed=1))["digest"] != first["digest"]
    assert describe_change(first, second) is None


def test_fingerprint_changes_with_one_sampled_image_or_one_target() -> None:
    dataset = array_dataset(count=3000)  # more than MAX_SAMPLED_IMAGES: a sample is hashed
    before = dataset_fingerprint(dataset)
    sampled = spread(3000, MAX_SAMPLED_IMAGES)
    for index in (sampled[0], sampled[len(sampled) // 2], sampled[-1]):
        after = dataset_fingerprint(changed_image(dataset, index))
        assert after["digest"] != before["digest"], index
        assert after["count"] == before["count"]
        assert describe_change(before, after) == (
            "the training split's images differ from those the checkpoint was trained on "
            "(same count, different fingerprint)"
        )
    targets = dataset.targets.clone()
    targets[1] = (targets[1] + 1) % 10  # index 1 is not a sampled image; every target is hashed
    assert 1 not in sampled
    relabelled = ArrayImageDataset(dataset.images, targets)
    assert dataset_fingerprint(relabelled)["digest"] != before["digest"]


def test_fingerprint_changes_with_the_count() -> None:
    before, after = dataset_fingerprint(array_dataset(64)), dataset_fingerprint(array_dataset(60))
    assert (before["count"], after["count"]) == (64, 60)
    assert describe_change(before, after) == (
        "the training split has 60 images now, 64 when the checkpoint was written"
    )
    many, fewer = {**before, "count": 60_000}, {**after, "count": 59_990}
    assert describe_change(many, fewer, split="pre-training") == (
        "the pre-training split has 59,990 images now, 60,000 when the checkpoint was written"
    )


def test_fingerprint_hashes_a_bounded_sample_of_a_large_split() -> None:
    # 10^6 images of 3 x 32 x 32 viewed from one image: 3 GB if the whole tensor were read.
    count = 1_000_000

    class Large:
        images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8).expand(count, 3, 32, 32)
        targets = torch.zeros(count, dtype=torch.long)

        def __len__(self) -> int:
            return count

    dataset = Large()
    start = time.perf_counter()
    fingerprint = dataset_fingerprint(dataset)
    assert time.perf_counter() - start < 2.0  # milliseconds in practice
    assert fingerprint["count"] == count and fingerprint["kind"] == "tensor"
    # An image outside the sample does not enter the digest: only the sample is read.
    small = array_dataset(count=3000)
    unsampled = next(i for i in range(3000) if i not in set(spread(3000, MAX_SAMPLED_IMAGES)))
    assert dataset_fingerprint(changed_image(small, unsampled)) == dataset_fingerprint(small)


def test_spread_indices_are_even_and_bounded() -> None:
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(3, 1024) == [0, 1, 2]
    assert spread(5, 1) == [0] and spread(0, 4) == []
    assert len(spread(1_281_167, MAX_STATTED_FILES)) == MAX_STATTED_FILES


# --- folder datasets ---------------------------------------------------------------------------


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (value, value, value)).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``root/<class>/<image>.png``: 2 classes of 3 images."""
    root = tmp_path / "images"
    for label in ("cat", "dog"):
        for index in range(3):
            write_image(root / label / f"{index}.png", 40 * index + (label == "dog"))
    return root


def folder_fingerprint(root: Path) -> dict[str, Any]:
    return dataset_fingerprint(ImageFolderDataset(root))


def test_folder_fingerprint_is_deterministic_and_independent_of_where_the_folder_is(
    image_folder: Path, tmp_path: Path
) -> None:
    before = folder_fingerprint(image_folder)
    assert before["kind"] == "folder" and before["count"] == 6
    assert folder_fingerprint(image_folder) == before
    copy = tmp_path / "copied" / "elsewhere"
    shutil.copytree(image_folder, copy)  # e.g. to a node's local disk
    os.utime(copy / "cat" / "0.png", (0, 0))  # modification times are not part of it
    assert folder_fingerprint(copy) == before


def test_folder_fingerprint_changes_when_a_file_is_added(image_folder: Path) -> None:
    before = folder_fingerprint(image_folder)
    write_image(image_folder / "dog" / "3.png", 200)
    after = folder_fingerprint(image_folder)
    assert after["count"] == 7
    assert describe_change(before, after) == (
        "the training split has 7 images now, 6 when the checkpoint was written"
    )


def test_folder_fingerprint_changes_when_a_file_is_removed_or_renamed(image_folder: Path) -> None:
    before = folder_fingerprint(image_folder)
    (image_folder / "cat" / "1.png").unlink()
    assert folder_fingerprint(image_folder)["count"] == 5
    write_image(image_folder / "cat" / "renamed.png", 40)  # same count, another file
    after = folder_fingerprint(image_folder)
    assert after["count"] == 6 and after["digest"] != before["digest"]
    assert describe_change(before, after) is not None


def test_folder_fingerprint_changes_when_a_file_moves_to_another_class(image_folder: Path) -> None:
    before = folder_fingerprint(image_folder)
    (image_folder / "cat" / "2.png").rename(image_folder / "dog" / "2b.png")
    assert folder_fingerprint(image_folder)["digest"] != before["digest"]


def test_folder_fingerprint_changes_when_a_file_size_changes(image_folder: Path) -> None:
    before = folder_fingerprint(image_folder)
    with open(image_folder / "dog" / "1.png", "ab") as handle:
        handle.write(b"\0" * 16)  # same name, same count, 16 bytes longer
    after = folder_fingerprint(image_folder)
    assert after["count"] == before["count"] and after["digest"] != before["digest"]
    assert "same count, different fingerprint" in str(describe_change(before, after))


def test_other_datasets_are_compared_by_count_only() -> None:
    class Listed(torch.utils.data.Dataset[tuple[Tensor, int]]):
        def __init__(self, count: int) -> None:
            self.count = count

        def __len__(self) -> int:
            return self.count

        def __getitem__(self, index: int) -> tuple[Tensor, int]:
            return torch.zeros(1, 2, 2, dtype=torch.uint8), 0

    same, other = dataset_fingerprint(Listed(5)), dataset_fingerprint(Listed(5))
    assert same == {"scheme": SCHEME, "kind": "other", "count": 5, "digest": None}
    assert describe_change(same, other) is None
    assert describe_change(same, dataset_fingerprint(Listed(4))) is not None
    # Another fingerprint scheme (a later mocoq) or kind: the count is all that can be compared.
    tensor = dataset_fingerprint(array_dataset())
    assert describe_change({**tensor, "scheme": SCHEME + 1, "digest": "0"}, tensor) is None
    assert describe_change({"count": 64}, tensor) is None
    assert describe_change({"count": 63}, tensor) is not None


# --- the data module's state -------------------------------------------------------------------


def make_datamodule(num_samples: int = 40, seed: int = 0) -> MoCoDataModule:
    def loader(root: str | None, split: str) -> ArrayImageDataset:
        return synthetic(root, split, num_samples=num_samples, image_size=12, seed=seed)

    return MoCoDataModule(
        loader=loader,
        augment=MoCoAugmentation,
        image_size=12,
        batch_size=8,
        num_workers=0,
    )


def data_changed_warnings(action: Callable[[], object]) -> list[str]:
    """The messages of the :class:`DataChangedWarning` warnings ``action`` raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, DataChangedWarning)]


def test_state_dict_carries_the_fingerprint_computed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def counting(dataset: object) -> dict[str, Any]:
        calls.append(dataset)
        return dataset_fingerprint(dataset)

    monkeypatch.setattr(datamodule_module, "dataset_fingerprint", counting)
    datamodule = make_datamodule()
    assert datamodule.state_dict() == {}  # nothing loaded yet: and nothing loaded for it
    assert datamodule._splits == {}
    datamodule.setup("fit")
    datamodule.train_dataloader()
    states = [datamodule.state_dict() for _ in range(5)]  # one per checkpoint save
    assert len(calls) == 1
    expected = dataset_fingerprint(datamodule.split("train"))
    assert all(state["train_fingerprint"] == expected for state in states)
    assert states[0]["train_position"]["consumed"] == 0  # the position is still saved


def test_restored_fingerprint_of_other_data_warns_once_when_the_loader_is_built() -> None:
    old = make_datamodule(num_samples=48)
    old.setup("fit")
    old.train_dataloader()
    saved = old.state_dict()

    resumed = make_datamodule(num_samples=40)
    resumed.load_state_dict(saved)
    resumed.setup("fit")
    messages = data_changed_warnings(resumed.train_dataloader)
    assert messages == [
        "resuming on changed data: the training split has 40 images now, 48 when the checkpoint "
        "was written. The resumed run continues the checkpoint's order and its position within "
        "the epoch on the new data, so the rest of this epoch may not line up with what was "
        "trained (images repeated or skipped); training goes on."
    ]
    assert data_changed_warnings(resumed.train_dataloader) == []  # a reloaded loader: not again
    assert resumed.state_dict()["train_fingerprint"]["count"] == 40  # later saves: the new data

    same_count = make_datamodule(num_samples=48, seed=1)
    same_count.load_state_dict(saved)
    same_count.setup("fit")
    (message,) = data_changed_warnings(same_count.train_dataloader)
    assert "(same count, different fingerprint)" in message


def test_restored_fingerprint_of_the_same_data_or_none_does_not_warn() -> None:
    old = make_datamodule()
    old.setup("fit")
    old.train_dataloader()
    saved = old.state_dict()
    for state in (saved, {"train_position": saved["train_position"]}, {}):  # new, old, empty
        resumed = make_datamodule()
        resumed.load_state_dict(state)
        resumed.setup("fit")
        assert data_changed_warnings(resumed.train_dataloader) == [], state
        assert resumed.state_dict()["train_fingerprint"] == saved["train_fingerprint"]


def test_a_restored_fingerprint_is_saved_again_before_the_data_is_loaded() -> None:
    saved = {"train_fingerprint": {"scheme": SCHEME, "kind": "tensor", "count": 7, "digest": "0"}}
    datamodule = make_datamodule()
    datamodule.load_state_dict(saved)
    assert datamodule.state_dict() == saved


# --- a real run and its resume -----------------------------------------------------------------


def saved_fingerprint(run_dir: Path) -> dict[str, Any]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    fingerprint: dict[str, Any] = checkpoint["MoCoDataModule"]["train_fingerprint"]
    return fingerprint


def test_resume_warns_when_the_training_data_changed_and_only_then(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    def resume(epochs: int, *overrides: str) -> dict[str, Any]:
        return run(
            make_cfg(f"trainer.max_epochs={epochs}", "~callbacks.knn", "ckpt_path=last", *overrides)
        )

    first = run(make_cfg("trainer.max_epochs=1", "~callbacks.knn"))  # 128 synthetic images
    assert first["steps"] == 4
    assert saved_fingerprint(tmp_path)["count"] == 128

    # The same data: no warning.
    summary: dict[str, Any] = {}
    assert data_changed_warnings(lambda: summary.update(resume(2))) == []
    assert summary["steps"] == 8

    # Fewer images: a warning naming both counts, and the run goes on.
    with pytest.warns(DataChangedWarning) as caught:
        summary = resume(3, "dataset.loader.num_samples=96")
    (message,) = [str(w.message) for w in caught if issubclass(w.category, DataChangedWarning)]
    assert message.startswith(
        "resuming on changed data: the training split has 96 images now, 128 when the "
        "checkpoint was written. The resumed run continues the checkpoint's order"
    )
    assert summary["epochs"] == 3 and summary["steps"] == 12
    assert saved_fingerprint(tmp_path)["count"] == 96  # the new checkpoint records the new data

    # The same count, other images (another synthetic draw): the digest tells.
    with pytest.warns(DataChangedWarning, match=r"same count, different fingerprint"):
        resume(4, "dataset.loader.num_samples=96", "+dataset.loader.seed=1")
