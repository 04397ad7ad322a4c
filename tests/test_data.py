"""Readers, transforms and the datamodule on small files and synthetic images."""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mocoq.data.datamodule import MoCoDataModule
from mocoq.data.datasets import ArrayImageDataset, DatasetNotFoundError, fashion_mnist, synthetic
from mocoq.data.sampling import ResumableSampler
from mocoq.data.transforms import EvalTransform, MoCoAugmentation, blur_kernel_size


def write_idx(path: Path, array: torch.Tensor, compress: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(
        f">{array.dim()}I", *array.shape
    )
    data = header + array.to(torch.uint8).numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_on_idx_files(tmp_path: Path, compress: bool) -> None:
    images = torch.arange(3 * 28 * 28).reshape(3, 28, 28) % 251
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.tensor([9, 0, 4]), compress)
    dataset = fashion_mnist(tmp_path, "test")
    assert dataset.images.shape == (3, 1, 28, 28)
    assert torch.equal(dataset.images[:, 0], images.to(torch.uint8))
    assert dataset.targets.tolist() == [9, 0, 4]
    image, target = dataset[2]
    assert image.shape == (1, 28, 28) and target == 4


def test_truncated_idx_file_is_named(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros(3, 28, 28), False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(3), False)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte is truncated"):
        fashion_mnist(tmp_path, "test")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"not found under .*apt-get install"):
        fashion_mnist(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        fashion_mnist(tmp_path, "val")


def test_synthetic_is_deterministic_and_split_dependent() -> None:
    a = synthetic(split="train", num_samples=16, image_size=8, channels=1)
    b = synthetic(split="train", num_samples=16, image_size=8, channels=1)
    c = synthetic(split="test", num_samples=16, image_size=8, channels=1)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 1, 8, 8)
    assert (synthetic(split="unlabeled", num_samples=4).targets == -1).all()


def test_array_dataset_validates_shapes() -> None:
    with pytest.raises(ValueError, match="uint8 tensor"):
        ArrayImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\)"):
        ArrayImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_differ_and_keep_shape(channels: int) -> None:
    torch.manual_seed(0)
    augment = MoCoAugmentation(16, [0.5] * channels, [0.25] * channels)
    image = torch.randint(0, 256, (channels, 20, 20), dtype=torch.uint8)
    view_a, view_b = augment(image)
    assert view_a.shape == view_b.shape == (channels, 16, 16)
    assert view_a.dtype == torch.float32
    assert not torch.equal(view_a, view_b)


def test_grayscale_images_get_brightness_and_contrast_only() -> None:
    # On one channel, saturation and hue jitter and random grayscale are identities (as in PIL):
    # with crop, flip and blur off, a constant image stays constant under the v2 recipe.
    augment = MoCoAugmentation(
        8, [0.0], [1.0], crop_scale=(1.0, 1.0), jitter=(0, 0, 0.9, 0.5), jitter_prob=1.0,
        grayscale_prob=1.0, blur_prob=0.0, flip_prob=0.0,
    )  # fmt: skip
    image = torch.full((1, 8, 8), 100, dtype=torch.uint8)
    view, _ = augment(image)
    assert torch.allclose(view, torch.full((1, 8, 8), 100 / 255), atol=1e-6)


def test_blur_kernel_is_odd_and_about_a_tenth() -> None:
    assert [blur_kernel_size(s) for s in (16, 32, 96, 224)] == [3, 3, 9, 23]


def test_eval_transform_resizes_only_when_needed() -> None:
    transform = EvalTransform(8, [0.0], [1.0])
    small = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    assert torch.equal(transform(small), torch.ones(1, 8, 8))
    large = torch.full((1, 20, 30), 255, dtype=torch.uint8)
    assert transform(large).shape == (1, 8, 8)


def make_datamodule(**kwargs: object) -> MoCoDataModule:
    options: dict[str, object] = {
        "loader": lambda root, split: synthetic(root, split, num_samples=40, image_size=12),
        "augment": MoCoAugmentation,
        "image_size": 12,
        "channels": 3,
        "batch_size": 16,
        "num_workers": 0,
        "eval_batch_size": 32,
    }
    options.update(kwargs)
    return MoCoDataModule(**options)  # type: ignore[arg-type]


def test_train_loader_yields_two_views_and_drops_the_last_partial_batch() -> None:
    datamodule = make_datamodule()
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 2  # 40 images, batches of 16, the last 8 dropped
    (view_a, view_b), targets = batches[0]
    assert view_a.shape == view_b.shape == (16, 3, 12, 12)
    assert targets.shape == (16,)


@pytest.mark.parametrize("on_device", [False, True])
def test_smaller_views_train_while_clean_images_keep_the_image_size(on_device: bool) -> None:
    augment = functools.partial(MoCoAugmentation, view_size=8, blur_prob=0.5)
    datamodule = make_datamodule(augment=augment, augment_on_device=on_device)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    (view_a, view_b), _ = batch
    assert view_a.shape == view_b.shape == (16, 3, 8, 8)
    bank = datamodule.knn_bank_dataloader()
    assert bank is not None and next(iter(bank))[0].shape == (32, 3, 12, 12)
    if on_device:
        assert datamodule.batched_augment is not None
        assert datamodule.batched_augment.image_size == 8
    with pytest.raises(ValueError, match="view_size must be at least 2"):
        MoCoAugmentation(12, [0.5], [0.5], view_size=1)


