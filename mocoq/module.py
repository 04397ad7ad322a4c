"""MoCoModule: the MoCo method as a LightningModule composed of built parts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mocoq.distributed import concat_all_gather, world_size
from mocoq.ema import ema_update, init_key_from_query
from mocoq.loss import info_nce
from mocoq.norm import KEY_BN_MODES, convert_to_split_batchnorm
from mocoq.queue import MemoryQueue
from mocoq.schedules import LRSchedule, ema_momentum_at

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
HeadFactory = Callable[[int], nn.Module]
Batch = tuple[tuple[Tensor, Tensor] | list[Tensor], Tensor]


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
        key_bn: ``split`` normalises ``bn_splits`` groups of the batch apart in both encoders
            (one-device stand-in for the paper's shuffle BN); ``none`` leaves BatchNorm alone.
        bn_splits: number of groups for ``key_bn=split``.
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
        key_bn: str = "split",
        bn_splits: int = 8,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be positive, got {temperature}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"model.ema_momentum must be in [0, 1], got {ema_momentum}")
        if key_bn not in KEY_BN_MODES:
            raise ValueError(f"model.key_bn must be one of {KEY_BN_MODES}, got {key_bn!r}")
        ema_momentum_at(0, 1, ema_momentum, ema_momentum_schedule)  # validates the name
        if not hasattr(backbone, "out_dim"):
            raise ValueError("the backbone needs an 'out_dim' attribute (its feature dimension)")
        self.save_hyperparameters(ignore=["backbone", "head", "optimizer", "lr_schedule"])
        if key_bn == "split" and bn_splits > 1:
            convert_to_split_batchnorm(backbone, bn_splits)
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

    def _probe_out_dim(self) -> int:
        with torch.no_grad():
            return int(self.head(torch.zeros(2, self.feature_dim)).shape[1])

    # --- pure computations ---------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Backbone features (N, F) of images (N, C, H, W): what downstream tasks use."""
        return self.backbone(images)

    def project(self, images: Tensor) -> Tensor:
        """L2-normalised query projections (N, D)."""
        return F.normalize(self.head(self.backbone(images)), dim=1)

    @torch.no_grad()
    def project_keys(self, images: Tensor) -> Tensor:
        """L2-normalised key projections (N, D) from the EMA encoder, without gradient."""
        return F.normalize(self.key_head(self.key_backbone(images)), dim=1)

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
        key_b = self.project_keys(view_b)  # (N, D)
        loss, logits = info_nce(query_a, key_b, negatives, self.temperature)
        new_keys = key_b
        if self.symmetric:
            query_b = self.project(view_b)  # (N, D)
            key_a = self.project_keys(view_a)  # (N, D)
            loss_ba, logits_ba = info_nce(query_b, key_a, negatives, self.temperature)
            loss = loss + loss_ba  # summed, as in the reference symmetric recipe
            logits = torch.cat([logits, logits_ba])  # (2N, 1 + K)
            new_keys = torch.cat([key_b, key_a])  # (2N, D)
        # One global queue: every rank enqueues every rank's keys, in rank order.
        self.queue.enqueue(concat_all_gather(new_keys))
        self._log_step(loss, logits.detach())
        return loss

    def _log_step(self, loss: Tensor, logits: Tensor) -> None:
        """Log the loss, (1 + K)-way accuracy and mean positive / negative cosine similarity."""
        similarity = logits.float() * self.temperature  # undo the 1/T: cosine similarities
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/acc1": (logits.argmax(dim=1) == 0).float().mean(),
                "train/pos_logit": similarity[:, 0].mean(),
                "train/neg_logit": similarity[:, 1:].mean(),
            },
            prog_bar=False,
        )
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
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

    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(parameters)
        if self.lr_schedule is None:
            return optimizer
        schedule = self.lr_schedule
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, total, per_epoch))
        schedule_config = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule_config}
