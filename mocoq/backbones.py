"""Backbone factories: any torchvision classification model, and a small ResNet for CPU runs.

Every factory returns an ``nn.Module`` mapping images (N, C, H, W) to features (N, out_dim),
with the classifier removed and an ``out_dim`` attribute giving the feature dimension.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def _stem_conv(in_channels: int, width: int, small_image_stem: bool, stride: int = 1) -> nn.Conv2d:
    if small_image_stem:
        # 3x3 stem for 28-96 px images: the 7x7/2 conv + max-pool would discard most of a CIFAR
        # image before the first residual block.
        return nn.Conv2d(in_channels, width, kernel_size=3, stride=stride, padding=1, bias=False)
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
        small_image_stem: 3x3 stem without max-pool (default) or the ImageNet stem.
        stem_stride: stride of the small-image stem: 1 keeps the input's resolution in the
            first stage, 2 halves it (a quarter of the compute of every stage; on 28 px
            Fashion-MNIST the stages then run at 14, 7, 4 and 2 px).
        strides: stride of each stage's first block; None: 1 for the first stage, 2 after.
            ``[2, 2, 2, 2]`` keeps the stem at the input's resolution and halves it from the
            first stage on.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
        small_image_stem: bool = True,
        stem_stride: int = 1,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(
                f"widths and blocks need one entry per stage, got {list(widths)} and {list(blocks)}"
            )
        strides = [1] + [2] * (len(widths) - 1) if strides is None else list(strides)
        if len(strides) != len(widths) or any(stride not in (1, 2) for stride in strides):
            raise ValueError(f"strides needs one 1 or 2 per stage, got {strides}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if stem_stride != 1 and not small_image_stem:
            raise ValueError("stem_stride applies to the small-image stem (small_image_stem=true)")
        self.conv1 = _stem_conv(in_channels, widths[0], small_image_stem, stem_stride)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if small_image_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        stages: list[nn.Module] = []
        inplanes = widths[0]
        for width, count, stride in zip(widths, blocks, strides, strict=True):
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


# --- any torchvision classification model ---------------------------------------------------

_LIST_MODELS_HINT = "torchvision.models.list_models(module=torchvision.models)"

# Where each family keeps its classification head, keyed by the module that defines the builder
# (``torchvision.models.get_model_builder(name).__module__``). The rule is the same for every
# family: the features are the model's globally pooled representation (the class token for ViT),
# after any normalisation that precedes the head; every Linear of the head is removed, hidden
# ("pre-logits") ones included, with the dropout and activations around them.
_HEAD_ATTRIBUTE = {
    "torchvision.models.resnet": "fc",  # ResNet, ResNeXt, Wide ResNet
    "torchvision.models.regnet": "fc",
    "torchvision.models.shufflenetv2": "fc",
    "torchvision.models.googlenet": "fc",
    "torchvision.models.inception": "fc",
    "torchvision.models.densenet": "classifier",  # Linear
    "torchvision.models.mobilenetv2": "classifier",  # Dropout, Linear
    "torchvision.models.mobilenetv3": "classifier",  # Linear, Hardswish, Dropout, Linear
    "torchvision.models.efficientnet": "classifier",  # Dropout, Linear (V1 and V2)
    "torchvision.models.mnasnet": "classifier",  # Dropout, Linear
    "torchvision.models.convnext": "classifier",  # LayerNorm2d, Flatten, Linear
    "torchvision.models.maxvit": "classifier",  # pool, Flatten, LayerNorm, Linear, Tanh, Linear
    "torchvision.models.swin_transformer": "head",  # Linear (V1 and V2)
    "torchvision.models.vision_transformer": "heads",  # [pre_logits Linear, Tanh,] Linear
}
# Families whose head is an MLP on a fixed-size map, or a 1x1 conv: replaced by global pooling.
_POOLED_BY_US = (
    "torchvision.models.vgg",
    "torchvision.models.alexnet",
    "torchvision.models.squeezenet",
)
# Families with a stride-2 convolutional stem that ``small_image_stem`` may make stride 1 (not
# MaxViT: its attention grids are sized from the input size when it is built).
_SMALL_STEM_FAMILIES = (
    "torchvision.models.resnet",
    "torchvision.models.regnet",
    "torchvision.models.shufflenetv2",
    "torchvision.models.densenet",
    "torchvision.models.mobilenetv2",
    "torchvision.models.mobilenetv3",
    "torchvision.models.efficientnet",
    "torchvision.models.mnasnet",
    "torchvision.models.googlenet",
    "torchvision.models.inception",
    "torchvision.models.squeezenet",
)
# Families built for one input size: image_size is passed to the constructor under this name.
_FIXED_SIZE_ARGUMENT = {
    "torchvision.models.vision_transformer": "image_size",  # side divisible by the patch size
    "torchvision.models.maxvit": "input_size",  # every stage's grid divisible by the partition
}


def _family(name: str) -> str:
    return models.get_model_builder(name).__module__


def supported_torchvision_models() -> list[str]:
    """Names :func:`torchvision_backbone` accepts: classification models of a known family."""
    return [
        name
        for name in models.list_models(module=models)
        if _family(name) in _HEAD_ATTRIBUTE or _family(name) in _POOLED_BY_US
    ]


def _strip_head(head: nn.Module) -> tuple[nn.Module, int]:
    """The part of a classification head to keep, and the dimension of the features it sees.

    Keeps the layers before the head's first Linear except dropout (ConvNeXt's LayerNorm2d and
    Flatten, MaxViT's pool, Flatten and LayerNorm); drops that Linear and everything after it.
    """
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            kept = [m for m in layers[:index] if not isinstance(m, nn.Dropout)]
            return (nn.Sequential(*kept) if kept else nn.Identity()), layer.in_features
    raise ValueError(f"found no Linear layer in the classification head {head}")


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _remove_classifier(model: nn.Module, family: str) -> int:
    """Remove ``model``'s classifier in place; return the feature dimension F."""
    if family in _HEAD_ATTRIBUTE:
        attribute = _HEAD_ATTRIBUTE[family]
        kept, out_dim = _strip_head(getattr(model, attribute))
        setattr(model, attribute, kept)
        if family in ("torchvision.models.googlenet", "torchvision.models.inception"):
            model.dropout = nn.Identity()  # applied between the pooling and ``fc``
        return out_dim
    if family == "torchvision.models.squeezenet":
        # Dropout, 1x1 conv to the classes, ReLU, global pool -> global pool of the last Fire
        # module's output; forward() flattens it to (N, F).
        assert isinstance(model, models.SqueezeNet)
        final_conv = model.classifier[1]
        assert isinstance(final_conv, nn.Conv2d)
        model.classifier = nn.AdaptiveAvgPool2d(1)
        return final_conv.in_channels
    # VGG and AlexNet pool to 7x7 / 6x6 and flatten into a 3-layer MLP: global average pooling of
    # the last conv map instead (the MLP's 4096-d hidden layers are head, not backbone).
    assert isinstance(model, models.VGG | models.AlexNet)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Identity()
    return _last_conv_channels(model.features)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d to take the images")


