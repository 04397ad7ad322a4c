"""The batched on-device augmentation against the per-image torchvision recipe."""

from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from test_data import make_datamodule as make_data_module
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from mocoq.data.batched import AugmentParams, BatchedMoCoAugmentation
from mocoq.data.datamodule import ImageBatch, MoCoDataModule
from mocoq.data.transforms import MoCoAugmentation

NO_COLOR: dict[str, Any] = {
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "blur_prob": 0.0,
    "flip_prob": 0.0,
}


def images(n: int, channels: int, side: int, seed: int = 0) -> Tensor:
    """Random uint8 images (n, C, side, side)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=generator)


def ks_statistic(a: Tensor, b: Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_bound(n: int, m: int, alpha: float = 1e-3) -> float:
    """The KS statistic two samples of one distribution exceed with probability ``alpha``."""
    return math.sqrt(-0.5 * math.log(alpha / 2) * (n + m) / (n * m))


def per_image(image: Tensor, params: AugmentParams, i: int, aug: BatchedMoCoAugmentation) -> Tensor:
    """torchvision's ops, one image, sample ``i``'s parameters, in the recipe's order, on floats."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    box = [int(params.top[i]), int(params.left[i]), int(params.height[i]), int(params.width[i])]
    x = TF.resized_crop(x, *box, size=[aug.image_size] * 2, antialias=True)
    if params.jitter[i]:
        brightness, contrast, saturation, hue = params.factors[i].tolist()
        for op in params.order[i].tolist():
            if op == 0:
                x = TF.adjust_brightness(x, brightness)
            elif op == 1:
                x = TF.adjust_contrast(x, contrast)
            elif op == 2:
                x = TF.adjust_saturation(x, saturation)
            else:
                x = TF.adjust_hue(x, hue)
    if params.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=x.shape[0])
    if params.blur[i]:
        sigma = float(params.sigma[i])
        x = TF.gaussian_blur(x, [aug.blur_kernel] * 2, [sigma, sigma])
    if params.solarize[i]:
        x = TF.solarize(x, aug.solarize_threshold)
    if params.flip[i]:
        x = TF.horizontal_flip(x)
    x = TF.normalize(x, list(aug.mean), list(aug.std))
    if params.erase[i]:
        top, left, height, width = params.erase_box[i].tolist()
        x = TF.erase(x, top, left, height, width, torch.zeros(()))
    return x


@pytest.mark.parametrize(
    ("channels", "side", "size", "extra"),
    [
        (3, 32, 32, False),
        (1, 28, 28, False),
        (3, 40, 16, False),
        (1, 28, 28, True),  # solarize and random erasing too
        (3, 32, 32, True),
    ],
)
def test_matches_torchvision_ops_for_the_same_parameters(
    channels: int, side: int, size: int, extra: bool
) -> None:
    # Upscaling crops (side == size) and downscaling ones (40 -> 16, antialiased) alike.
    options = {"solarize_prob": 0.4, "erase_prob": 0.5} if extra else {}
    aug = BatchedMoCoAugmentation(
        size, [0.4] * channels, [0.2] * channels, jitter_prob=0.9, **options
    )
    batch = images(48, channels, side)
    params = aug.sample_params(48, side, side, torch.Generator().manual_seed(1))
    assert params.jitter.any() and params.blur.any() and params.flip.any()
    assert params.grayscale.any() and not params.grayscale.all()
    assert bool(params.solarize.any()) == bool(params.erase.any()) == extra
    views = aug.apply(batch, params)
    expected = torch.stack([per_image(batch[i], params, i, aug) for i in range(48)])
    torch.testing.assert_close(views, expected, atol=1e-4, rtol=0)


