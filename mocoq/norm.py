"""BatchNorm handling for MoCo's encoders (``model.key_bn``).

A key encoder whose BatchNorm sees the whole batch leaks which key belongs to which query through
the batch statistics, and the model learns that shortcut instead of the images. The modes:

* ``shuffle``: the MoCo paper's answer under DDP. The key batch is shuffled across ranks before
  the key forward and put back in order after (:func:`batch_shuffle`, :func:`batch_unshuffle`),
  so a key's BatchNorm statistics come from other samples than its query's.
* ``split``: on one device, normalise N groups of the batch on their own in both encoders
  (:class:`SplitBatchNorm2d`) and shuffle the key batch before the key forward, as the official
  CIFAR-10 demo does: this emulates ``shuffle`` on N devices. Without the shuffle, key i and
  query i would be normalised with the same group of samples and the leak would remain.
* ``sync``: ``nn.SyncBatchNorm`` in both encoders (statistics over the global batch).
* ``none``: leave BatchNorm alone (for backbones without BatchNorm, or to study the leak).
* ``auto`` (default): ``shuffle`` when there is more than one rank, else ``split``.

All modes act on the input batch or replace ``BatchNorm`` layers in place, so they work with any
backbone, not only ResNets.
"""

from __future__ import annotations

import torch
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

    Group g holds the contiguous samples g * N/G ... (g + 1) * N/G - 1. The key batch is shuffled
    before the key forward (``key_bn=split`` does this, as the reference CIFAR-10 demo does), so
    a fixed partition emulates G devices. Each group goes through the native BatchNorm kernel on
    a slice of the batch, which is a view in either memory layout: no copy of the input, where a
    reshape of the groups into channels copies a channels-last batch.

    Parameters and buffers are those of ``nn.BatchNorm2d`` (state dicts are interchangeable); the
    running statistics are the mean over the groups of what each group's BatchNorm would keep.
    Evaluation is plain BatchNorm.
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
        groups = self.num_splits
        if input.shape[0] % groups:
            raise ValueError(
                f"split BatchNorm needs a batch divisible by {groups} groups, got "
                f"{input.shape[0]}: change model.bn_splits or the batch size"
            )
        tracked = self.track_running_stats and self.running_mean is not None
        outputs, means, invstds = [], [], []
        for chunk in input.chunk(groups):  # (N / G, C, H, W) each, a view in either layout
            # Batch statistics only: the running ones are updated below from the saved
            # statistics, not through in-place writes into views (which torch.compile's
            # inductor gets wrong in the backward pass).
            out, mean, invstd = torch.native_batch_norm(
                chunk, self.weight, self.bias, None, None, True, 0.0, self.eps
            )
            outputs.append(out)
            means.append(mean)
            invstds.append(invstd)
        if tracked:
            self._update_running_stats(
                torch.stack(means), torch.stack(invstds), input.numel() // groups // input.shape[1]
            )
        return torch.cat(outputs)  # (N, C, H, W), in the input's memory layout

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, invstds: Tensor, count: int) -> None:
        """Fold the groups' batch statistics (G, C) into the running ones, as G BatchNorms
        would (unbiased variance, momentum or the cumulative average), then average them."""
        assert self.running_mean is not None and self.running_var is not None
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d keeps it
            assert self.num_batches_tracked is not None
            momentum = 1.0 / float(self.num_batches_tracked)
        variances = (invstds.float().pow(-2) - self.eps) * (count / max(count - 1, 1))  # (G, C)
        self.running_mean.lerp_(means.float().mean(dim=0).to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(variances.mean(dim=0).to(self.running_var.dtype), momentum)


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
