"""Two-view MoCo augmentations and the clean evaluation transform, on uint8 tensors (C, H, W).

The recipes work for grayscale images too: on one channel, saturation and hue jitter and random
grayscale are identities (as in PIL), so only crop, flip, brightness, contrast and blur act.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian kernel of about 10% of the image side (the SimCLR/MoCo v2 rule), >= 3."""
    size = max(3, int(0.1 * image_size))
    return size if size % 2 else size + 1


class MoCoAugmentation:
    """Draws two independent augmented views of one image.

    Defaults are MoCo v2's recipe; MoCo v1's is ``jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1,
    blur_prob=0``. Call it on a uint8 image (C, H, W) to get two float views (C, S, S).

    Args:
        image_size: output side S (the side of the clean images the encoder is evaluated on).
        mean, std: per-channel normalisation (one value per channel).
        view_size: the augmented views' side when it is not ``image_size``: a smaller one
            trains faster (a convolution's cost grows with the pixels); the encoder, global
            pooling at its end, still embeds clean images of ``image_size``.
        crop_scale: area range of RandomResizedCrop.
        crop_ratio: aspect-ratio range of RandomResizedCrop (torchvision's default 3/4-4/3).
        jitter: (brightness, contrast, saturation, hue) strengths of ColorJitter.
        jitter_prob: probability of applying the colour jitter.
        grayscale_prob: probability of converting to grayscale.
        blur_prob: probability of Gaussian blur with sigma in ``blur_sigma``.
        flip_prob: probability of a horizontal flip.
        solarize_prob: probability of solarizing (pixels at or above ``solarize_threshold``, a
            fraction of the intensity range, are inverted): the intensity change left for
            grayscale images, where hue and saturation do nothing.
        erase_prob: probability of erasing one rectangle (RandomErasing: area ``erase_scale``
            of the image, aspect ratio in ``erase_ratio``) to the normalised mean (0), after
            the normalisation.
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
        view_size: int | None = None,
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
        if len(jitter) != 4:
            raise ValueError(
                f"jitter must be (brightness, contrast, saturation, hue), got {jitter}"
            )
        if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(
                f"crop_ratio must be (low, high) with 0 < low <= high, got {crop_ratio}"
            )
        if view_size is not None and view_size < 2:
            raise ValueError(f"view_size must be at least 2 (or null), got {view_size}")
        side = image_size if view_size is None else view_size
        steps: list[torch.nn.Module] = [
            v2.RandomResizedCrop(
                side, scale=tuple(crop_scale), ratio=tuple(crop_ratio), antialias=True
            )
        ]
        if jitter_prob > 0 and any(jitter):
            brightness, contrast, saturation, hue = jitter
            color = v2.ColorJitter(brightness, contrast, saturation, hue)
            steps.append(v2.RandomApply([color], p=jitter_prob))
        if grayscale_prob > 0:
            steps.append(v2.RandomGrayscale(p=grayscale_prob))
        if blur_prob > 0:
            blur = v2.GaussianBlur(blur_kernel_size(side), sigma=tuple(blur_sigma))
            steps.append(v2.RandomApply([blur], p=blur_prob))
        if not 0.0 < solarize_threshold <= 1.0:
            raise ValueError(f"solarize_threshold must be in (0, 1], got {solarize_threshold}")
        if solarize_prob > 0:
            # On the uint8 image: the threshold in its 0-255 range.
            threshold = solarize_threshold * 255.0
            steps.append(v2.RandomSolarize(threshold=threshold, p=solarize_prob))
        if flip_prob > 0:
            steps.append(v2.RandomHorizontalFlip(p=flip_prob))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        if erase_prob > 0:
            if len(erase_scale) != 2 or not 0 < erase_scale[0] <= erase_scale[1] < 1:
                raise ValueError(
                    f"erase_scale must be (low, high) with 0 < low <= high < 1, got {erase_scale}"
                )
            if len(erase_ratio) != 2 or not 0 < erase_ratio[0] <= erase_ratio[1]:
                raise ValueError(
                    f"erase_ratio must be (low, high) with 0 < low <= high, got {erase_ratio}"
                )
            scale, ratio = tuple(erase_scale), tuple(erase_ratio)
            steps.append(v2.RandomErasing(p=erase_prob, scale=scale, ratio=ratio, value=0.0))
        self.transform = v2.Compose(steps)

    def __call__(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (C, H, W) -> two float views, each (C, S, S)."""
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


class EvalTransform:
    """The clean view for kNN and evaluation: resize + centre crop (when needed) and normalise.

    Args:
        image_size: output side S.
        mean, std: per-channel normalisation.
        resize: shorter side to resize to before the centre crop; None skips both when the
            image is already S x S (in-memory datasets), else resizes to S / 0.875 (ImageNet rule).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize: int | None = None,
    ) -> None:
        self.image_size = image_size
        self.resize = resize if resize is not None else round(image_size / 0.875)
        self.crop = v2.Compose([v2.Resize(self.resize, antialias=True), v2.CenterCrop(image_size)])
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        )

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 (C, H, W) -> float (C, S, S)."""
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = self.crop(image)
        return self.normalize(image)
