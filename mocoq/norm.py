"""BatchNorm handling for MoCo's encoders.

A key encoder whose BatchNorm sees the whole batch leaks which key belongs to which query through
the batch statistics, and the model learns that shortcut instead of the images. The MoCo paper
shuffles the key batch across GPUs; on one device, ``split`` normalises N groups of the batch on
their own (as the official CIFAR-10 demo does), which emulates N devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KEY_BN_MODES = ("split", "none")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``num_splits`` groups of the batch apart.

    Group g holds the interleaved samples g, g + G, g + 2G, ... (a free reshape); batches are
    shuffled, so any fixed partition emulates G devices equally well.

    Parameters and buffers are those of ``nn.BatchNorm2d`` (state dicts are interchangeable); the
    running statistics are the mean over the groups. Evaluation is plain BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ValueError(f"num_splits must be positive, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: Tensor) -> Tensor:
        """Normalise input (N, C, H, W); in training N must be a multiple of ``num_splits``."""
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        batch, channels, height, width = input.shape
        groups = self.num_splits
        if batch % groups:
            raise ValueError(
                f"split BatchNorm needs a batch divisible by {groups} groups, got {batch}: "
                "change model.bn_splits or the batch size"
            )
        assert self.running_mean is not None and self.running_var is not None
        running_mean = self.running_mean.repeat(groups)  # (G * C,)
        running_var = self.running_var.repeat(groups)  # (G * C,)
        weight = self.weight.repeat(groups) if self.weight is not None else None
        bias = self.bias.repeat(groups) if self.bias is not None else None
        # (N, C, H, W) -> (N / G, G * C, H, W): group g's samples become channels g*C..(g+1)*C.
        grouped = input.reshape(batch // groups, groups * channels, height, width)
        out = F.batch_norm(
            grouped,
            running_mean,
            running_var,
            weight,
            bias,
            True,
            self.momentum if self.momentum is not None else 0.1,
            self.eps,
        )
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(groups, channels).mean(dim=0))
            self.running_var.copy_(running_var.view(groups, channels).mean(dim=0))
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        return out.reshape(batch, channels, height, width)


def convert_to_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`SplitBatchNorm2d`, in place.

    Weights and running statistics are carried over, so the result computes the same function in
    evaluation mode. Works on any backbone that uses ``nn.BatchNorm2d``.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            ).to(device=child.weight.device if child.weight is not None else None)
            split.load_state_dict(child.state_dict())
            split.train(child.training)
            setattr(module, name, split)
        else:
            convert_to_split_batchnorm(child, num_splits)
    return module
