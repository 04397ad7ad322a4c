"""torchvision_backbone: any torchvision classifier as a headless, MoCo-ready feature extractor."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import models

from mocoq.backbones import (
    SmallResNet,
    supported_torchvision_models,
    torchvision_backbone,
    torchvision_resnet,
)
from mocoq.heads import ProjectionHead
from mocoq.module import MoCoModule
from mocoq.norm import SplitBatchNorm2d, convert_to_split_batchnorm

# name -> the dimension of its pooled features, i.e. the input of the removed classifier's FIRST
# Linear (mobilenet_v3_small: 576, not its 1024-d hidden layer).
FEATURE_DIMS = {
    "mobilenet_v3_small": 576,
    "efficientnet_b0": 1280,
    "shufflenet_v2_x0_5": 1024,
    "resnet18": 512,
    "convnext_tiny": 768,
}
CNNS = [name for name in FEATURE_DIMS if name != "convnext_tiny"]  # BatchNorm2d, no Linear


@functools.cache
def _built(name: str, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return torchvision_backbone(name, in_channels=in_channels)


def build(name: str, in_channels: int = 3) -> nn.Module:
    """A fresh copy of a (cached) build: tests may change it."""
    return copy.deepcopy(_built(name, in_channels))


def images(n: int = 4, channels: int = 3, size: int = 32, seed: int = 0) -> Tensor:
    """Random images (n, channels, size, size)."""
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def executed_leaves(model: nn.Module, batch: Tensor) -> list[nn.Module]:
    """The leaf modules ``model`` runs on ``batch``, in call order."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, _i, _o: order.append(module))
        for m in model.modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model(batch)
    for hook in hooks:
        hook.remove()
    return order


@pytest.mark.parametrize("name", list(FEATURE_DIMS))
def test_features_are_the_pooled_map_with_the_whole_classifier_removed(name: str) -> None:
    model = build(name)
    assert model.out_dim == FEATURE_DIMS[name]
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            assert model(images()).shape == (4, FEATURE_DIMS[name])
    model.eval()
    thousand = [
        m
        for m in model.modules()
        if getattr(m, "out_features", None) == 1000 or getattr(m, "out_channels", None) == 1000
    ]
    assert not thousand  # no ImageNet classifier left
    computing = [m for m in executed_leaves(model, images()) if not isinstance(m, nn.Identity)]
    assert not isinstance(computing[-1], nn.Linear | nn.Dropout)  # no head layer runs last
    if name == "convnext_tiny":  # keeps the final LayerNorm2d and Flatten, drops the Linear
        assert [type(m).__name__ for m in model.classifier] == ["LayerNorm2d", "Flatten"]
    else:  # CNNs: no Linear at all (the SE blocks use 1x1 convs), hidden head layers included
        assert not any(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("name", CNNS)
def test_one_channel_images_get_a_fresh_one_channel_first_conv(name: str) -> None:
    rgb, gray = build(name), build(name, in_channels=1)
    rgb_conv = next(m for m in rgb.modules() if isinstance(m, nn.Conv2d))
    gray_conv = next(m for m in gray.modules() if isinstance(m, nn.Conv2d))
    assert gray_conv.in_channels == 1
    for attribute in ("out_channels", "kernel_size", "stride", "padding", "groups"):
        assert getattr(gray_conv, attribute) == getattr(rgb_conv, attribute), attribute
    assert (gray_conv.bias is None) == (rgb_conv.bias is None)
    with torch.no_grad():
        assert gray.eval()(images(channels=1)).shape == (4, FEATURE_DIMS[name])
    with pytest.raises(RuntimeError):  # no adapter that copies or averages channels
        gray(images(channels=3))


@pytest.mark.parametrize("name", CNNS)
def test_split_batchnorm_keeps_eval_outputs_and_trains(name: str) -> None:
    model = build(name)
    with torch.no_grad():  # move the running statistics away from their initial 0 / 1
        for seed in range(2):
            model(images(seed=seed) * 2 + 1)
    model.eval()
    with torch.no_grad():
        before = model(images(seed=5))
    plain = copy.deepcopy(model)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert batchnorms > 0

    convert_to_split_batchnorm(model, 2)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in model.modules()) == batchnorms
    with torch.no_grad():
        assert torch.allclose(model.eval()(images(seed=5)), before, atol=1e-5)
        # In training the two halves of the batch are normalised apart, unlike plain BatchNorm.
        torch.manual_seed(0)  # the same stochastic-depth draws for both
        split_train = model.train()(images(seed=6))
        torch.manual_seed(0)
        plain_train = plain.train()(images(seed=6))
    assert not torch.allclose(split_train, plain_train, atol=1e-4)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = next(model.parameters()).detach().clone()
    loss = model(images(seed=7)).square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(next(model.parameters()), first)