def test_shapes_dtypes_determinism_and_two_different_views() -> None:
    aug = BatchedMoCoAugmentation(16, [0.5] * 3, [0.25] * 3)
    batch = images(8, 3, 20)
    view_a, view_b = aug(batch, torch.Generator().manual_seed(3))
    assert view_a.shape == view_b.shape == (8, 3, 16, 16)
    assert view_a.dtype == view_b.dtype == torch.float32
    again_a, again_b = aug(batch, torch.Generator().manual_seed(3))
    assert torch.equal(view_a, again_a) and torch.equal(view_b, again_b)
    assert not torch.equal(view_a, view_b)
    other_a, _ = aug(batch, torch.Generator().manual_seed(4))
    assert not torch.equal(view_a, other_a)
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(aug(batch, torch.Generator().manual_seed(3))[0], view_a)
    with pytest.raises(ValueError, match="uint8"):
        aug(batch.float(), torch.Generator())
    with pytest.raises(ValueError, match="1 channels but mean/std have 3"):
        aug(batch[:, :1], torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_images_device_and_matches_the_cpu() -> None:
    aug = BatchedMoCoAugmentation(28, [0.3], [0.3])
    batch = images(256, 1, 28)
    params = aug.sample_params(256, 28, 28, torch.Generator().manual_seed(0))
    on_device = AugmentParams(*(getattr(params, f).cuda() for f in params.__dataclass_fields__))
    views = aug.apply(batch.cuda(), on_device)
    assert views.device.type == "cuda"
    torch.testing.assert_close(views.cpu(), aug.apply(batch, params), atol=1e-4, rtol=0)
    view_a, _ = aug(batch.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert view_a.device.type == "cuda" and view_a.shape == (256, 1, 28, 28)


def test_crop_area_and_aspect_ratio_follow_random_resized_crop() -> None:
    n, height, width = 4000, 28, 28
    aug = BatchedMoCoAugmentation(28, [0.5], [0.5], crop_scale=(0.08, 1.0), **NO_COLOR)
    params = aug.sample_params(n, height, width, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(28, scale=(0.08, 1.0))
    draws = [crop.make_params([torch.zeros(1, height, width)]) for _ in range(n)]
    reference = {key: torch.tensor([d[key] for d in draws]) for key in draws[0]}
    for batched, single in [
        (
            params.height * params.width / (height * width),
            reference["height"] * reference["width"] / (height * width),
        ),
        (params.width / params.height, reference["width"] / reference["height"]),
        (params.top.float(), reference["top"].float()),
    ]:
        assert ks_statistic(batched, single) < ks_bound(n, n)
    assert (params.top + params.height <= height).all() and (
        params.left + params.width <= width
    ).all()
    assert (params.height >= 1).all() and (params.width >= 1).all()


def test_centre_crop_fallback_when_no_try_fits() -> None:
    # A 10:1 image with ratios near 1 and whole-image areas: no try fits, torchvision's fallback
    # is the centre crop of ratio 4/3 (height 4, width round(4 * 4 / 3) = 5).
    aug = BatchedMoCoAugmentation(8, [0.5], [0.5], crop_scale=(1.0, 1.0), **NO_COLOR)
    params = aug.sample_params(64, 4, 40, torch.Generator().manual_seed(0))
    assert (params.height == 4).all() and (params.width == 5).all()
    assert (params.top == 0).all() and (params.left == (40 - 5) // 2).all()


def test_brightness_shift_matches_the_per_image_path() -> None:
    """Jitter only (strong brightness and contrast): the per-image mean-brightness change of the
    batched views has the distribution of the per-image recipe's, on the same images."""
    n, jitter = 2000, (0.6, 0.6, 0.0, 0.0)
    options = {**NO_COLOR, "jitter": jitter, "jitter_prob": 0.8, "crop_scale": (1.0, 1.0)}
    batch = images(n, 1, 12) // 2 + 64  # mid-grey images, so that clamping is rare
    batched = BatchedMoCoAugmentation(12, [0.0], [1.0], **options)
    single = MoCoAugmentation(12, [0.0], [1.0], **options)
    view, _ = batched(batch, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    reference = torch.stack([single(image)[0] for image in batch])
    before = batch.float().mean(dim=(1, 2, 3)) / 255
    shift = view.mean(dim=(1, 2, 3)) - before
    expected = reference.mean(dim=(1, 2, 3)) - before
    assert ks_statistic(shift, expected) < ks_bound(n, n)
    assert (shift.abs() < 1e-6).float().mean().item() == pytest.approx(0.2, abs=0.03)
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    torch.testing.assert_close(
        shift.quantile(quantiles), expected.quantile(quantiles), atol=0.03, rtol=0
    )


def test_flip_grayscale_blur_probabilities_and_sigma_range() -> None:
    n = 8000
    aug = BatchedMoCoAugmentation(
        16,
        [0.5] * 3,
        [0.5] * 3,
        grayscale_prob=0.3,
        blur_prob=0.6,
        flip_prob=0.5,
        blur_sigma=(0.5, 1.5),
    )
    params = aug.sample_params(n, 16, 16, torch.Generator().manual_seed(0))
    tolerance = 4 * math.sqrt(0.25 / n)  # 4 standard errors
    assert params.flip.float().mean().item() == pytest.approx(0.5, abs=tolerance)
    assert params.grayscale.float().mean().item() == pytest.approx(0.3, abs=tolerance)
    assert params.blur.float().mean().item() == pytest.approx(0.6, abs=tolerance)
    assert params.jitter.float().mean().item() == pytest.approx(0.8, abs=tolerance)
    sigma = params.sigma
    assert sigma.min() >= 0.5 and sigma.max() <= 1.5
    uniform = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    assert ks_statistic(sigma, uniform) < ks_bound(n, n)
    # Every one of the 24 jitter orders, about equally often.
    codes = (params.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes)[codes.unique()]
    assert len(counts) == 24 and counts.min() > n / 24 * 0.7


def test_flip_mirrors_the_view() -> None:
    aug = BatchedMoCoAugmentation(
        8, [0.0], [1.0], crop_scale=(1.0, 1.0), **{**NO_COLOR, "flip_prob": 1.0}
    )
    batch = images(4, 1, 8)
    view, _ = aug(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(view, batch.float().flip(-1) / 255)


def test_grayscale_images_get_brightness_and_contrast_only() -> None:
    """On one channel, saturation and hue do nothing and grayscale is the identity."""
    batch = images(64, 1, 10)
    strong: dict[str, Any] = {
        "jitter": (0.0, 0.0, 0.9, 0.5),
        "jitter_prob": 1.0,
        "grayscale_prob": 1.0,
    }
    aug = BatchedMoCoAugmentation(
        10, [0.0], [1.0], crop_scale=(1.0, 1.0), blur_prob=0.0, flip_prob=0.0, **strong
    )
    view, _ = aug(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(view, batch.float() / 255)


def test_erasing_follows_random_erasing_and_solarize_its_probability() -> None:
    aug = BatchedMoCoAugmentation(
        28, [0.5], [0.25], solarize_prob=0.3, erase_prob=0.6, erase_scale=(0.05, 0.3)
    )
    params = aug.sample_params(4000, 28, 28, torch.Generator().manual_seed(0))
    assert abs(float(params.solarize.float().mean()) - 0.3) < 0.03
    assert abs(float(params.erase.float().mean()) - 0.6) < 0.03  # nearly every draw fits
    top, left, height, width = params.erase_box[params.erase].double().unbind(dim=1)
    area = height * width / 28**2
    assert area.min() >= 0.03 and area.max() <= 0.33  # the scale, up to rounding to pixels
    assert float(area.mean()) == pytest.approx(0.175, abs=0.01)
    ratio = (height / width).log()
    assert ratio.min() >= math.log(0.3) - 0.25 and ratio.max() <= math.log(3.3) + 0.25
    assert (top + height).max() <= 28 and (left + width).max() <= 28
    plain = BatchedMoCoAugmentation(28, [0.5], [0.25]).sample_params(
        64, 28, 28, torch.Generator().manual_seed(0)
    )
    assert not plain.erase.any() and not plain.solarize.any()


def test_from_transform_reads_the_per_image_recipe() -> None:
    single = MoCoAugmentation(
        24,
        [0.1, 0.2, 0.3],
        [0.4, 0.5, 0.6],
        crop_scale=(0.3, 0.9),
        jitter=(0.4, 0.3, 0.2, 0.1),
        jitter_prob=0.7,
        grayscale_prob=0.1,
        blur_prob=0.4,
        blur_sigma=(0.2, 1.0),
        flip_prob=0.25,
        crop_ratio=(0.5, 2.0),
        solarize_prob=0.2,
        solarize_threshold=0.6,
        erase_prob=0.3,
        erase_scale=(0.1, 0.2),
        erase_ratio=(0.5, 1.5),
    )
    batched = BatchedMoCoAugmentation.from_transform(single)
    assert batched.image_size == 24 and batched.crop_scale == (0.3, 0.9)
    assert batched.crop_ratio == (0.5, 2.0)
    assert (batched.solarize_prob, batched.solarize_threshold) == (0.2, pytest.approx(0.6))
    assert (batched.erase_prob, batched.erase_scale, batched.erase_ratio) == (
        0.3,
        (0.1, 0.2),
        (0.5, 1.5),
    )
    assert batched.jitter_ranges == [(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]
    assert (batched.jitter_prob, batched.grayscale_prob, batched.blur_prob, batched.flip_prob) == (
        0.7,
        0.1,
        0.4,
        0.25,
    )
    assert batched.blur_sigma == (0.2, 1.0) and batched.mean == (0.1, 0.2, 0.3)
    single.transform.transforms.insert(1, v2.RandomVerticalFlip())
    with pytest.raises(ValueError, match="no batched version of RandomVerticalFlip"):
        BatchedMoCoAugmentation.from_transform(single)


def make_datamodule(**kwargs: object) -> MoCoDataModule:
    """test_data's small synthetic data module, with batches augmented after transfer."""
    options: dict[str, object] = {"augment_on_device": True, "seed": 5}
    options.update(kwargs)
    return make_data_module(**options)


def test_datamodule_serves_raw_batches_and_augments_them_after_transfer() -> None:
    datamodule = make_datamodule()
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 2 and datamodule.batched_augment is not None
    raw = batches[0]
    assert isinstance(raw, ImageBatch) and raw.images.dtype == torch.uint8
    assert raw.images.shape == (16, 3, 12, 12) and raw.targets.shape == (16,)
    order, seeds = datamodule._train_sampler.plan()  # type: ignore[union-attr]
    base = datamodule.split("train")
    assert torch.equal(raw.images, base.images[order[:16]])  # type: ignore[attr-defined]
    assert raw.seed == int(seeds[order[0]])  # the batch's seed: its first item's
    (view_a, view_b), targets = datamodule.on_after_batch_transfer(raw, 0)
    assert view_a.shape == view_b.shape == (16, 3, 12, 12) and torch.equal(targets, raw.targets)
    # The views are a function of the batch's place in the epoch: the same again, and
    # other views for the second batch's seed.
    (again_a, _), _ = datamodule.on_after_batch_transfer(batches[0], 0)
    assert torch.equal(view_a, again_a)
    other = ImageBatch(raw.images, raw.targets, batches[1].seed)
    assert not torch.equal(datamodule.on_after_batch_transfer(other, 0)[0][0], view_a)
    clean = (torch.zeros(2, 3, 12, 12), torch.zeros(2))
    assert datamodule.on_after_batch_transfer(clean, 0) is clean  # other batches pass through


def test_on_before_batch_transfer_counts_raw_batches() -> None:
    datamodule = make_datamodule()
    datamodule.trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    datamodule.trainer.training = True
    loader = datamodule.train_dataloader()
    datamodule.on_before_batch_transfer(next(iter(loader)), 0)
    assert datamodule.train_position()["consumed"] == 16


def test_datamodule_falls_back_to_per_image_augmentation(caplog: pytest.LogCaptureFixture) -> None:
    class Folder(torch.utils.data.Dataset[tuple[Tensor, int]]):  # decodes per item: no .images
        def __len__(self) -> int:
            return 40

        def __getitem__(self, index: int) -> tuple[Tensor, int]:
            return images(1, 3, 12, seed=index)[0], 0

    with caplog.at_level("INFO", logger="mocoq.data.datamodule"):
        datamodule = make_datamodule(loader=lambda root, split: Folder())
        (view_a, _), _ = next(iter(datamodule.train_dataloader()))
    assert view_a.shape == (16, 3, 12, 12) and datamodule.batched_augment is None
    assert "augmenting each image in the workers instead" in caplog.text
    assert "not one in-memory uint8 tensor" in caplog.text
    off = make_datamodule(augment_on_device=False)
    (view_a, _), _ = next(iter(off.train_dataloader()))
    assert view_a.shape == (16, 3, 12, 12) and off.batched_augment is None
