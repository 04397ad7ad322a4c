"""BatchNorm handling for MoCo's encoders (``model.key_bn``).

A key encoder whose BatchNorm sees the whole batch leaks which key belongs to which query through
the batch statistics, and the model learns that shortcut instead of the images. The modes:

* ``shuffle``: the MoCo paper's answer under DDP. The key batch is shuffled across ranks before
  the key forward and put back in order after (:func:`batch_shuffle`, :func:`batch_unshuffle`),
  so a key's BatchNorm statistics come from other samples than its query's.
* ``split``: on one device, normalise N groups of the batch on their own
  (:class:`SplitBatchNorm2d`, as the official CIFAR-10 demo does), which emulates N devices.
* ``sync``: ``nn.SyncBatchNorm`` in both encoders (statistics over the global batch).
* ``none``: leave BatchNorm alone (for backbones without BatchNorm, or to study the leak).
* ``auto`` (default): ``shuffle`` when there is more than one rank, else ``split``.

All modes act on the input batch or replace ``BatchNorm`` layers in place, so they work with any
backbone, not only ResNets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mocoq.distributed import concat_all_gather, rank

KEY_BN_MODES = ("auto", "shuffle", "split", "sync", "none")


def resolve_key_bn(mode: str, world_size: int) -> str:
    """The mode ``auto`` stands for with ``world_size`` ranks; other modes are returned as is."""
    if mode not in KEY_BN_MODES:
        raise ValueError(f"model.key_bn must be one of {KEY_BN_MODES}, got {mode!r}")
    if mode == "auto":
        return "shuffle" if world_size > 1 else "split"
    return mode


@torch.no_grad()
def batch_shuffle(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Shuffle a batch across all ranks.

    Every rank passes its local batch (N, ...) and a ``generator`` in the same state, on the
    batch's device (the permutation is drawn from it on every rank, so no broadcast is needed).
    Returns this rank's share of the shuffled global batch (N, ...) and the index (W * N,) that
    :func:`batch_unshuffle` needs. At world size 1 the batch is permuted locally.
    """
    gathered = concat_all_gather(images)  # (W * N, ...)
    permutation = torch.randperm(
        gathered.shape[0], generator=generator, device=generator.device
    ).to(images.device)
    local = permutation.view(-1, images.shape[0])[rank()]  # (N,)
    return gathered[local], torch.argsort(permutation)


@torch.no_grad()
def batch_unshuffle(outputs: Tensor, unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle` on outputs (N, ...): each rank gets its own samples back."""
    gathered = concat_all_gather(outputs)  # (W * N, ...), in shuffled order
    local = unshuffle.view(-1, outputs.shape[0])[rank()]  # (N,)
    return gathered[local]


def convert_to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``module`` by ``nn.SyncBatchNorm`` (weights kept)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


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
            if child.affine:  # the same Parameter objects: requires_grad and identity carry over
                split.weight, split.bias = child.weight, child.bias
            split.train(child.training)
            setattr(module, name, split)
        else:
            convert_to_split_batchnorm(child, num_splits)
    return module
