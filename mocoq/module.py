"""MoCoModule: the MoCo method as a LightningModule composed of built parts."""

from __future__ import annotations

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

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
HeadFactory = Callable[[int], nn.Module]
Batch = tuple[tuple[Tensor, Tensor] | list[Tensor], Tensor]


_COMPILE_CHECKS: dict[str, bool] = {}


def compiled_gradients_agree(device: torch.device) -> bool:
    """Whether ``nn.Module.compile`` gives the eager gradients on ``device`` for a strided 1x1
    convolution followed by BatchNorm (ResNet downsampling). torch 2.14's inductor gets that
    convolution's weight gradient wrong on some x86 CPUs (seen on AVX2-only AMD EPYC), which
    would silently train a different model. Checked once per device type and process (a few
    seconds of compilation, next to the minutes compiling the backbones takes)."""
    import copy

    if device.type not in _COMPILE_CHECKS:
        generator = torch.Generator().manual_seed(0)
        eager = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        eager = eager.to(device)
        compiled = copy.deepcopy(eager)
        compiled.compile()
        images = torch.randn(8, 4, 12, 12, generator=generator).to(device)  # (N, C, H, W)
        eager(images).pow(2).sum().backward()
        compiled(images).pow(2).sum().backward()
        _COMPILE_CHECKS[device.type] = all(
            a.grad is not None and b.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-4)
            for a, b in zip(eager.parameters(), compiled.parameters(), strict=True)
        )
    return _COMPILE_CHECKS[device.type]


class MoCoModule(pl.LightningModule):
    """Momentum Contrast: a query encoder, its EMA key encoder and a queue of negative keys.

    One training step on a batch of two views (x_a, x_b), each (N, C, H, W):

    1. queries ``q = normalize(head(backbone(x_a)))`` (N, D), with gradient;
    2. keys ``k = normalize(key_head(key_backbone(x_b)))`` (N, D), without;
    3. InfoNCE of each query against its key and the queue (K, D) as it was before the step;
    4. the keys are enqueued. With ``symmetric=True`` the roles are also swapped, both halves
       read the same queue, and both key sets are enqueued once, after both losses.

    After every optimizer step the key backbone AND key head move towards the query ones by EMA.

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
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"model.ema_momentum must be in [0, 1], got {ema_momentum}")
        resolve_key_bn(key_bn, 1)  # validates the name
        if bn_splits < 1:
            raise ValueError(f"model.bn_splits must be positive, got {bn_splits}")
        ema_momentum_at(0, 1, ema_momentum, ema_momentum_schedule)  # validates the name
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

    def configure_speed(self) -> None:
        """Apply ``channels_last`` and ``compile`` to both backbones (after the BatchNorm
        conversions, which may replace modules). Idempotent; changes no parameter name, value
        or shape, so checkpoints load across these options either way."""
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
            self.key_backbone.to(memory_format=torch.channels_last)
        if self.compile_backbones and not self._compiled:
            device = next(self.backbone.parameters()).device
            if not compiled_gradients_agree(device):
                rank_zero_warn(
                    "model.compile=true: torch.compile computes wrong gradients on this machine "
                    f"({device.type}; checked on a strided 1x1 convolution with BatchNorm, as in "
                    "ResNet downsampling), so the backbones run uncompiled"
                )
                self.compile_backbones = False
                return
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
        (view_a, view_b), _ = batch
        self.check_batch_fits(view_a.shape[0], world_size())
        # The queue as it was before this step; cloned because the enqueue below writes in place
        # while autograd still needs these values for the backward pass.
        negatives = self.queue.keys.clone()  # (K, D)
        query_a = self.project(view_a)  # (N, D)
        key_b = self.project_keys(view_b, self._shuffle_seed(0))  # (N, D)
        loss, logits = info_nce(query_a, key_b, negatives, self.temperature)
        new_keys = key_b
        if self.symmetric:
            query_b = self.project(view_b)  # (N, D)
            key_a = self.project_keys(view_a, self._shuffle_seed(1))  # (N, D)
            loss_ba, logits_ba = info_nce(query_b, key_a, negatives, self.temperature)
            loss = loss + loss_ba  # summed, as in the reference symmetric recipe
            logits = torch.cat([logits, logits_ba])  # (2N, 1 + K)
            new_keys = torch.cat([key_b, key_a])  # (2N, D)
        # One global queue: every rank enqueues every rank's keys, in rank order.
        self.queue.enqueue(concat_all_gather(new_keys))
        self._log_step(loss, logits.detach())
        return loss

    def _log_step(self, loss: Tensor, logits: Tensor) -> None:
        """Log the loss, (1 + K)-way accuracy and mean positive / negative cosine similarity,
        averaged over ranks in one all-reduce (every rank has the same batch size)."""
        similarity = logits.float() * self.temperature  # undo the 1/T: cosine similarities
        stats = torch.stack(
            [
                loss.detach().float(),
                (logits.argmax(dim=1) == 0).float().mean(),
                similarity[:, 0].mean(),
                similarity[:, 1:].mean(),
            ]
        )
        ranks = world_size()
        if ranks > 1:
            dist.all_reduce(stats)
            stats = stats / ranks
        names = ("train/loss", "train/acc1", "train/pos_logit", "train/neg_logit")
        self.log_dict(dict(zip(names, stats.unbind(), strict=True)), prog_bar=False)
        self.log("loss", stats[0], prog_bar=True, logger=False)
        self.log("train/ema_momentum", self.current_ema_momentum())
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def current_ema_momentum(self) -> float:
        """The EMA momentum for the current optimizer step (constant or cosine towards 1)."""
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer else 1
        return ema_momentum_at(
            self.global_step, total, self.ema_momentum, self.ema_momentum_schedule
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then move the key encoder once (safe under accumulation)."""
        super().optimizer_step(*args, **kwargs)
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

    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(parameters)
        self._configured_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if self.lr_schedule is None:
            return optimizer
        schedule = self.lr_schedule
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, total, per_epoch))
        schedule_config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule_config}
