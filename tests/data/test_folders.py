"""Folder datasets (generic image folders and ImageNet layout) on tiny real image files."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import encode_jpeg, write_file, write_png

from mocoq.data import folders
from mocoq.data.datasets import DatasetNotFoundError
from mocoq.data.folders import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFolderDataset,
    image_folder,
    imagenet,
)

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def random_image(seed: int, channels: int = 3, height: int = 6, width: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), generator=generator, dtype=torch.uint8)


def save_png(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image, str(path))
    return path


def save_jpeg(path: Path, image: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_jpeg(image, quality=95))
    return path


def test_extensions_cover_the_usual_formats() -> None:
    for extension in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"):
        assert extension in IMAGE_EXTENSIONS


def test_class_subfolders(tmp_path: Path) -> None:
    images = {name: random_image(seed) for seed, name in enumerate(["b", "a", "c"])}
    save_png(tmp_path / "cat" / "b.png", images["b"])
    save_png(tmp_path / "cat" / "a.png", images["a"])
    save_png(tmp_path / "cat" / "deep" / "c.png", images["c"])
    flat = torch.full(
        (3, 6, 5), 128, dtype=torch.uint8
    )  # a flat colour survives JPEG to within rounding
    save_jpeg(tmp_path / "dog" / "x.JPG", flat)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "._x.JPG").write_bytes(b"macOS metadata, not an image")
    save_png(tmp_path / ".thumbnails" / "t.png", images["a"])

    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ("cat", "dog")
    assert dataset.samples == [
        (str(tmp_path / "cat" / "a.png"), 0),
        (str(tmp_path / "cat" / "b.png"), 0),
        (str(tmp_path / "cat" / "deep" / "c.png"), 0),
        (str(tmp_path / "dog" / "x.JPG"), 1),
    ]
    assert dataset.targets.dtype == torch.int64
    assert dataset.targets.tolist() == [0, 0, 0, 1]
    assert dataset.channels == 3
    assert len(dataset) == 4
    image, target = dataset[2]
    assert image.dtype == torch.uint8
    assert torch.equal(image, images["c"])
    assert target == 0
    jpeg, target = dataset[3]
    assert jpeg.shape == (3, 6, 5)
    assert target == 1
    assert (jpeg.int() - 128).abs().max() <= 2


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    save_png(tmp_path / "img2.png", random_image(2))
    save_jpeg(tmp_path / "img1.jpeg", random_image(1))
    (tmp_path / "empty").mkdir()
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ()
    assert [Path(path).name for path, _ in dataset.samples] == ["img1.jpeg", "img2.png"]
    assert dataset.targets.tolist() == [-1, -1]
    image, target = dataset[1]
    assert torch.equal(image, random_image(2))
    assert target == -1


def test_mixed_layout_is_rejected(tmp_path: Path) -> None:
    save_png(tmp_path / "stray.png", random_image(0))
    save_png(tmp_path / "cat" / "a.png", random_image(1))
    with pytest.raises(ValueError, match="class subfolder") as caught:
        ImageFolderDataset(tmp_path)
    assert "stray.png" in str(caught.value)


def test_empty_class_folder_is_rejected(tmp_path: Path) -> None:
    save_png(tmp_path / "cat" / "a.png", random_image(1))
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"hold no images.*dog"):
        ImageFolderDataset(tmp_path)


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(missing))):
        ImageFolderDataset(missing)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path))) as caught:
        ImageFolderDataset(tmp_path)
    assert ".png" in str(caught.value)
    assert ".jpeg" in str(caught.value)


def test_grayscale_decoding(tmp_path: Path) -> None:
    gray = random_image(3, channels=1)
    save_png(tmp_path / "gray.png", gray)
    save_png(tmp_path / "rgb.png", gray.expand(3, -1, -1).contiguous())  # R = G = B

    as_gray = ImageFolderDataset(tmp_path, channels=1)
    assert as_gray.channels == 1
    for index in range(2):
        image, _ = as_gray[index]
        assert image.shape == (1, 6, 5)
        assert torch.equal(image, gray)

    as_rgb = ImageFolderDataset(tmp_path, channels=3)
    image, _ = as_rgb[0]  # gray.png
    assert image.shape == (3, 6, 5)
    assert torch.equal(image, gray.expand(3, -1, -1))


def test_channels_must_be_1_or_3(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", random_image(0))
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, channels=4)


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    save_png(tmp_path / "good.png", random_image(0))
    (tmp_path / "x.png").write_bytes(b"\x89PNG but then junk bytes")
    (tmp_path / "y.jpg").write_bytes(b"")
    dataset = ImageFolderDataset(tmp_path, check_empty_files=False)  # else y.jpg fails here
    assert dataset[0][0].shape == (3, 6, 5)
    with pytest.raises(CorruptImageError, match=re.escape(str(tmp_path / "x.png"))):
        dataset[1]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "y.jpg"))):
        dataset[2]


def test_ordering_is_deterministic(tmp_path: Path) -> None:
    names = ["m.png", "B.png", "a.png", "z.png", "c.PNG"]
    for seed, name in enumerate(reversed(names)):
        save_png(tmp_path / "k" / name, random_image(seed))
    first = ImageFolderDataset(tmp_path)
    second = ImageFolderDataset(tmp_path)
    assert first.samples == second.samples
    assert [Path(path).name for path, _ in first.samples] == sorted(names)


def test_pillow_formats(tmp_path: Path) -> None:
    rgb = random_image(4).permute(1, 2, 0).numpy()
    gray = random_image(5, channels=1)[0].numpy()
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(gray).save(tmp_path / "b.pgm")
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    dataset = ImageFolderDataset(tmp_path)
    assert torch.equal(dataset[0][0], random_image(4))
    assert torch.equal(dataset[1][0], torch.from_numpy(gray).expand(3, -1, -1))
    assert torch.equal(dataset[2][0], random_image(4))


def test_16_bit_png_becomes_8_bit(tmp_path: Path) -> None:
    values = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image, _ = ImageFolderDataset(tmp_path, channels=1)[0]
    assert image.dtype == torch.uint8
    assert torch.equal(image[0], torch.from_numpy((values >> 8).astype(np.uint8)))


def test_batches_through_a_dataloader(tmp_path: Path) -> None:
    for index in range(3):
        save_png(tmp_path / f"{index}.png", random_image(index))
    images, targets = next(iter(DataLoader(ImageFolderDataset(tmp_path), batch_size=3)))
    assert images.shape == (3, 3, 6, 5)
    assert targets.tolist() == [-1, -1, -1]


def test_image_folder_splits(tmp_path: Path) -> None:
    save_png(tmp_path / "train" / "cat" / "a.png", random_image(0))
    save_png(tmp_path / "train" / "dog" / "b.png", random_image(1))
    save_png(tmp_path / "val" / "cat" / "c.png", random_image(2))
    train = image_folder(tmp_path, "train")
    assert train.root == tmp_path / "train"
    assert train.classes == ("cat", "dog")
    val = image_folder(tmp_path, "val", channels=1)
    assert val.root == tmp_path / "val"
    assert val[0][0].shape == (1, 6, 5)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "test"))):
        image_folder(tmp_path, "test")


def test_image_folder_train_falls_back_to_root(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", random_image(0))
    dataset = image_folder(tmp_path)
    assert dataset.root == tmp_path
    assert dataset.targets.tolist() == [-1]


def test_image_folder_needs_a_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.root"):
        image_folder(None)
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "missing"))):
        image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="subfolder"):
        image_folder(tmp_path, "../elsewhere")


def write_imagenet(root: Path, wnids: tuple[str, ...] = ("n01440764", "n01443537")) -> None:
    for index, wnid in enumerate(wnids):
        save_jpeg(root / "train" / wnid / f"{wnid}_{index}.JPEG", random_image(index))
        save_jpeg(root / "val" / wnid / f"ILSVRC2012_val_0000000{index}.JPEG", random_image(index))


def test_imagenet(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    train = imagenet(tmp_path, "train")
    val = imagenet(tmp_path, "val")
    assert train.classes == val.classes == ("n01440764", "n01443537")
    assert train.targets.tolist() == val.targets.tolist() == [0, 1]
    image, target = val[1]
    assert image.shape == (3, 6, 5)
    assert target == 1


def test_imagenet_flat_val_asks_for_class_folders(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    save_jpeg(tmp_path / "val" / "ILSVRC2012_val_00000099.JPEG", random_image(9))
    with pytest.raises(DatasetNotFoundError, match="valprep") as caught:
        imagenet(tmp_path, "val")
    assert str(tmp_path / "val") in str(caught.value)


def test_imagenet_val_classes_must_match_train(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    save_jpeg(tmp_path / "val" / "n09999999" / "extra.JPEG", random_image(7))
    with pytest.raises(ValueError, match="n09999999"):
        imagenet(tmp_path, "val")


def test_imagenet_missing_split_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "train"))):
        imagenet(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"dataset\.root"):
        imagenet(None, "val")
    with pytest.raises(ValueError, match="'train' and 'val'"):
        imagenet(tmp_path, "test")


# --- unreadable and corrupt files: on_bad_image ---------------------------------------------


def write_bad_folder(root: Path) -> list[Path]:
    """cat/{a good, b random bytes, c truncated PNG}, dog/{d good, e good, z random bytes}."""
    good_png = save_png(root / "cat" / "a.png", random_image(0))
    (root / "cat" / "b.jpg").write_bytes(bytes(torch.randint(0, 256, (300,)).tolist()))
    data = good_png.read_bytes()
    (root / "cat" / "c.png").write_bytes(data[: len(data) // 2])
    save_jpeg(root / "dog" / "d.jpg", random_image(3))
    save_png(root / "dog" / "e.png", random_image(4))
    (root / "dog" / "z.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    return sorted(root.rglob("*.*"))


def folder_records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "mocoq.data.folders" and record.levelno == level
    ]


def test_bad_image_fails_by_default_naming_the_file_and_the_option(tmp_path: Path) -> None:
    write_bad_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.on_bad_image == "fail"
    assert dataset[0][0].shape == (3, 6, 5)
    for index, name in [(1, "cat/b.jpg"), (2, "cat/c.png"), (5, "dog/z.jpg")]:
        with pytest.raises(CorruptImageError) as caught:
            dataset[index]
        message = str(caught.value)
        assert message.startswith(f"cannot decode image file {tmp_path / name}: ")
        assert message.endswith(
            "; fix or remove it, or set dataset.loader.on_bad_image=skip to leave such files out"
        )
        assert "\n" not in message  # the training CLI shows the first line only
        assert ".cpp" not in message and "BytesIO" not in message
    assert dataset.skipped_files == ()


def test_unreadable_file_fails_or_is_skipped(tmp_path: Path) -> None:
    save_png(tmp_path / "k" / "a.png", random_image(0))
    (tmp_path / "k" / "b.png").symlink_to(tmp_path / "missing.png")  # listed, cannot be read
    with pytest.raises(CorruptImageError, match=r"cannot read image file .*b\.png.*skip"):
        ImageFolderDataset(tmp_path)[1]
    skipping = ImageFolderDataset(tmp_path, on_bad_image="skip")
    assert torch.equal(skipping[1][0], random_image(0))
    assert skipping.skipped_files == (str(tmp_path / "k" / "b.png"),)


def test_skip_substitutes_the_next_good_item_deterministically(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_bad_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, on_bad_image="skip")
    assert len(dataset) == 6  # bad files stay in the index: sampler positions stay valid
    with caplog.at_level(logging.DEBUG, logger="mocoq.data.folders"):
        items = [dataset[index] for index in range(len(dataset))]
    for image, _ in items:
        assert image.dtype == torch.uint8 and image.shape == (3, 6, 5)
    assert torch.equal(items[0][0], random_image(0))
    # b (1) and c (2) are bad: both load d (3), with d's target; z (5) wraps around to a (0).
    assert [target for _, target in items] == [0, 1, 1, 1, 1, 0]
    assert torch.equal(items[1][0], items[3][0]) and torch.equal(items[2][0], items[3][0])
    assert torch.equal(items[5][0], random_image(0))
    bad = [str(tmp_path / "cat" / "b.jpg"), str(tmp_path / "cat" / "c.png")]
    bad.append(str(tmp_path / "dog" / "z.jpg"))
    assert dataset.skipped_files == tuple(bad)

    warnings = folder_records(caplog)
    assert len(warnings) == 3
    for count, (path, message) in enumerate(zip(bad, warnings, strict=True), start=1):
        assert message.startswith(f"cannot decode image file {path}: ")
        assert "skipped (dataset.loader.on_bad_image=skip)" in message
        assert message.endswith(f"{count} bad image file(s) skipped so far in this process")

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mocoq.data.folders"):
        again = [dataset[index] for index in (5, 2, 1, -1)]
    assert caplog.records == []  # each bad file is reported once per process
    for (image, target), index in zip(again, (5, 2, 1, 5), strict=True):
        assert torch.equal(image, items[index][0]) and target == items[index][1]
    fresh = ImageFolderDataset(tmp_path, on_bad_image="skip")
    assert fresh.skipped_files == ()
    assert torch.equal(fresh[2][0], items[2][0]) and fresh[2][1] == items[2][1]


def test_skip_in_dataloader_workers(tmp_path: Path) -> None:
    write_bad_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, on_bad_image="skip")
    expected = [dataset[index] for index in range(len(dataset))]
    fresh = ImageFolderDataset(tmp_path, on_bad_image="skip")
    loader = DataLoader(fresh, batch_size=3, num_workers=2)
    batches = list(loader)
    assert [images.shape for images, _ in batches] == [(3, 3, 6, 5), (3, 3, 6, 5)]
    images = torch.cat([images for images, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    assert torch.equal(images, torch.stack([image for image, _ in expected]))
    assert targets.tolist() == [target for _, target in expected]
    assert fresh.skipped_files == ()  # the workers' records stay in the workers


def test_skip_warnings_are_thinned_after_the_first_few(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folders, "_WARN_EACH", 2)
    save_png(tmp_path / "a.png", random_image(0))
    for index in range(5):
        (tmp_path / f"bad{index}.jpg").write_bytes(b"junk")
    dataset = ImageFolderDataset(tmp_path, on_bad_image="skip")
    with caplog.at_level(logging.DEBUG, logger="mocoq.data.folders"):
        for index in range(len(dataset)):
            assert torch.equal(dataset[index][0], random_image(0))
    warned = folder_records(caplog)
    assert warned[1].endswith(
        "2 bad image file(s) skipped so far in this process; further ones are logged at DEBUG "
        "level, and at each power of two"
    )
    assert [message.split(": ")[0] for message in warned] == [
        f"cannot decode image file {tmp_path / name}"
        for name in ("bad0.jpg", "bad1.jpg", "bad3.jpg")
    ]
    assert "4 bad image file(s)" in warned[2]
    assert len(folder_records(caplog, logging.DEBUG)) == 2  # bad2 and bad4
    assert len(dataset.skipped_files) == 5


def test_skip_with_every_file_bad_raises(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"junk")
    (tmp_path / "b.png").write_bytes(b"\x89PNG junk")
    dataset = ImageFolderDataset(tmp_path, on_bad_image="skip")
    for _ in range(2):
        with pytest.raises(CorruptImageError, match="none of the 2 image files") as caught:
            dataset[1]
        assert str(tmp_path / "a.jpg") in str(caught.value)
        assert str(tmp_path / "b.png") in str(caught.value)


@pytest.mark.parametrize("value", ["ignore", "Skip", ""])
def test_on_bad_image_must_be_fail_or_skip(tmp_path: Path, value: str) -> None:
    write_imagenet(tmp_path)
    pattern = r"dataset\.loader\.on_bad_image must be 'fail' .* or 'skip'"
    with pytest.raises(ValueError, match=pattern):
        ImageFolderDataset(tmp_path / "train", on_bad_image=value)
    with pytest.raises(ValueError, match=pattern):
        image_folder(tmp_path, on_bad_image=value)
    with pytest.raises(ValueError, match=pattern):
        imagenet(tmp_path, "train", on_bad_image=value)


def test_loaders_pass_on_bad_image(tmp_path: Path) -> None:
    write_imagenet(tmp_path)
    assert image_folder(tmp_path).on_bad_image == "fail"
    assert image_folder(tmp_path, "val", on_bad_image="skip").on_bad_image == "skip"
    assert imagenet(tmp_path, "train").on_bad_image == "fail"
    assert imagenet(tmp_path, "val", on_bad_image="skip").on_bad_image == "skip"


def write_with_empty_files(root: Path) -> None:
    save_png(root / "cat" / "a.png", random_image(0))
    (root / "cat" / "b.jpg").write_bytes(b"")
    (root / "dog").mkdir()
    (root / "dog" / "c.jpg").write_bytes(b"")  # dog's only file
    save_png(root / "eel" / "d.png", random_image(3))


def test_empty_files_are_refused_at_construction_with_fail(tmp_path: Path) -> None:
    write_with_empty_files(tmp_path)
    with pytest.raises(CorruptImageError) as caught:
        ImageFolderDataset(tmp_path)
    assert str(caught.value) == (
        f"2 of the 4 image files under {tmp_path} are empty (0 bytes): "
        f"{tmp_path / 'cat' / 'b.jpg'}, {tmp_path / 'dog' / 'c.jpg'}; fix or remove them, or set "
        "dataset.loader.on_bad_image=skip to leave such files out"
    )
    unchecked = ImageFolderDataset(tmp_path, check_empty_files=False)  # found when read instead
    assert len(unchecked) == 4
    with pytest.raises(CorruptImageError, match=r"b\.jpg: it is empty; fix or remove it"):
        unchecked[1]


def test_empty_files_are_dropped_at_construction_with_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_with_empty_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mocoq.data.folders"):
        dataset = ImageFolderDataset(tmp_path, on_bad_image="skip")
    assert dataset.classes == ("cat", "dog", "eel")  # dog keeps its index, with no items
    assert dataset.samples == [
        (str(tmp_path / "cat" / "a.png"), 0),
        (str(tmp_path / "eel" / "d.png"), 2),
    ]
    assert dataset.targets.tolist() == [0, 2]
    assert dataset.empty_files == (str(tmp_path / "cat" / "b.jpg"), str(tmp_path / "dog" / "c.jpg"))
    assert dataset.skipped_files == ()
    assert folder_records(caplog) == [
        f"2 of the 4 image files under {tmp_path} are empty (0 bytes) and left out "
        f"(dataset.loader.on_bad_image=skip): {tmp_path / 'cat' / 'b.jpg'}, "
        f"{tmp_path / 'dog' / 'c.jpg'}"
    ]
    assert torch.equal(dataset[1][0], random_image(3))


def test_many_empty_files_are_counted_and_the_first_named(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", random_image(0))
    for index in range(12):
        (tmp_path / f"e{index:02d}.jpg").write_bytes(b"")
    with pytest.raises(CorruptImageError) as caught:
        ImageFolderDataset(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"12 of the 13 image files under {tmp_path} are empty")
    assert str(tmp_path / "e04.jpg") in message and "e05.jpg" not in message
    assert "... (12 in all)" in message


def test_skip_with_every_file_empty_raises(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(CorruptImageError, match=r"every image file under .* is empty"):
        ImageFolderDataset(tmp_path, on_bad_image="skip")


@pytest.mark.parametrize("dataset", ["image_folder", "imagenet"])
def test_config_passes_on_bad_image_to_the_loader(
    dataset: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    write_imagenet(tmp_path)
    cfg = make_cfg(f"dataset={dataset}", f"dataset.root={tmp_path}")
    assert cfg.dataset.loader.on_bad_image == "fail"
    assert cfg.dataset.loader.check_empty_files is True
    assert instantiate(cfg.dataset.loader)(root=tmp_path, split="val").on_bad_image == "fail"
    cfg = make_cfg(f"dataset={dataset}", "dataset.loader.on_bad_image=skip")
    assert instantiate(cfg.dataset.loader)(root=tmp_path, split="val").on_bad_image == "skip"
