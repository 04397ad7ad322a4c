"""MoCo's two-view augmentation for a whole batch at once, on the batch's device.

:class:`BatchedMoCoAugmentation` draws, for every image of a uint8 batch (N, C, H, W), the same
random parameters as the per-image recipe :class:`mocoq.data.transforms.MoCoAugmentation`
(torchvision v2), from the same distributions, and applies them with batched tensor ops:

* RandomResizedCrop: torchvision's ``get_params`` with its 10 tries drawn at once (the first
  valid try wins, else the centre-crop fallback). Resampling multiplies by per-sample
  interpolation matrices (N, S, H) and (N, S, W) that hold torchvision's antialiased bilinear
  weights (a triangle filter widened by the scale when downscaling, plain bilinear when
  upscaling, the crop's edge pixels repeated), so crops match ``resized_crop(antialias=True)``.
* ColorJitter: brightness, contrast and saturation are blends ``f * x + (1 - f) * ref`` (ref
  0, the grayscale mean, the grayscale image) and hue an HSV rotation, applied in a random
  order per sample: at each of the 4 positions every sample blends with its own factor and
  reference (factor 1 is the identity) and the samples whose op there is hue are rotated.
* RandomGrayscale, Gaussian blur (per-sample sigma, a depthwise separable convolution with
  per-sample kernels, reflect padding; unblurred samples get a delta kernel), RandomSolarize
  (pixels at or above the threshold inverted) and the flip (folded into the crop's column
  matrix: every later op commutes with a horizontal flip).
* RandomErasing after the normalisation: torchvision's 10 tries of an area fraction and a
  log-uniform aspect ratio, drawn at once; the first that fits strictly inside the image is
  set to 0, and a sample where none fits is left whole.

Differences from the per-image path: it computes in float32 throughout, while torchvision
rounds to uint8 after the crop, each jitter op, grayscale and blur (up to 0.5/255 per step).
On one channel, saturation, hue and grayscale are identities, as in torchvision.

All draws come from the caller's generator, so a batch's views are a pure function of the
images and the generator state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from mocoq.data.transforms import MoCoAugmentation, blur_kernel_size

# ColorJitter's op ids, as torchvision numbers them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


@dataclass
class AugmentParams:
    """Per-sample random parameters of one view of N images.

    Attributes:
        top, left, height, width: crop box in input pixels, int64 (N,).
        flip: horizontal flip, bool (N,).
        jitter: colour jitter applied, bool (N,).
        factors: (brightness, contrast, saturation, hue) factors, float32 (N, 4); neutral
            (1, 1, 1, 0) where the jitter is off or the strength is 0.
        order: the jitter ops' order, a permutation of (0, 1, 2, 3) per sample, int64 (N, 4).
        grayscale: converted to grayscale, bool (N,).
        blur: blurred, bool (N,).
        sigma: blur sigma, float32 (N,) (drawn for every sample, used where ``blur``).
        solarize: solarized, bool (N,) (all False when the recipe has no solarize).
        erase: a rectangle erased, bool (N,) (all False when the recipe has no erasing).
        erase_box: the erased rectangle (top, left, height, width) in output pixels, int64
            (N, 4) (used where ``erase``).
    """

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor
    erase: Tensor
    erase_box: Tensor


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    device, dtype = generator.device, torch.float32
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (high - low) + low


def grayscale(images: Tensor) -> Tensor:
    """torchvision's luma of RGB floats (N, 3, H, W) -> (N, 1, H, W)."""
    red, green, blue = images.unbind(dim=1)
    luma = red * _GRAY_WEIGHTS[0] + green * _GRAY_WEIGHTS[1] + blue * _GRAY_WEIGHTS[2]
    return luma.unsqueeze(1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB floats in [0, 1] (N, 3, H, W) -> HSV (N, 3, H, W), hue in [0, 1) (PIL's formulas)."""
    red, green, blue = images.unbind(dim=1)
    maxc, minc = images.amax(dim=1), images.amin(dim=1)  # (N, H, W) each
    flat = maxc == minc  # grays: hue and saturation 0, and no division by zero below
    spread = maxc - minc
    saturation = spread / torch.where(flat, torch.ones_like(maxc), maxc)
    spread = torch.where(flat, torch.ones_like(spread), spread)
    rc, gc, bc = (maxc - red) / spread, (maxc - green) / spread, (maxc - blue) / spread
    red_max = maxc == red
    green_max = (maxc == green) & ~red_max
    blue_max = ~red_max & ~green_max
    hue = (bc - gc) * red_max + (2.0 + rc - bc) * green_max + (4.0 + gc - rc) * blue_max
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maxc), dim=1)