@pytest.mark.parametrize("in_channels", [3, 1])
@pytest.mark.parametrize("small_image_stem", [False, True])
def test_resnets_are_exactly_torchvision_resnet(in_channels: int, small_image_stem: bool) -> None:
    torch.manual_seed(1)
    ours = torchvision_backbone("resnet18", in_channels, small_image_stem, zero_init_residual=True)
    torch.manual_seed(1)
    reference = torchvision_resnet("resnet18", in_channels, small_image_stem, True)
    assert repr(ours) == repr(reference)
    assert ours.out_dim == reference.out_dim == 512
    theirs = reference.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in ours.state_dict().items())
    assert ours.state_dict().keys() == theirs.keys()


def last_batchnorm_side(model: nn.Module, size: int = 32) -> int:
    """Side of the last BatchNorm2d's output: the resolution that reaches the global pooling."""
    sides: list[int] = []
    last = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    hook = last.register_forward_hook(lambda _m, _i, output: sides.append(output.shape[-1]))
    with torch.no_grad():
        model.eval()(images(size=size))
    hook.remove()
    return sides[0]


@pytest.mark.parametrize(
    "name,gain", [("mobilenet_v3_small", 2), ("shufflenet_v2_x0_5", 4)]
)  # ShuffleNetV2 also loses its stem max-pool
def test_small_image_stem_stops_the_stem_downsampling(name: str, gain: int) -> None:
    small = torchvision_backbone(name, small_image_stem=True)
    conv = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert last_batchnorm_side(small) == gain * last_batchnorm_side(build(name))
    with torch.no_grad():
        assert small.eval()(images()).shape == (4, FEATURE_DIMS[name])


@pytest.mark.parametrize("name", ["convnext_tiny", "vit_b_16", "swin_t", "vgg11", "maxvit_t"])
def test_small_image_stem_is_refused_without_a_stride_2_conv_stem(name: str) -> None:
    with pytest.raises(ValueError, match=f"small_image_stem=true is not available for {name}"):
        torchvision_backbone(name, small_image_stem=True)


def test_vit_is_built_for_the_image_size_and_keeps_the_class_token() -> None:
    vit = torchvision_backbone("vit_b_32", image_size=32)
    assert vit.out_dim == 768 and isinstance(vit.heads, nn.Identity)
    with torch.no_grad():
        assert vit.eval()(images()).shape == (4, 768)
        with pytest.raises(AssertionError, match="Wrong image height"):
            vit(images(size=64))  # positional embeddings fix the side
    with pytest.raises(ValueError, match=r"cannot build vit_b_32 for 48x48.*patch size"):
        torchvision_backbone("vit_b_32", image_size=48)


def test_images_too_small_for_the_model_fail_at_build_time() -> None:
    with pytest.raises(ValueError, match="squeezenet1_1 does not accept 8x8 images"):
        torchvision_backbone("squeezenet1_1", image_size=8)
    assert torchvision_backbone("squeezenet1_1", image_size=32).out_dim == 512


