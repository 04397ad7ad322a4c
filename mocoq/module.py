"""MoCoModule: the MoCo method as a LightningModule composed of built parts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mocoq.diagnostics import StepOutputs
from mocoq.distributed import concat_all_gather, world_size
from mocoq.ema import ema_update, init_key_from_query
from mocoq.loss import info_nce
from mocoq.norm import (
    batch_shuffle,
    batch_unshuffle,
    convert_to_split_batchnorm,
    convert_to_sync_batchnorm,
    resolve_key_bn,
)
from mocoq.queue import MemoryQueue
from mocoq.schedules import LRSchedule, ema_momentum_at

# Called with the trainable parameters, or with parameter groups when the online probe is on.
OptimizerFactory = Callable[[Iterable[nn.Parameter] | Iterable[dict[str, Any]]], Optimizer]
HeadFactory = Callable[[int], nn.Module]
# ((view_a, view_b), targets), or ((view_a, view_b, clean), targets) for the online probe.
Batch = tuple[tuple[Tensor, ...] | list[Tensor], Tensor]

PROBE_DECAY = 0.9
"""The online probe's logged loss and accuracy are ratios of exponentially decayed sums over the
labelled rows of recent steps (weight 0.9 per step: about the last 10 steps), so a step without
labels leaves them where they were instead of logging a 0."""


NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite value; the message names the step and the
    quantity, and says that the step's update was not applied."""


def channels_last_unsafe_convs(module: nn.Module) -> list[str]:
    """Names of the convolutions in ``module`` whose weight gradient oneDNN gets wrong on the CPU
    in channels-last layout: 1x1 kernel, stride > 1, fewer than 8 input channels.

    In torch 2.14's CPU build (oneDNN's AVX2 1x1 backward-weights kernel, seen on AMD EPYC Zen 3)
    such a convolution's weight gradient is wrong (absolute errors up to 50 in a 16-image test),
    or the call never returns, or the process crashes; the forward pass and the input gradient
    are right, and NCHW is right.
    ``torch.compile``'s inductor lays CPU convolutions out channels-last itself, so it hits the
    same kernel. Such layers only occur in very narrow networks (ResNet downsampling from fewer
    than 8 channels); a CPU run with one keeps NCHW and stays uncompiled.
    """
    return [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Conv2d)
        and layer.kernel_size == (1, 1)
        and max(layer.stride) > 1
        and layer.in_channels < 8
    ]