def hsv_to_rgb(images: Tensor) -> Tensor:
    """HSV (N, 3, H, W), hue in [0, 1) -> RGB floats (N, 3, H, W)."""
    hue, saturation, value = images.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    sector = sector.long().remainder(6)
    p = (value * (1.0 - saturation)).clamp(0.0, 1.0)
    q = (value * (1.0 - saturation * fraction)).clamp(0.0, 1.0)
    t = (value * (1.0 - saturation * (1.0 - fraction))).clamp(0.0, 1.0)
    vpqt = torch.stack((value, p, q, t), dim=1)  # (N, 4, H, W)
    # Which of (v, p, q, t) is R, G, B in each of the 6 hue sectors.
    table = torch.tensor(
        [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=images.device
    )
    select = table[:, sector].movedim(0, 1)  # (3, N, H, W) -> (N, 3, H, W)
    return vpqt.gather(1, select)


def shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB floats (N, 3, H, W) by ``shift`` (N,) turns."""
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + shift[:, None, None], 1.0)  # (N, H, W)
    return hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def resample_weights(start: Tensor, length: Tensor, size_in: int, size_out: int) -> Tensor:
    """Interpolation matrices (N, size_out, size_in) of antialiased bilinear resizing.

    Output pixel ``j`` of sample ``n`` averages the input pixels ``k`` of its crop
    ``[start, start + length)`` with weights ``max(0, 1 - |k + 0.5 - c| / s)``, normalised, where
    ``c = start + (j + 0.5) * length / size_out`` and ``s = max(1, length / size_out)``: PyTorch's
    ``interpolate(mode="bilinear", antialias=True)`` of the cropped image (plain bilinear with
    clamped edges when upscaling).

    Args:
        start, length: crop offset and size along this axis, int64 (N,).
    """
    start_f, length_f = start.float()[:, None, None], length.float()[:, None, None]  # (N, 1, 1)
    scale = length_f / size_out
    device = start.device
    centre = start_f + (torch.arange(size_out, device=device).float()[None, :, None] + 0.5) * scale
    pixel = torch.arange(size_in, device=device).float()[None, None, :]  # (1, 1, size_in)
    weights = (1.0 - ((pixel + 0.5 - centre) / scale.clamp(min=1.0)).abs()).clamp(min=0.0)
    inside = (pixel >= start_f) & (pixel < start_f + length_f)  # (N, 1, size_in)
    weights = weights * inside  # (N, size_out, size_in)
    return weights / weights.sum(dim=-1, keepdim=True)


class BatchedMoCoAugmentation:
    """Two augmented views of every image of a uint8 batch, computed on the batch's device.

    Takes the parameters of :class:`mocoq.data.transforms.MoCoAugmentation` (and
    :meth:`from_transform` reads them off one), so one ``conf/augment`` config drives both.

    Args:
        image_size: output side S.
        mean, std: per-channel normalisation (one value per channel).
        crop_scale: area range of RandomResizedCrop.
        jitter: (brightness, contrast, saturation, hue) strengths of ColorJitter.
        jitter_prob: probability of applying the colour jitter.
        grayscale_prob: probability of converting to grayscale.
        blur_prob: probability of Gaussian blur with sigma in ``blur_sigma``.
        blur_sigma: (low, high) range of the blur's sigma.
        flip_prob: probability of a horizontal flip.
        crop_ratio: aspect-ratio range of RandomResizedCrop (torchvision's default).
        solarize_prob: probability of solarizing, with ``solarize_threshold`` a fraction of
            the intensity range.
        erase_prob: probability of erasing a rectangle of area ``erase_scale`` and aspect
            ratio ``erase_ratio`` to 0 after the normalisation.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float] = (0.2, 1.0),
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        flip_prob: float = 0.5,
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        solarize_prob: float = 0.0,
        solarize_threshold: float = 0.5,
        erase_prob: float = 0.0,
        erase_scale: Sequence[float] = (0.02, 0.33),
        erase_ratio: Sequence[float] = (0.3, 3.3),
    ) -> None:
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}"
            )
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(
                f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio}"
            )
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(
                "jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                f"got {jitter}"
            )
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(
                f"blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}"
            )
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.jitter = tuple(float(x) for x in jitter)
        # The factor ranges ColorJitter draws from: [max(0, 1 - x), 1 + x] and [-h, h].
        self.jitter_ranges = [(max(0.0, 1.0 - x), 1.0 + x) for x in self.jitter[:3]]
        self.jitter_ranges.append((-self.jitter[3], self.jitter[3]))
        self.jitter_prob = jitter_prob
        self.grayscale_prob = grayscale_prob
        self.blur_prob = blur_prob
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_kernel = blur_kernel_size(image_size)
        self.flip_prob = flip_prob
        self.solarize_prob = solarize_prob
        self.solarize_threshold = float(solarize_threshold)
        self.erase_prob = erase_prob
        self.erase_scale = (float(erase_scale[0]), float(erase_scale[1]))
        self.erase_ratio = (float(erase_ratio[0]), float(erase_ratio[1]))

    @classmethod
    def from_transform(cls, augmentation: MoCoAugmentation) -> BatchedMoCoAugmentation:
        """The batched twin of a per-image augmentation, read off its torchvision steps.

        Raises ValueError on a step it does not reproduce.
        """
        options: dict[str, object] = {"jitter_prob": 0.0, "grayscale_prob": 0.0}
        options.update(blur_prob=0.0, flip_prob=0.0)
        kernel: Sequence[int] = ()
        jitter_ranges: list[tuple[float, float]] = []
        for step in augmentation.transform.transforms:
            inner = step.transforms[0] if isinstance(step, v2.RandomApply) else None
            if isinstance(step, v2.RandomResizedCrop):
                bilinear = v2.InterpolationMode(step.interpolation) == v2.InterpolationMode.BILINEAR
                if step.size[0] != step.size[1] or not bilinear or not step.antialias:
                    raise ValueError(f"no batched version of {step}")
                options.update(image_size=step.size[0], crop_scale=step.scale)
                options.update(crop_ratio=step.ratio)
            elif isinstance(inner, v2.ColorJitter) and len(step.transforms) == 1:
                # Ranges (1 - x, 1 + x) and (-h, h), or None for a strength of 0.
                ranges = (inner.brightness, inner.contrast, inner.saturation, inner.hue)
                centres = (1.0, 1.0, 1.0, 0.0)
                jitter_ranges = [
                    (centre, centre) if r is None else r
                    for r, centre in zip(ranges, centres, strict=True)
                ]
                strengths = [
                    high - centre for (_, high), centre in zip(jitter_ranges, centres, strict=True)
                ]
                options.update(jitter=strengths, jitter_prob=step.p)
            elif isinstance(step, v2.RandomGrayscale):
                options.update(grayscale_prob=step.p)
            elif isinstance(inner, v2.GaussianBlur) and len(step.transforms) == 1:
                options.update(blur_prob=step.p, blur_sigma=inner.sigma)
                kernel = inner.kernel_size
            elif isinstance(step, v2.RandomHorizontalFlip):
                options.update(flip_prob=step.p)
            elif isinstance(step, v2.RandomSolarize):
                # The per-image step solarizes uint8 images: its threshold is in 0-255.
                options.update(solarize_prob=step.p, solarize_threshold=step.threshold / 255.0)
            elif isinstance(step, v2.RandomErasing):
                if step.value != [0.0]:
                    raise ValueError(f"no batched version of {step} (it erases to 0 only)")
                options.update(erase_prob=step.p, erase_scale=step.scale, erase_ratio=step.ratio)
            elif isinstance(step, v2.Normalize):
                options.update(mean=step.mean, std=step.std)
            elif not isinstance(step, v2.ToDtype):
                raise ValueError(f"no batched version of {step}")
        batched = cls(**options)  # type: ignore[arg-type]
        if jitter_ranges:  # torchvision's own ranges, free of the strengths' rounding
            batched.jitter_ranges = jitter_ranges
        if batched.blur_prob > 0 and list(kernel) != [batched.blur_kernel] * 2:
            raise ValueError(f"no batched version of a {kernel} blur kernel")
        return batched

    def sample_params(
        self, num_images: int, height: int, width: int, generator: torch.Generator
    ) -> AugmentParams:
        """Draw one view's parameters for ``num_images`` images of ``height`` x ``width``.

        The crop follows torchvision's ``RandomResizedCrop.get_params``: 10 tries of an area
        fraction uniform in ``crop_scale`` and an aspect ratio log-uniform in ``crop_ratio``; the
        first try that fits wins, with a uniform offset; none fits: the centre crop of the
        image clamped to the ratio range.
        """
        n, tries = num_images, 10
        device = generator.device
        log_low, log_high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        # Crop sizes in float64 as torchvision's Python floats; (N, tries) each.
        area = float(height * width) * _uniform(*self.crop_scale, (n, tries), generator).double()
        log_ratio = _uniform(log_low, log_high, (n, tries), generator).double()
        crop_w = torch.round(torch.sqrt(area * torch.exp(log_ratio))).long()
        crop_h = torch.round(torch.sqrt(area / torch.exp(log_ratio))).long()
        fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # (N, 1): index of the first fitting try
        fallback_w, fallback_h = self._fallback_crop(height, width)
        found = fits.any(dim=1)
        crop_w = torch.where(found, crop_w.gather(1, first)[:, 0], fallback_w)  # (N,)
        crop_h = torch.where(found, crop_h.gather(1, first)[:, 0], fallback_h)
        offsets = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
        top = (offsets[:, 0] * (height - crop_h + 1)).floor().long()
        left = (offsets[:, 1] * (width - crop_w + 1)).floor().long()
        top = torch.where(found, top, (height - crop_h) // 2)
        left = torch.where(found, left, (width - crop_w) // 2)

        coins = torch.rand((n, 4), generator=generator, device=device)
        jitter, grayscale = coins[:, 0] < self.jitter_prob, coins[:, 1] < self.grayscale_prob
        blur, flip = coins[:, 2] < self.blur_prob, coins[:, 3] < self.flip_prob
        # ColorJitter's factors: uniform in [max(0, 1 - x), 1 + x] and [-h, h]; (N, 4).
        factors = torch.stack(
            [_uniform(low, high, (n,), generator) for low, high in self.jitter_ranges], dim=1
        )
        neutral = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
        factors = torch.where(jitter[:, None], factors, neutral)
        order = torch.rand((n, 4), generator=generator, device=device).argsort(dim=1)
        sigma = _uniform(*self.blur_sigma, (n,), generator)
        # Drawn only when the recipe has them, so that recipes without them draw as before.
        solarize = torch.zeros(n, dtype=torch.bool, device=device)
        if self.solarize_prob > 0:
            solarize = torch.rand(n, generator=generator, device=device) < self.solarize_prob
        erase = torch.zeros(n, dtype=torch.bool, device=device)
        erase_box = torch.zeros((n, 4), dtype=torch.long, device=device)
        if self.erase_prob > 0:
            erase, erase_box = self._erase_boxes(n, generator)
        return AugmentParams(
            top, left, crop_h, crop_w, flip, jitter, factors, order, grayscale, blur, sigma,
            solarize, erase, erase_box,
        )  # fmt: skip

    def _erase_boxes(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """RandomErasing's draw for ``n`` output images (S x S): whether each is erased, bool
        (N,), and its box (top, left, height, width), int64 (N, 4). 10 tries of an area
        uniform in ``erase_scale`` and an aspect ratio log-uniform in ``erase_ratio``; the
        first that fits strictly inside wins, with a uniform offset; none fits: not erased."""
        size, tries, device = self.image_size, 10, generator.device
        coin = torch.rand(n, generator=generator, device=device) < self.erase_prob
        area = float(size * size) * _uniform(*self.erase_scale, (n, tries), generator).double()
        log_low, log_high = math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1])
        ratio = torch.exp(_uniform(log_low, log_high, (n, tries), generator).double())
        height = torch.round(torch.sqrt(area * ratio)).long()  # (N, tries)
        width = torch.round(torch.sqrt(area / ratio)).long()
        fits = (height < size) & (width < size)
        first = fits.int().argmax(dim=1, keepdim=True)  # (N, 1)
        height, width = height.gather(1, first)[:, 0], width.gather(1, first)[:, 0]  # (N,)
        offsets = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
        top = (offsets[:, 0] * (size - height + 1)).floor().long()
        left = (offsets[:, 1] * (size - width + 1)).floor().long()
        return coin & fits.any(dim=1), torch.stack([top, left, height, width], dim=1)

    def _fallback_crop(self, height: int, width: int) -> tuple[int, int]:
        """(width, height) of RandomResizedCrop's centre-crop fallback."""
        ratio = width / height
        if ratio < self.crop_ratio[0]:
            return width, round(width / self.crop_ratio[0])
        if ratio > self.crop_ratio[1]:
            return round(height * self.crop_ratio[1]), height
        return width, height

    def apply(self, images: Tensor, params: AugmentParams) -> Tensor:
        """One view: uint8 (N, C, H, W) and its parameters -> normalised float (N, C, S, S)."""
        _, channels, height, width = images.shape
        size = self.image_size
        pixels = images.float() / 255.0
        rows = resample_weights(params.top, params.height, height, size)  # (N, S, H)
        columns = resample_weights(params.left, params.width, width, size)  # (N, S, W)
        columns = torch.where(params.flip[:, None, None], columns.flip(1), columns)
        # (N, 1, S, H) @ (N, C, H, W) @ (N, 1, W, S) -> (N, C, S, S)
        x = rows[:, None] @ pixels @ columns.transpose(1, 2)[:, None]
        x = self._color_jitter(x, params)
        if channels == 3:
            x = torch.where(params.grayscale[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.blur_prob > 0:
            x = self._blur(x, params)
        if self.solarize_prob > 0:
            inverted = torch.where(x >= self.solarize_threshold, 1.0 - x, x)
            x = torch.where(params.solarize[:, None, None, None], inverted, x)
        mean = torch.tensor(self.mean, device=x.device).view(1, channels, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, channels, 1, 1)
        x = (x - mean) / std
        if self.erase_prob > 0:
            x = self._erase(x, params)
        return x

    def _erase(self, x: Tensor, params: AugmentParams) -> Tensor:
        """Set each erased sample's box of (N, C, S, S) to 0."""
        pixels = torch.arange(x.shape[-1], device=x.device)  # (S,)
        top, left, height, width = params.erase_box.unbind(dim=1)  # (N,) each
        rows = (pixels >= top[:, None]) & (pixels < (top + height)[:, None])  # (N, S)
        columns = (pixels >= left[:, None]) & (pixels < (left + width)[:, None])  # (N, S)
        box = rows[:, :, None] & columns[:, None, :] & params.erase[:, None, None]  # (N, S, S)
        return x.masked_fill(box[:, None], 0.0)

    def _color_jitter(self, x: Tensor, params: AugmentParams) -> Tensor:
        """Each sample's four jitter ops in its own order, on floats in [0, 1] (N, C, S, S)."""
        if self.jitter_prob <= 0 or not any(self.jitter):
            return x
        color = x.shape[1] == 3
        factors = params.factors
        if not color:  # saturation and hue do nothing to one channel
            factors = factors.clone()
            factors[:, SATURATION], factors[:, HUE] = 1.0, 0.0
        for position in range(4):
            op = params.order[:, position]  # (N,)
            factor = factors.gather(1, op[:, None]).squeeze(1)  # (N,)
            factor = torch.where(op == HUE, 1.0, factor).view(-1, 1, 1, 1)
            gray = grayscale(x) if color else x  # (N, 1, S, S)
            reference = torch.where(
                (op == CONTRAST).view(-1, 1, 1, 1),
                gray.mean(dim=(1, 2, 3), keepdim=True),
                torch.where((op == SATURATION).view(-1, 1, 1, 1), gray, 0.0),
            )
            x = (factor * x + (1.0 - factor) * reference).clamp(0.0, 1.0)
            if color and self.jitter[3] > 0:
                rotate = ((op == HUE) & params.jitter).nonzero().squeeze(1)  # (M,)
                if rotate.numel():
                    x = x.index_copy(0, rotate, shift_hue(x[rotate], factors[rotate, HUE]))
        return x

    def _blur(self, x: Tensor, params: AugmentParams) -> Tensor:
        """Per-sample Gaussian blur of (N, C, S, S); unblurred samples get a delta kernel."""
        n, channels, height, width = x.shape
        half = self.blur_kernel // 2
        offsets = torch.arange(-half, half + 1, device=x.device).float()  # (k,)
        kernel = torch.softmax(-0.5 * (offsets / params.sigma[:, None]) ** 2, dim=1)  # (N, k)
        delta = (offsets == 0).float().expand_as(kernel)
        kernel = torch.where(params.blur[:, None], kernel, delta)
        kernel = kernel.repeat_interleave(channels, dim=0)  # (N * C, k): one per plane
        planes = F.pad(x.reshape(1, n * channels, height, width), [half] * 4, mode="reflect")
        planes = F.conv2d(planes, kernel.view(-1, 1, 1, kernel.shape[1]), groups=n * channels)
        planes = F.conv2d(planes, kernel.view(-1, 1, kernel.shape[1], 1), groups=n * channels)
        return planes.view(n, channels, height, width)

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """uint8 (N, C, H, W) -> two float views (N, C, S, S), drawn from ``generator``.

        ``generator`` must be on the images' device.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[1] != len(self.mean):
            raise ValueError(
                f"the images have {images.shape[1]} channels but mean/std have {len(self.mean)}"
            )
        if generator.device.type != images.device.type:
            raise ValueError(
                f"the generator is on {generator.device}, the images on {images.device}"
            )
        n, _, height, width = images.shape
        first = self.apply(images, self.sample_params(n, height, width, generator))
        second = self.apply(images, self.sample_params(n, height, width, generator))
        return first, second

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)}"
            for name in (
                *("image_size", "crop_scale", "crop_ratio", "jitter", "jitter_prob"),
                *("grayscale_prob", "blur_prob", "blur_sigma", "flip_prob", "solarize_prob"),
                "erase_prob",
            )
        )
        return f"{type(self).__name__}({fields})"
