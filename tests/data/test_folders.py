"""Folder datasets (generic image folders and ImageNet layout) on tiny real image files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import encode_jpeg, write_file, write_png

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
    dataset = ImageFolderDataset(tmp_path)
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