def repair_epoch_progress(checkpoint: dict[str, Any]) -> bool:
    """Make the fit loop's epoch counters of a mid-epoch checkpoint say that its epoch started.

    Lightning 2.6, resumed from a checkpoint written after the LAST batch of an epoch, does not
    count the next epoch as started. A checkpoint written later in that epoch then has batch
    progress in the epoch (``epoch_loop.batch_progress``) but epoch counters that say no epoch
    is running (``ready == processed``), and resuming from it restarts the epoch from its first
    batch while the data continue from the saved position: extra steps, and a run that no
    longer matches an uninterrupted one. The fix puts the counters in the form Lightning writes
    for any other mid-epoch checkpoint (``ready == started == processed + 1``). Returns whether
    the checkpoint needed it."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:
        return False
    batches = fit.get("epoch_loop.batch_progress", {})
    in_epoch = batches.get("current", {}).get("ready", 0) > 0 and not batches.get("is_last_batch")
    epochs = fit["epoch_progress"]
    total = epochs.get("total", {})
    if not in_epoch or total.get("ready") != total.get("processed"):
        return False
    for counters in (epochs["total"], epochs["current"]):
        counters["ready"] = counters["started"] = counters["processed"] + 1
    return True


class MoCoModule(pl.LightningModule):
    """Momentum Contrast: a query encoder, its EMA key encoder and a queue of negative keys.

    One training step on a batch of two views (x_a, x_b), each (N, C, H, W):

    1. queries ``q = normalize(head(backbone(x_a)))`` (N, D), with gradient;
    2. keys ``k = normalize(key_head(key_backbone(x_b)))`` (N, D), without;
    3. InfoNCE of each query against its key and the queue (K, D) as it was before the step;
    4. the keys are enqueued. With ``symmetric=True`` the roles are also swapped, both halves
       read the same queue, and both key sets are enqueued once, after both losses.

    After every optimizer step the key backbone AND key head move towards the query ones by EMA.

    Online linear probe (``online_probe=True``): a linear classifier ``probe`` (F -> classes)
    trained during pre-training on backbone features of the CLEAN view (the un-augmented image,
    as the kNN monitor and the linear evaluation see it), which the data module adds to every
    batch when the probe is on: one extra forward of the query backbone per step, in evaluation
    mode (BatchNorm uses, and does not update, its running statistics) and without gradient, so
    the features are what the frozen backbone would give at this step. Without a clean view in
    the batch (a custom data module), the probe falls back to the detached features of the
    augmented query view and logs under ``probe/aug_*`` instead. Its cross-entropy, over
    the labelled rows (targets >= 0; a batch without labels adds 0), is added to the loss that
    Lightning back-propagates: the features are detached, so its gradient reaches only the
    probe, and the MoCo gradients never reach the probe. The probe's parameters are their own
    parameter group of the one optimizer (learning rate ``probe_lr``, no weight decay), so it
    needs neither manual optimization nor a second optimizer, runs under DDP as the encoder does
    (its gradients are all-reduced with the others) and is saved and resumed with the module and
    the optimizer (``probe.weight``, ``probe.bias``, its momentum buffers). It follows the LR
    schedule like the encoder. Logged as ``probe/loss`` and ``probe/top1`` (clean views of the
    training batches, before the probe's update on them; see :data:`PROBE_DECAY`); the accuracy
    on clean validation images is ``probe/val_top1`` of
    :class:`mocoq.callbacks.EmbeddingProjector`.

    Diagnostics: while ``capture_step_outputs`` is set (by
    :class:`mocoq.callbacks.TrainingDiagnostics`, on the steps it logs) the step keeps its
    projections, logits and features, detached, in ``step_outputs``; nothing else changes.

    Args:
        backbone: images (N, C, H, W) -> features (N, F); must have an ``out_dim`` attribute.
        head: projection module (F -> D) or a factory called with F.
        optimizer: factory called with the trainable parameters (Hydra ``_partial_``).
        lr_schedule: per-step multiplier of the learning rate; None keeps it constant.
        queue_size: number of negative keys K.
        temperature: InfoNCE temperature (tau in the paper).
        ema_momentum: key-encoder momentum m (the paper's m).
        ema_momentum_schedule: ``constant`` or ``cosine`` (from ``ema_momentum`` to 1.0).
        symmetric: use the symmetrised loss (MoCo v2+ / the CIFAR-10 demo's symmetric variant).
        key_bn: how BatchNorm is kept from leaking the positive (see :mod:`mocoq.norm`):
            ``shuffle`` (the key batch is shuffled across ranks), ``split`` (``bn_splits`` groups
            of the batch are normalised apart in both encoders and the key batch is shuffled
            first, as the reference CIFAR-10 demo does: the one-device stand-in),
            ``sync`` (SyncBatchNorm, GPUs only), ``none``, or ``auto`` (default): ``shuffle``
            under DDP, ``split`` on one device. Resolved in :meth:`setup`, once the number of
            ranks is known; ``split`` is applied at construction.
        bn_splits: number of groups for ``key_bn=split``.
        channels_last: keep both backbones' weights, and the images given to them, in the
            channels-last (NHWC) layout: faster convolutions on GPUs with tensor cores and on
            the CPU (1.3x for the small ResNet's fp32 step; docs/benchmarks.md). On in
            ``conf/train.yaml``. Applied in :meth:`setup`.
        compile: ``torch.compile`` the forward of both backbones in :meth:`setup` (in place,
            so parameter names and checkpoints are the same as without it).
        online_probe: train the online linear probe (off: no probe parameters at all, and the
            checkpoints are those of a run without it).
        probe_num_classes: the probe's number of classes (labels must lie in [0, classes)).
        probe_lr: the probe's learning rate; None uses the optimizer's (the encoder's).
        on_nonfinite: what a step with a non-finite loss, key or gradient does. Every step is
            checked (one host-device synchronisation for the loss and keys, before the keys
            are enqueued, and one for the gradients, before the optimizer step). The step's
            update is never applied: no optimizer step, no EMA update, no enqueue. ``stop``
            (default) then raises :class:`NonFiniteError` naming the step and the first
            non-finite quantity (input views, weights, features, projections, keys, queue,
            logits, loss, gradients); the last checkpoint is left as it was. ``skip`` goes on
            with the next batch (the step counter still advances), up to
            ``max_nonfinite_skips`` such steps in the run, then stops as ``stop`` does.
        max_nonfinite_skips: the number of steps ``skip`` may leave out in a run.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | HeadFactory,
        optimizer: OptimizerFactory,
        lr_schedule: LRSchedule | None = None,
        queue_size: int = 65536,
        temperature: float = 0.2,
        ema_momentum: float = 0.999,
        ema_momentum_schedule: str = "constant",
        symmetric: bool = False,
        key_bn: str = "auto",
        bn_splits: int = 8,
        channels_last: bool = False,
        compile: bool = False,
        online_probe: bool = False,
        probe_num_classes: int = 10,
        probe_lr: float | None = None,
        on_nonfinite: str = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__()
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"model.on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        if max_nonfinite_skips < 0:
            raise ValueError(f"model.max_nonfinite_skips must be >= 0, got {max_nonfinite_skips}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"model.ema_momentum must be in [0, 1], got {ema_momentum}")
        resolve_key_bn(key_bn, 1)  # validates the name
        if bn_splits < 1:
            raise ValueError(f"model.bn_splits must be positive, got {bn_splits}")
        ema_momentum_at(0, 1, ema_momentum, ema_momentum_schedule)  # validates the name
        if online_probe and probe_num_classes < 1:
            raise ValueError(f"model.probe_num_classes must be positive, got {probe_num_classes}")
        if probe_lr is not None and probe_lr <= 0:
            raise ValueError(f"model.probe_lr must be positive (or null), got {probe_lr}")
        if not hasattr(backbone, "out_dim"):
            raise ValueError("the backbone needs an 'out_dim' attribute (its feature dimension)")
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "lr_schedule"])
        if key_bn == "split" and bn_splits > 1:
            convert_to_split_batchnorm(backbone, bn_splits)  # copied into the key encoder below
        self.backbone = backbone
        self.feature_dim = int(backbone.out_dim)  # type: ignore[arg-type]
        self.head = head if isinstance(head, nn.Module) else head(self.feature_dim)
        self.key_backbone = init_key_from_query(self.backbone)
        self.key_head = init_key_from_query(self.head)
        out_dim = int(getattr(self.head, "out_dim", 0)) or self._probe_out_dim()
        self.queue = MemoryQueue(queue_size, out_dim)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.temperature = temperature
        self.ema_momentum = ema_momentum
        self.ema_momentum_schedule = ema_momentum_schedule
        self.symmetric = symmetric
        self.key_bn = key_bn
        self.bn_splits = bn_splits
        # The mode in force; ``auto`` becomes ``shuffle`` or ``split`` in setup().
        self.key_bn_mode = key_bn if key_bn != "auto" else "split"
        self.channels_last = channels_last
        self.compile_backbones = compile
        self._compiled = False
        self._configured_lrs: list[float] = []  # set by configure_optimizers
        # Created last, so that the random draws above are the same with and without it.
        self.probe = nn.Linear(self.feature_dim, probe_num_classes) if online_probe else None
        self.probe_num_classes = probe_num_classes
        self.probe_lr = probe_lr
        self._probe_sums: Tensor | None = None  # decayed (loss, correct, count), see PROBE_DECAY
        self._probe_labels_checked = False
        self.capture_step_outputs = False
        self.step_outputs: StepOutputs | None = None
        self.on_nonfinite = on_nonfinite
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0  # steps left out so far in the run (checkpointed)
        self._skip_update = False  # this step's update must not be applied
        self._buffer_backup: list[Tensor] | None = None  # buffers at the step's start

    def setup(self, stage: str) -> None:
        """Resolve ``key_bn`` for the number of ranks and convert BatchNorm layers to match.

        Runs on every rank before the optimizer is built and before DDP wraps the model; the
        conversions keep parameter names and values, so checkpoints load across modes (a run
        started with ``split`` on one GPU resumes with ``shuffle`` on eight).
        """
        if self._trainer is None:
            self.configure_key_bn(world_size(), on_gpu=self.device.type != "cpu")
        else:
            # The module is moved to its device after this hook: ask the strategy where it goes.
            device = self.trainer.strategy.root_device
            self.configure_key_bn(self.trainer.world_size, on_gpu=device.type != "cpu")
        self.configure_speed()

    def configure_speed(self, device_type: str | None = None) -> None:
        """Apply ``channels_last`` and ``compile`` to both backbones (after the BatchNorm
        conversions, which may replace modules), for a run on ``device_type`` (default: the
        trainer's device, else the parameters'). Idempotent; changes no parameter name, value
        or shape, so checkpoints load across these options either way.

        On the CPU, a backbone with a layer from :func:`channels_last_unsafe_convs` keeps NCHW
        and runs uncompiled, with a warning: oneDNN computes that layer's gradient wrongly
        otherwise."""
        if device_type is None:
            on_trainer = self._trainer is not None
            device_type = (
                self.trainer.strategy.root_device.type
                if on_trainer
                else next(self.backbone.parameters()).device.type
            )
        unsafe = channels_last_unsafe_convs(self.backbone) if device_type == "cpu" else []
        if unsafe and (self.channels_last or self.compile_backbones):
            asked = [
                option
                for option, on in (
                    ("model.channels_last", self.channels_last),
                    ("model.compile", self.compile_backbones),
                )
                if on
            ]
            rank_zero_warn(
                f"{' and '.join(asked)} ignored on the CPU: the backbone's "
                f"{', '.join(unsafe[:3])} (1x1, strided, fewer than 8 input channels) would get "
                "wrong gradients from oneDNN in channels-last layout; the backbones run NCHW, "
                "uncompiled (widen the backbone's first stage to 8 channels or more to use them)"
            )
            self.channels_last = False
            self.compile_backbones = False
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.key_backbone.to(memory_format=torch.channels_last)
        if self.compile_backbones and not self._compiled:
            self.backbone.compile()  # compiles the module's call in place: same names, same keys
            self.key_backbone.compile()
            self._compiled = True

    def configure_key_bn(self, ranks: int, on_gpu: bool = True) -> str:
        """Apply ``key_bn`` for ``ranks`` ranks; returns the mode in force."""
        mode = resolve_key_bn(self.key_bn, ranks)
        if mode == "split" and self.bn_splits > 1:
            convert_to_split_batchnorm(self.backbone, self.bn_splits)
            convert_to_split_batchnorm(self.key_backbone, self.bn_splits)
        elif mode == "sync":
            if ranks > 1 and not on_gpu:
                raise ValueError(
                    "model.key_bn=sync needs GPUs (torch's SyncBatchNorm runs on CUDA only): "
                    "use model.key_bn=shuffle for DDP on CPUs"
                )
            if ranks == 1:
                rank_zero_warn(
                    "model.key_bn=sync on one device is plain BatchNorm, which leaks the positive "
                    "through the batch statistics: use model.key_bn=split (or auto) on one device"
                )
            self.backbone = convert_to_sync_batchnorm(self.backbone)
            self.key_backbone = convert_to_sync_batchnorm(self.key_backbone)
            self.head = convert_to_sync_batchnorm(self.head)
            self.key_head = convert_to_sync_batchnorm(self.key_head)
        elif mode == "shuffle" and ranks == 1:
            rank_zero_warn(
                "model.key_bn=shuffle on one device permutes one batch, which changes nothing: "
                "use model.key_bn=split (or auto) to keep BatchNorm from leaking the positive"
            )
        if mode != self.key_bn_mode or self.key_bn == "auto":
            rank_zero_info(f"key-encoder BatchNorm: {mode} ({ranks} rank{'s' * (ranks > 1)})")
        self.key_bn_mode = mode
        return mode

    def _probe_out_dim(self) -> int:
        with torch.no_grad():
            return int(self.head(torch.zeros(2, self.feature_dim)).shape[1])

    # --- pure computations ---------------------------------------------------------------
    def _layout(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in the backbones' memory layout (no copy when already in it)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward(self, images: Tensor) -> Tensor:
        """Backbone features (N, F) of images (N, C, H, W): what downstream tasks use."""
        return self.backbone(self._layout(images))

    def project(self, images: Tensor) -> Tensor:
        """L2-normalised query projections (N, D)."""
        return F.normalize(self.head(self.backbone(self._layout(images))), dim=1)

    @torch.no_grad()
    def project_keys(self, images: Tensor, shuffle_seed: int | None = None) -> Tensor:
        """L2-normalised key projections (N, D) from the EMA encoder, without gradient.

        With ``shuffle_seed`` (``key_bn=shuffle`` or ``split``) the batch is shuffled (across
        ranks, under DDP) with that seed for the forward pass and the keys are returned in the
        input's order: a key's BatchNorm statistics then come from other samples than those
        that normalised its query.
        """
        if shuffle_seed is None:
            return F.normalize(self.key_head(self.key_backbone(self._layout(images))), dim=1)
        # Drawn on the images' device: no host-device copy (and no sync) in the step.
        generator = torch.Generator(device=images.device).manual_seed(shuffle_seed)
        shuffled, unshuffle = batch_shuffle(images, generator)
        keys = F.normalize(self.key_head(self.key_backbone(self._layout(shuffled))), dim=1)
        return batch_unshuffle(keys, unshuffle)

    def _shuffle_seed(self, half: int) -> int | None:
        """Same on every rank and a pure function of the step, so a resumed run shuffles alike.

        ``split`` shuffles too: without it key i and query i are normalised with the same group
        of samples, and the positive is told apart by its batch statistics."""
        if self.key_bn_mode not in ("shuffle", "split"):
            return None
        return 2 * self.global_step + half

    # --- training ------------------------------------------------------------------------
    def check_batch_fits(self, batch_size: int, devices: int) -> None:
        """Refuse a step whose keys (batch x devices, x 2 if symmetric) overflow the queue."""
        views = 2 if self.symmetric else 1
        keys_per_step = batch_size * devices * views
        if keys_per_step > self.queue.size:
            raise ValueError(
                f"model.queue_size={self.queue.size} is smaller than the {keys_per_step} keys "
                f"enqueued per step (dataset.batch_size={batch_size} x {devices} devices"
                f"{' x 2 views' if views == 2 else ''}): raise model.queue_size to at least "
                f"{keys_per_step} or lower dataset.batch_size"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """The MoCo loss of one batch ``((view_a, view_b), targets)``, plus the online probe's
        loss when it is on (targets (N,) are used by the probe only; -1 marks no label). A third
        view (N, C, H, W) after the two, the clean view, is what the probe learns from."""
        views, targets = batch
        view_a, view_b = views[0], views[1]
        clean = views[2] if len(views) > 2 else None
        self._snapshot_buffers()  # BatchNorm statistics, put back if this step is left out
        self.check_batch_fits(view_a.shape[0], world_size())
        # The queue as it was before this step; cloned because the enqueue below writes in place
        # while autograd still needs these values for the backward pass.
        negatives = self.queue.keys.clone()  # (K, D)
        features_a = self.backbone(self._layout(view_a))  # (N, F): forward(view_a)
        query_a = F.normalize(self.head(features_a), dim=1)  # (N, D): project(view_a)
        key_b = self.project_keys(view_b, self._shuffle_seed(0))  # (N, D)
        loss, logits = info_nce(query_a, key_b, negatives, self.temperature)
        new_keys = key_b
        queries, keys, features = query_a, key_b, features_a
        if self.symmetric:
            features_b = self.backbone(self._layout(view_b))  # (N, F)
            query_b = F.normalize(self.head(features_b), dim=1)  # (N, D)
            key_a = self.project_keys(view_a, self._shuffle_seed(1))  # (N, D)
            loss_ba, logits_ba = info_nce(query_b, key_a, negatives, self.temperature)
            loss = loss + loss_ba  # summed, as in the reference symmetric recipe
            logits = torch.cat([logits, logits_ba])  # (2N, 1 + K)
            new_keys = torch.cat([key_b, key_a])  # (2N, D)
            if self.capture_step_outputs:
                queries, keys = torch.cat([query_a, query_b]), new_keys  # (2N, D) each
                features = torch.cat([features_a, features_b])  # (2N, F)
        total = loss
        probe_sums = None
        if self.probe is not None:
            probe_features = features_a.detach() if clean is None else self.clean_features(clean)
            probe_loss, probe_sums = self._probe_step(probe_features, targets)
            total = loss + probe_loss  # the probe's gradient stops at the detached features
        self._skip_update = False
        if not self._step_is_finite(total, new_keys):
            named = {
                "the input views": torch.stack([view_a.float().sum(), view_b.float().sum()]),
                "the query encoder's weights": self._parameter_sum(self.backbone, self.head),
                "the key encoder's weights": self._parameter_sum(self.key_backbone, self.key_head),
                "the query backbone's features": features_a,
                "the query projections": query_a,
                "the keys": new_keys,
                "the queue": negatives,
                "the logits": logits,
                "the loss": loss,
                "the online probe's loss": total,
            }
            return self._nonfinite_step(named, float(total.detach().float()))
        # One global queue: every rank enqueues every rank's keys, in rank order.
        self.queue.enqueue(concat_all_gather(new_keys))
        if self.capture_step_outputs:
            self.step_outputs = StepOutputs(
                queries.detach(), keys.detach(), logits.detach(), features.detach()
            )
        self._log_step(loss, logits.detach(), probe_sums, clean_probe=clean is not None)
        return total

    # --- non-finite steps ------------------------------------------------------------------
    def _step_is_finite(self, total: Tensor, keys: Tensor) -> bool:
        """Whether the loss (scalar) and the keys (N, D) are finite on every rank (one
        host-device synchronisation; under DDP one all-reduce, so all ranks agree)."""
        finite = (torch.isfinite(total.detach()) & torch.isfinite(keys).all()).float()
        if world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _encoder_buffers(self) -> list[Tensor]:
        """The running statistics of every encoder (BatchNorm means, variances, counts)."""
        modules = (self.backbone, self.head, self.key_backbone, self.key_head)
        return [b for m in modules for b in m.buffers()]

    @torch.no_grad()
    def _snapshot_buffers(self) -> None:
        """Copy the encoders' buffers (one fused copy; a few thousand numbers for a ResNet).
        The copies are made at the first step, on the device training runs on."""
        buffers = self._encoder_buffers()
        backup = self._buffer_backup
        if backup is None or len(backup) != len(buffers):
            self._buffer_backup = [b.clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(backup, buffers)

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        """Put back the buffers of the step's start: a left-out step's forward passes (in
        training mode, which updates BatchNorm's running statistics) leave no trace."""
        backup = self._buffer_backup
        buffers = self._encoder_buffers()
        if backup is not None and len(backup) == len(buffers) and buffers:
            torch._foreach_copy_(buffers, backup)

    @staticmethod
    def _parameter_sum(*modules: nn.Module) -> Tensor:
        """A scalar that is finite only if every parameter of ``modules`` is."""
        return torch.stack(
            [p.detach().float().sum() for m in modules for p in m.parameters()]
        ).sum()

    def _nonfinite_step(self, named: dict[str, Tensor], value: float) -> Tensor:
        """Leave this step's update out (or stop): ``named`` maps quantities, in the order
        they are computed, to tensors; the first non-finite one is reported. Returns a zero
        loss that reaches every trainable parameter, so that the backward pass (and DDP's
        gradient all-reduce) runs as usual; :meth:`on_before_optimizer_step` then drops the
        gradients, and :meth:`optimizer_step` skips the optimizer and the EMA."""
        culprit = next(
            (name for name, t in named.items() if not bool(torch.isfinite(t.detach()).all())),
            "a value on another rank" if world_size() > 1 else "a value inside the step",
        )
        self._handle_nonfinite(f"{culprit} went non-finite (the loss is {value})")
        zero = sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return zero if isinstance(zero, Tensor) else torch.zeros((), device=self.device)

    def _handle_nonfinite(self, what: str) -> None:
        """Raise :class:`NonFiniteError` (``stop``, or ``skip`` past its budget), else warn and
        mark the step's update to be left out (and put the encoders' buffers back)."""
        self._skip_update = True
        self._restore_buffers()
        step = self.global_step
        if self.on_nonfinite == "skip" and self.nonfinite_skips < self.max_nonfinite_skips:
            self.nonfinite_skips += 1
            rank_zero_warn(
                f"step {step}: {what}; the step's update was left out (model.on_nonfinite=skip: "
                f"{self.nonfinite_skips} of at most {self.max_nonfinite_skips} so far)"
            )
            return
        budget = (
            f" {self.nonfinite_skips} steps were already left out, the most "
            "model.max_nonfinite_skips allows;"
            if self.on_nonfinite == "skip"
            else ""
        )
        raise NonFiniteError(
            f"step {step}: {what}; the step's update was not applied and the run stopped;"
            f"{budget} the last checkpoint is as it was. Resume it (resume=<run dir>) with a "
            "lower optim.lr, trainer.precision=32-true or trainer.gradient_clip_val, or set "
            "model.on_nonfinite=skip to leave such steps out"
        )

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Check the gradients (one synchronisation; they are the same on every rank after
        DDP's all-reduce) and drop them all for a step whose update is left out."""
        if not self._skip_update:
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                names = {id(p): n for n, p in self.named_parameters()}
                first = next(
                    names.get(id(p), "?")
                    for g in optimizer.param_groups
                    for p in g["params"]
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())
                )
                self._handle_nonfinite(f"the gradient of {first} went non-finite")
        if self._skip_update:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None  # the optimizer leaves parameters without one alone

    @torch.no_grad()
    def clean_features(self, images: Tensor) -> Tensor:
        """Query backbone features (N, F) of clean images (N, C, H, W) in evaluation mode, as a
        frozen backbone gives them: BatchNorm normalises with its running statistics and leaves
        them as they are; no gradient. The backbone's training mode is restored after."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(self._layout(images))
        finally:
            self.backbone.train(was_training)

    def _probe_step(self, features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The online probe's cross-entropy on detached features (N, F) with targets (N,).

        Rows with a negative target (unlabelled) are left out; with none labelled the loss is an
        exact 0 that still involves the probe's parameters (DDP expects a gradient for every
        parameter on every step). Returns ``(loss, sums)``: the mean loss over the labelled rows
        and the float32 (3,) sums (loss, correct predictions, labelled rows) for logging.
        """
        if self.probe is None:
            raise RuntimeError("the online probe is off (model.online_probe=false)")
        targets = targets.long()
        if not self._probe_labels_checked:  # once: one host-device synchronisation in the run
            self._probe_labels_checked = True
            largest = int(targets.max()) if targets.numel() else -1
            if largest >= self.probe_num_classes:
                raise ValueError(
                    f"the online probe has {self.probe_num_classes} classes but the batch has "
                    f"label {largest}: set model.probe_num_classes to the dataset's number of "
                    "classes"
                )
        labelled = (targets >= 0).float()  # (N,)
        logits = self.probe(features)  # (N, classes)
        losses = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")  # (N,)
        count = labelled.sum()
        loss = (losses * labelled).sum() / count.clamp(min=1.0)
        correct = ((logits.argmax(dim=1) == targets).float() * labelled).sum()
        return loss, torch.stack([(losses.detach() * labelled).sum(), correct, count])

    def _log_step(
        self,
        loss: Tensor,
        logits: Tensor,
        probe_sums: Tensor | None = None,
        clean_probe: bool = True,
    ) -> None:
        """Log the loss, (1 + K)-way accuracy and mean positive / negative cosine similarity,
        averaged over ranks in one all-reduce (every rank has the same batch size); with the
        probe's (loss, correct, count) sums (3,), summed over ranks in the same all-reduce, as
        ``probe/*`` (clean views) or ``probe/aug_*`` (``clean_probe=False``: augmented views)."""
        similarity = logits.float() * self.temperature  # undo the 1/T: cosine similarities
        stats = torch.stack(
            [
                loss.detach().float(),
                (logits.argmax(dim=1) == 0).float().mean(),
                similarity[:, 0].mean(),
                similarity[:, 1:].mean(),
            ]
        )
        if probe_sums is not None:
            stats = torch.cat([stats, probe_sums.float()])
        ranks = world_size()
        if ranks > 1:
            dist.all_reduce(stats)
            stats = torch.cat([stats[:4] / ranks, stats[4:]])
        names = ("train/loss", "train/acc1", "train/pos_logit", "train/neg_logit")
        self.log_dict(dict(zip(names, stats[:4].unbind(), strict=True)), prog_bar=False)
        self.log("loss", stats[0], prog_bar=True, logger=False)
        if probe_sums is not None:
            previous = self._probe_sums
            decayed = stats[4:] if previous is None else previous * PROBE_DECAY + stats[4:]
            self._probe_sums = decayed
            labelled = decayed[2].clamp(min=1e-6)  # 0 / 1e-6 = 0 before any labelled row
            prefix = "probe/" if clean_probe else "probe/aug_"
            self.log(f"{prefix}loss", decayed[0] / labelled)
            self.log(f"{prefix}top1", decayed[1] / labelled)
        self.log("train/ema_momentum", self.current_ema_momentum())
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def total_steps(self) -> int | None:
        """The run's optimizer steps, which the schedules decay over; None while unknown (a
        time-budgeted run measuring its step rate, see :class:`mocoq.callbacks.TimeBudget`)."""
        if self._trainer is None:
            return 1
        total = self.trainer.estimated_stepping_batches
        return None if math.isinf(total) else max(1, int(total))

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (the unit of ``LRSchedule.warmup_epochs``)."""
        trainer = self.trainer
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # as Lightning's own estimated_stepping_batches does
        batches = trainer.num_training_batches
        if math.isinf(batches):  # an iterable dataset without a length
            return 1
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def current_ema_momentum(self) -> float:
        """The EMA momentum for the current optimizer step (constant or cosine towards 1)."""
        return ema_momentum_at(
            self.global_step, self.total_steps(), self.ema_momentum, self.ema_momentum_schedule
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then move the key encoder once (safe under accumulation). A
        step whose update is left out (non-finite) runs the optimizer on no gradients, which
        changes nothing, and skips the EMA."""
        super().optimizer_step(*args, **kwargs)
        if self._skip_update:
            self._skip_update = False
            return
        momentum = self.current_ema_momentum()
        ema_update(self.backbone, self.key_backbone, momentum)
        ema_update(self.head, self.key_head, momentum)

    def on_train_start(self) -> None:
        """Keep the configured base learning rates after a resume.

        A checkpoint restores the optimizer's and scheduler's base lr; a run resumed with another
        global batch (more devices) must use the lr configured for it, at the same point of the
        schedule.
        """
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is None or not self._configured_lrs:
            return
        configured = self._configured_lrs
        schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
        restored = list(getattr(schedulers[0], "base_lrs", [])) if schedulers else []
        if not restored:
            restored = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        if restored == configured:
            return
        for group, old, new in zip(optimizer.param_groups, restored, configured, strict=True):
            group["lr"] = group["lr"] * new / old if old else new
            group["initial_lr"] = new
        for scheduler in schedulers:
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = list(configured)
        rank_zero_info(
            f"base learning rate {restored[0]:.4g} from the checkpoint replaced by the configured "
            f"{configured[0]:.4g} (global batch or lr changed)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the count of steps left out as non-finite, so the budget spans resumes."""
        checkpoint["mocoq_nonfinite_skips"] = self.nonfinite_skips

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a run with the online probe switched on or off: the optimizer's
        parameter groups would not match. (Loading weights alone, e.g. ``init_weights``, works
        either way: see :meth:`_load_from_state_dict`.)"""
        self.nonfinite_skips = int(checkpoint.get("mocoq_nonfinite_skips", 0))
        repair_epoch_progress(checkpoint)
        if self._trainer is None or "optimizer_states" not in checkpoint:
            return
        had_probe = any(k.startswith("probe.") for k in checkpoint.get("state_dict", {}))
        if had_probe != (self.probe is not None):
            before, now = ("on", "off") if had_probe else ("off", "on")
            raise ValueError(
                f"the checkpoint was trained with the online probe {before}, this run has it "
                f"{now}: resume with model.online_probe={str(had_probe).lower()}, or start a new "
                "run from its weights with init_weights=<checkpoint>"
            )

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Load weights saved with or without the online probe into a module without or with it:
        a saved probe is dropped when the probe is off; a missing one keeps this module's fresh
        initialisation when it is on (a model state, recognised by its backbone keys, only)."""
        probe_keys = [k for k in state_dict if k.startswith(prefix + "probe.")]
        if self.probe is None:
            for key in probe_keys:
                del state_dict[key]
        elif not probe_keys and any(k.startswith(prefix + "backbone.") for k in state_dict):
            for name, value in self.probe.state_dict().items():
                state_dict[prefix + "probe." + name] = value
            rank_zero_info("the loaded weights have no online probe: it starts untrained")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def configure_optimizers(self) -> Any:
        """The optimizer over the trainable parameters (the probe's, when on, as a second
        parameter group with ``probe_lr`` and no weight decay) and the per-step LR schedule."""
        probe = list(self.probe.parameters()) if self.probe is not None else []
        probe_ids = {id(p) for p in probe}
        parameters = [p for p in self.parameters() if p.requires_grad and id(p) not in probe_ids]
        if probe:
            probe_group: dict[str, Any] = {"params": probe, "weight_decay": 0.0}
            if self.probe_lr is not None:
                probe_group["lr"] = self.probe_lr
            optimizer = self.optimizer_factory([{"params": parameters}, probe_group])
        else:
            optimizer = self.optimizer_factory(parameters)
        self._configured_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if self.lr_schedule is None:
            return optimizer
        schedule = self.lr_schedule
        per_epoch = self.steps_per_epoch()
        # The total is read at every step: a time-budgeted run fixes it after its first steps.
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, self.total_steps(), per_epoch))
        schedule_config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule_config}