def test_unknown_names_and_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'mobilenet_v3_small'.*list_models"):
        torchvision_backbone("mobilenet_v3_smal")
    with pytest.raises(ValueError, match=r"unknown torchvision classification model 'fasterrcnn"):
        torchvision_backbone("fasterrcnn_resnet50_fpn")  # a detection model
    with pytest.raises(ValueError, match="in_channels must be positive"):
        torchvision_backbone("resnet18", in_channels=0)
    with pytest.raises(ValueError, match="aux_logits=False"):
        torchvision_backbone("googlenet", aux_logits=True)


def test_every_torchvision_classification_model_has_a_rule() -> None:
    assert supported_torchvision_models() == models.list_models(module=models)


class TwoViews(Dataset[tuple[tuple[Tensor, Tensor], Tensor]]):
    """Two random one-channel 32x32 views per item, shaped like the datamodule's output."""

    def __init__(self, n: int = 16) -> None:
        self.views = images(n, channels=1, seed=1), images(n, channels=1, seed=2)

    def __len__(self) -> int:
        return self.views[0].shape[0]

    def __getitem__(self, index: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
        return (self.views[0][index], self.views[1][index]), torch.tensor(0)


@pytest.mark.parametrize("key_bn", ["none", "split"])
def test_moco_trains_with_a_torchvision_backbone(key_bn: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoCoModule(
        backbone=torchvision_backbone("mobilenet_v3_small", in_channels=1, small_image_stem=True),
        head=functools.partial(ProjectionHead, out_dim=8, num_layers=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        queue_size=32,
        ema_momentum=0.5,
        key_bn=key_bn,
        bn_splits=2,
    )
    assert module.feature_dim == 576
    splits = sum(isinstance(m, SplitBatchNorm2d) for m in module.key_backbone.modules())
    assert (splits > 0) == (key_bn == "split")
    query_before = copy.deepcopy(module.backbone.state_dict())
    key_before = copy.deepcopy(module.key_backbone.state_dict())
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TwoViews(), batch_size=4, drop_last=True))
    assert trainer.global_step == 2
    assert module.queue.pointer == 8  # two batches of 4 keys enqueued
    assert torch.isfinite(module.queue.keys).all()
    stem = "features.0.0.weight"  # the first conv, 1 -> 16 channels
    assert module.backbone.state_dict()[stem].shape == (16, 1, 3, 3)
    assert not torch.equal(module.backbone.state_dict()[stem], query_before[stem])  # SGD moved it
    assert not torch.equal(module.key_backbone.state_dict()[stem], key_before[stem])  # EMA too


@pytest.mark.parametrize(
    ("options", "sides"),
    [
        ({}, [28, 14, 7, 4]),  # the stem and the first stage at the input's resolution
        ({"strides": [2, 2, 2, 2]}, [14, 7, 4, 2]),  # the stem at 28 px, the stages from 14
        ({"stem_stride": 2}, [14, 7, 4, 2]),  # nothing at 28 px
        ({"strides": [1, 1, 2, 2]}, [28, 28, 14, 7]),
    ],
)
def test_small_resnet_stage_resolutions(options: dict[str, Any], sides: list[int]) -> None:
    model = SmallResNet(1, widths=(8, 16, 16, 32), **options)
    seen: list[int] = []
    for stage in model.layers:
        stage.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[-1]))
    stem = model.conv1(torch.zeros(1, 1, 28, 28))
    assert stem.shape[-1] == (14 if options.get("stem_stride") == 2 else 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 32)
    assert seen == sides


def test_small_resnet_refuses_bad_strides() -> None:
    with pytest.raises(ValueError, match=r"strides needs one 1 or 2 per stage, got \[1, 2\]"):
        SmallResNet(1, widths=(8, 16, 32), blocks=(1, 1, 1), strides=[1, 2])
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2, got 3"):
        SmallResNet(1, stem_stride=3)
    with pytest.raises(ValueError, match="stem_stride applies to the small-image stem"):
        SmallResNet(1, small_image_stem=False, stem_stride=2)