def test_clean_loaders_are_unaugmented_and_complete() -> None:
    datamodule = make_datamodule()
    bank = datamodule.knn_bank_dataloader()
    assert bank is not None
    first = torch.cat([images for images, _ in bank])
    second = torch.cat([images for images, _ in bank])
    assert first.shape == (40, 3, 12, 12) and torch.equal(first, second)


@pytest.mark.parametrize("on_device", [False, True])
def test_clean_view_is_the_clean_loaders_image(on_device: bool) -> None:
    # With clean_view (the online probe on), every training batch carries a third view: the
    # image exactly as the clean (kNN) loaders give it, in both data paths.
    datamodule = make_datamodule(clean_view=True, augment_on_device=on_device)
    datamodule.setup("fit")
    bank = datamodule.knn_bank_dataloader()
    assert bank is not None
    clean_images = torch.cat([images for images, _ in bank])  # (40, 3, 12, 12), dataset order
    clean_targets = torch.cat([targets for _, targets in bank])
    batches = 0
    for batch in datamodule.train_dataloader():
        views, targets = datamodule.on_after_batch_transfer(batch, 0)
        assert len(views) == 3 and all(v.shape == (16, 3, 12, 12) for v in views)
        view_a, _, clean = views
        for image, target in zip(clean, targets, strict=True):
            matches = [i for i in range(40) if torch.allclose(image, clean_images[i], atol=1e-6)]
            assert len(matches) == 1 and clean_targets[matches[0]] == target
        assert not torch.allclose(view_a, clean)  # the augmented view is another image
        batches += 1
    assert batches == 2
    # Without it, two views as before.
    plain = make_datamodule(augment_on_device=on_device)
    views, _ = plain.on_after_batch_transfer(next(iter(plain.train_dataloader())), 0)
    assert len(views) == 2


def test_datamodule_errors_name_what_to_fix() -> None:
    with pytest.raises(ValueError, match=r"batch_size=64 is larger than the 40 training images"):
        make_datamodule(batch_size=64).setup("fit")
    with pytest.raises(ValueError, match=r"have 3 channels but dataset.channels is 1"):
        make_datamodule(channels=1, mean=[0.5], std=[0.5]).setup("fit")
    with pytest.raises(ValueError, match=r"need 3 values"):
        make_datamodule(mean=[0.5])


def _epoch(datamodule: MoCoDataModule) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(a, b, y) for (a, b), y in datamodule.train_dataloader()]


def test_augmentations_do_not_depend_on_workers_or_the_global_rng() -> None:
    torch.manual_seed(1)
    in_process = _epoch(make_datamodule(seed=5))
    torch.manual_seed(2)  # another global RNG state, and two worker processes
    in_workers = _epoch(make_datamodule(seed=5, num_workers=2))
    assert len(in_process) == len(in_workers) == 2
    for (a1, b1, y1), (a2, b2, y2) in zip(in_process, in_workers, strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(y1, y2)
    assert not torch.equal(in_process[0][0], in_process[0][1])  # two different views
    other_seed = _epoch(make_datamodule(seed=6))
    assert not torch.equal(other_seed[0][0], in_process[0][0])


def test_seeded_item_restores_the_callers_rng() -> None:
    datamodule = make_datamodule()
    dataset = datamodule.train_dataloader().dataset
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    first = dataset[(3, 1234)]
    assert torch.equal(torch.rand(3), expected_next)  # the transform's draws left no trace
    again = dataset[(3, 1234)]
    assert torch.equal(first[0][0], again[0][0]) and torch.equal(first[0][1], again[0][1])


def test_sampler_order_position_and_seed_checks() -> None:
    sampler = ResumableSampler(40, 8, seed=3)
    epoch0 = [i for i, _ in sampler]
    assert sorted(epoch0) == list(range(40)) and epoch0 != list(range(40))
    assert [i for i, _ in sampler] == epoch0  # a pure function of (seed, epoch)
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != epoch0
    sampler.advance(8)
    sampler.advance(8)
    assert len(sampler) == 40 and [i for i, _ in sampler] == sampler.plan()[0][16:].tolist()
    sampler.set_epoch(1)  # the same epoch again (as after a restart) keeps the position
    assert sampler.consumed == 16
    # After a restart with batch 16: the 2 batches taken + the 1 whole batch of 16 left.
    bigger = ResumableSampler(40, 16, seed=3)
    bigger.load_state_dict(sampler.state_dict())
    assert len(bigger) == (2 + 1) * 16
    with pytest.raises(ValueError, match="resume with seed=3"):
        ResumableSampler(40, 8, seed=4).load_state_dict(sampler.state_dict())


def test_lightnings_sampler_replacement_is_refused_under_ddp() -> None:
    datamodule = make_datamodule()
    # Built, not launched: world size 2 as a DDP rank would see it.
    datamodule.trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=True, logger=False
    )
    with pytest.raises(ValueError, match=r"trainer\.use_distributed_sampler must be false"):
        datamodule.train_dataloader()
    datamodule.trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False
    )
    assert isinstance(datamodule.train_dataloader().sampler, ResumableSampler)