def _stem_max_pool(model: nn.Module, first_conv: str) -> str | None:
    """The name of a max-pool between the first conv and the next conv (module order), if any."""
    seen_first = False
    for name, module in model.named_modules():
        if name == first_conv:
            seen_first = True
        elif seen_first and isinstance(module, nn.Conv2d):
            return None
        elif seen_first and isinstance(module, nn.MaxPool2d):
            return name
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _replace_stem(model: nn.Module, name: str, in_channels: int, small_image_stem: bool) -> None:
    """Give ``model`` an ``in_channels`` first conv and, optionally, a stride-1 stem."""
    conv_name, conv = _first_conv(model)
    if small_image_stem:
        if conv.stride != (2, 2):
            raise ValueError(
                f"small_image_stem=true is not available for {name}: it makes a stride-2 first "
                f"conv stride 1, and {name}'s first conv has kernel {conv.kernel_size} and "
                f"stride {conv.stride}; set small_image_stem=false"
            )
        new_conv = nn.Conv2d(
            in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None
        )
    else:
        if in_channels % conv.groups:
            raise ValueError(
                f"{name}'s first conv has {conv.groups} groups, which do not divide "
                f"in_channels={in_channels}"
            )
        new_conv = nn.Conv2d(
            in_channels,
            conv.out_channels,
            kernel_size=conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
    if conv.bias is not None and new_conv.bias is not None:
        with torch.no_grad():
            new_conv.bias.copy_(conv.bias)  # one value per output channel: not channel copying
    _set_submodule(model, conv_name, new_conv)
    if small_image_stem:
        pool = _stem_max_pool(model, conv_name)
        if pool is not None:
            _set_submodule(model, pool, nn.Identity())


def torchvision_backbone(
    name: str,
    in_channels: int = 3,
    small_image_stem: bool = False,
    image_size: int | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Any torchvision classification model, randomly initialised, with its classifier removed.

    The result maps images (N, in_channels, H, W) to features (N, out_dim) and has an ``out_dim``
    attribute. The features are the model's globally pooled representation, after any
    normalisation that precedes the head (the class token for ViT); every Linear of the head is
    removed, hidden ones included, with the dropout and activations around them. So
    ``mobilenet_v3_small`` gives its 576-d pooled features (not the 1024-d Hardswish layer),
    ConvNeXt keeps its final LayerNorm2d and Flatten, MaxViT its pool, Flatten and LayerNorm,
    ViT drops its optional pre-logits layer, and VGG / AlexNet / SqueezeNet globally average the
    last conv map (512, 256 and 512 channels) in place of their MLP or 1x1-conv heads.
    Module names stay torchvision's; only the head and, if asked, the stem are replaced.

    Args:
        name: a name in ``torchvision.models.list_models(module=torchvision.models)``.
        in_channels: image channels C. Other than 3, the first ``nn.Conv2d`` (module order) is
            replaced by one with the same hyper-parameters and ``in_channels`` inputs, freshly
            initialised (no channel copying).
        small_image_stem: for 28-96 px images, a 3x3 stride-1 first conv, and no stem max-pool
            if one follows it, so the stem stops downsampling. For ResNets this is exactly
            :func:`torchvision_resnet`'s stem. Only CNNs whose first conv has stride 2 (ResNet,
            ResNeXt, Wide ResNet, RegNet, ShuffleNetV2, DenseNet, MobileNetV2/V3, EfficientNet,
            MNASNet, GoogLeNet, Inception v3, SqueezeNet); others raise ValueError.
        image_size: side S of the (square) training images. ViT and MaxViT are built for exactly
            this size (ViT needs S divisible by its patch size, MaxViT a multiple of 224); every
            model is probed with a (1, C, S, S) batch so that a size it cannot take (too small
            for AlexNet or Inception v3, say) fails here with a ValueError. None: no probe, and
            ViT / MaxViT take 224 x 224 images.
        **model_kwargs: passed to the torchvision builder (``zero_init_residual``,
            ``stochastic_depth_prob``, ``dropout``, ...). GoogLeNet and Inception v3 are built
            with ``aux_logits=False``.

    Raises:
        ValueError: an unknown name, a bad ``in_channels``, a stem that cannot be made small or
            an image size the model does not accept.
    """
    available = models.list_models(module=models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown torchvision classification model {name!r}{hint} "
            f"(the valid names: {_LIST_MODELS_HINT})"
        )
    family = _family(name)
    if family not in _HEAD_ATTRIBUTE and family not in _POOLED_BY_US:
        raise ValueError(
            f"{name} ({family}) has no classifier-removal rule; choose one of "
            f"mocoq.backbones.supported_torchvision_models()"
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if small_image_stem and family not in _SMALL_STEM_FAMILIES:
        raise ValueError(
            f"small_image_stem=true is not available for {name}: it makes a stride-2 first conv "
            "stride 1, and patch-embedding (ViT, Swin, ConvNeXt), stride-1 (VGG), stride-4 "
            "(AlexNet) and MaxViT stems have none to change; set small_image_stem=false"
        )
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    kwargs = dict(model_kwargs)
    if family in ("torchvision.models.googlenet", "torchvision.models.inception"):
        if kwargs.setdefault("aux_logits", False):
            raise ValueError(f"{name} needs aux_logits=False: the backbone returns one tensor")
        kwargs.setdefault("init_weights", True)  # torchvision's current default, without a warning
        if kwargs.get("transform_input") and in_channels != 3:
            raise ValueError(f"{name}'s transform_input=True needs in_channels=3")
    if image_size is not None and family in _FIXED_SIZE_ARGUMENT:
        argument = _FIXED_SIZE_ARGUMENT[family]
        kwargs.setdefault(argument, image_size if argument == "image_size" else (image_size,) * 2)
    try:
        model = models.get_model(name, weights=None, **kwargs)
    except (AssertionError, ValueError) as error:  # ViT asserts the patch size divides the side
        size = f" for {image_size}x{image_size} images" if image_size is not None else ""
        raise ValueError(
            f"cannot build {name}{size} ({error}); choose an image size it accepts "
            "(dataset.image_size), other arguments or another backbone.name"
        ) from error
    out_dim = _remove_classifier(model, family)
    if in_channels != 3 or small_image_stem:
        _replace_stem(model, name, in_channels, small_image_stem)
    model.out_dim = out_dim
    if image_size is not None:
        _probe(model, name, in_channels, image_size)
    return model


def _probe(model: nn.Module, name: str, in_channels: int, image_size: int) -> None:
    """Check that ``model`` maps (1, C, S, S) images to (1, out_dim) features."""
    was_training = model.training
    model.eval()  # leaves BatchNorm statistics alone and takes a batch of one
    try:
        with torch.no_grad():
            features = model(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as error:
        raise ValueError(
            f"{name} does not accept {image_size}x{image_size} images ({error}); use larger "
            "images (dataset.image_size) or another backbone.name"
        ) from error
    finally:
        model.train(was_training)
    if tuple(features.shape) != (1, model.out_dim):
        raise RuntimeError(
            f"{name} gave features of shape {tuple(features.shape)}, expected (1, {model.out_dim})"
        )
