"""Backbone factories: torchvision ResNets and a small ResNet for CPU runs.

Every factory returns an ``nn.Module`` mapping images (N, C, H, W) to features (N, out_dim),
with the classifier removed and an ``out_dim`` attribute giving the feature dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _stem_conv(in_channels: int, width: int, small_image_stem: bool) -> nn.Conv2d:
    if small_image_stem:
        # 3x3 stride-1 stem for 28-96 px images: the 7x7/2 conv + max-pool would discard most
        # of a CIFAR image before the first residual block.
        return nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)


def torchvision_resnet(
    name: str = "resnet18",
    in_channels: int = 3,
    small_image_stem: bool = False,
    zero_init_residual: bool = False,
) -> nn.Module:
    """A torchvision ResNet with ``fc`` replaced by identity.

    Args:
        name: one of ``resnet18, resnet34, resnet50, resnet101, resnet152``.
        in_channels: image channels; 1 builds a 1-channel first conv (no channel copying).
        small_image_stem: 3x3 stride-1 first conv and no max-pool (CIFAR-style stem).
        zero_init_residual: zero the last BN of each residual branch.
    """
    if name not in TORCHVISION_RESNETS:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {', '.join(TORCHVISION_RESNETS)}"
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    model: models.ResNet = getattr(models, name)(
        weights=None, zero_init_residual=zero_init_residual
    )
    if in_channels != 3 or small_image_stem:
        model.conv1 = _stem_conv(in_channels, model.conv1.out_channels, small_image_stem)
    if small_image_stem:
        model.maxpool = nn.Identity()
    out_dim = model.fc.in_features
    model.fc = nn.Identity()
    model.out_dim = out_dim
    return model


class SmallResNet(nn.Module):
    """A narrow ResNet of basic blocks for fast CPU runs on small images.

    Args:
        in_channels: image channels.
        widths: channels of each stage; stages after the first halve the resolution.
        blocks: residual blocks per stage.
        small_image_stem: 3x3 stride-1 stem without max-pool (default) or the ImageNet stem.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
        small_image_stem: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"widths and blocks need one entry per stage, got {list(widths)} and {list(blocks)}"
            )
        self.conv1 = _stem_conv(in_channels, widths[0], small_image_stem)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_image_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        stages: list[nn.Module] = []
        inplanes = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            layers: list[nn.Module] = [BasicBlock(inplanes, width, stride, downsample)]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            inplanes = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = inplanes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: Tensor) -> Tensor:
        """Map images (N, C, H, W) to features (N, out_dim)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.avgpool(self.layers(x))  # (N, out_dim, 1, 1)
        return torch.flatten(x, 1)  # (N, out_dim)
