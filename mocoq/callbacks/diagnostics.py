"""Cheap watchers of a MoCo run's health, for TensorBoard: representation and queue statistics,
the augmented views the model sees, an embedding projector of the val set, and where the time of
a step goes."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import v2
from torchvision.utils import make_grid

from mocoq.callbacks.knn_monitor import KNNMonitor, dataset_targets, stratified_subset
from mocoq.diagnostics import (
    COLLAPSE_FRACTION,
    StepOutputs,
    alignment,
    collapsed,
    feature_std,
    mean_key_age,
    negative_logit,
    positive_logit,
    positive_top1,
    queue_fill,
    uniformity,
    weight_distance,
)
from mocoq.distributed import concat_all_gather, world_size
from mocoq.module import MoCoModule


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, or None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _normalization(
    trainer: pl.Trainer, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel (mean, std) the images were normalised with: the given ones, else the
    ``Normalize`` step of the datamodule's clean transform, else None."""
    if mean is not None and std is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    datamodule = getattr(trainer, "datamodule", None)
    normalize = getattr(getattr(datamodule, "eval_transform", None), "normalize", None)
    for step in getattr(normalize, "transforms", ()):
        if isinstance(step, v2.Normalize):
            return tuple(step.mean), tuple(step.std)
    return None


def denormalize(
    images: Tensor, normalization: tuple[Sequence[float], Sequence[float]] | None
) -> Tensor:
    """Normalised images (N, C, H, W) back to [0, 1]: ``x * std + mean`` per channel, clamped.
    Without the statistics each image is min-max scaled instead."""
    images = images.detach().float()
    if normalization is None:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        return (images - low) / (high - low).clamp(min=1e-8)
    mean, std = normalization
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def keep_projector_entries(writer: Any, replaced: str) -> None:
    """Seed a TensorBoard writer's projector config with the entries already in its log dir.

    ``SummaryWriter.add_embedding`` rewrites ``projector_config.pbtxt`` from the entries of its
    own lifetime, so a resumed run's first entry would drop the earlier ones. Entries named
    ``replaced`` (the one about to be written again) are left out. Does nothing once the writer
    has entries of its own, or when there is no readable file.
    """
    if hasattr(writer, "_projector_config"):
        return
    path = Path(writer.get_logdir()) / "projector_config.pbtxt"
    if not path.is_file():
        return
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError:
        return
    kept = [entry for entry in config.embeddings if entry.tensor_name != replaced]
    del config.embeddings[:]
    config.embeddings.extend(kept)
    writer._projector_config = config


def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write metrics to every logger at ``step`` now (the loggers write on rank 0 only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class TrainingDiagnostics(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (from step 0), logs the health of the run from
    the tensors that step already computed (no extra forward pass):

    * ``diag/queue_fill``: fraction of the queue holding real keys (not the random start);
    * ``diag/queue_age``: mean age of the queued keys in training batches (0 = written by this
      step; a full queue of K keys, B per step, averages (K / B - 1) / 2);
    * ``diag/pos_logit``, ``diag/neg_logit``: mean InfoNCE logit (cosine / temperature) of the
      positive and of the negatives; ``diag/pos_top1``: fraction of queries whose positive
      outranks every negative;
    * ``diag/alignment`` (alpha=2) and ``diag/uniformity`` (t=2) of Wang & Isola (2020) on the
      L2-normalised queries and their positive keys (lower is better for both);
    * ``diag/feature_std`` of the L2-normalised query projections (about 1/sqrt(D) when
      spread, 0 when collapsed) and ``diag/collapse``: 1 when it is under
      ``collapse_fraction / sqrt(D)``; ``diag/backbone_feature_std``: the same for the
      backbone features (dimensional collapse under a healthy-looking head);
    * ``diag/qk_weight_distance``: L2 norm of (query - key) parameters, backbone and head.

    Cost: on the steps it logs, one all-gather of the step's projections and features, one
    all-reduce of three numbers, O(M^2 D) for the uniformity of M rows (M capped at
    ``max_rows``), one pass over the parameters, and one device-to-host copy; on the other
    steps nothing (a Python modulo). Under DDP the representation metrics are computed on the
    global batch (the projections of all ranks, gathered), the logit statistics are the mean of
    the ranks' means (exact: every rank has the same batch size), and the queue and weights are
    the same on every rank; every rank computes the same values, rank 0 writes them. The values
    are written straight to the loggers at the step that computed them, whatever
    ``trainer.log_every_n_steps`` is.

    Needs a :class:`mocoq.module.MoCoModule` (it reads ``step_outputs``, ``queue`` and the
    encoders); with another module it does nothing.

    Args:
        every_n_steps: logging cadence in optimizer steps.
        collapse_fraction: see :data:`mocoq.diagnostics.COLLAPSE_FRACTION`.
        max_rows: the uniformity uses the first ``max_rows`` rows of the global batch.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        collapse_fraction: float = COLLAPSE_FRACTION,
        max_rows: int = 4096,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        if not 0 < collapse_fraction < 1:
            raise ValueError(f"collapse_fraction must be in (0, 1), got {collapse_fraction}")
        if max_rows < 2:
            raise ValueError(f"max_rows must be at least 2, got {max_rows}")
        self.every_n_steps = every_n_steps
        self.collapse_fraction = collapse_fraction
        self.max_rows = max_rows
        self._step: int | None = None  # the step being captured
        self._logged_step = -1  # under gradient accumulation one micro-batch per step logs

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(pl_module, MoCoModule):
            return
        step = trainer.global_step
        due = step % self.every_n_steps == 0 and step != self._logged_step
        pl_module.capture_step_outputs = due
        self._step = step if due else None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(pl_module, MoCoModule) or self._step is None:
            return
        captured = pl_module.step_outputs
        if captured is None:
            return
        pl_module.step_outputs = None
        pl_module.capture_step_outputs = False
        step, self._step = self._step, None
        self._logged_step = step
        _log(trainer, self.compute(pl_module, captured), step)

    @torch.no_grad()
    def compute(self, pl_module: MoCoModule, captured: StepOutputs) -> dict[str, float]:
        """The diagnostics of one step's outputs (see the class docstring), as host floats.

        A collective operation under DDP: every rank must call it at the same step.
        """
        queries, keys, logits, features = captured
        dim = queries.shape[1]
        # One all-gather: [queries | keys | features] of every rank, (W N, 2 D + F).
        rows = concat_all_gather(torch.cat([queries.float(), keys.float(), features.float()], 1))
        queries, keys, features = rows[:, :dim], rows[:, dim : 2 * dim], rows[:, 2 * dim :]
        # One all-reduce: the ranks' means of per-row logit statistics.
        logit_stats = torch.stack(
            [positive_logit(logits), negative_logit(logits), positive_top1(logits)]
        )
        ranks = world_size()
        if ranks > 1:
            dist.all_reduce(logit_stats)
            logit_stats = logit_stats / ranks
        queue = pl_module.queue
        distance = torch.hypot(
            weight_distance(pl_module.backbone, pl_module.key_backbone),
            weight_distance(pl_module.head, pl_module.key_head),
        )
        values = {
            "diag/queue_age": mean_key_age(queue.written_at, queue.num_writes),
            "diag/pos_logit": logit_stats[0],
            "diag/neg_logit": logit_stats[1],
            "diag/pos_top1": logit_stats[2],
            "diag/alignment": alignment(queries, keys),
            "diag/uniformity": uniformity(queries[: self.max_rows]),
            "diag/feature_std": feature_std(queries),
            "diag/collapse": collapsed(queries, self.collapse_fraction),
            "diag/backbone_feature_std": feature_std(features),
            "diag/qk_weight_distance": distance.to(queries.device),
        }
        host = torch.stack([v.float() for v in values.values()]).cpu().tolist()  # one copy
        metrics = dict(zip(values, host, strict=True))
        metrics["diag/queue_fill"] = queue_fill(queue.num_filled, queue.size)
        return metrics


class ViewPairsLogger(pl.Callback):
    """Logs ``images/view_pairs`` once, at the first training batch of a fit: the first
    ``num_pairs`` images' two augmented views as the model receives them (after the on-device
    augmentation, when the datamodule does it), de-normalised with ``mean`` / ``std`` (by
    default those of the datamodule's clean transform). Top row: first views; bottom row: the
    second views; a column is a pair. Rank 0, TensorBoard only; one device-to-host copy of
    2 x ``num_pairs`` images.

    Args:
        num_pairs: pairs shown (at most the batch size).
        mean, std: per-channel normalisation of the views.
    """

    def __init__(
        self,
        num_pairs: int = 8,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be positive, got {num_pairs}")
        self.num_pairs = num_pairs
        self.mean, self.std = mean, std
        self._done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._done = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done:
            return
        self._done = True
        writer = tensorboard_writer(trainer) if trainer.is_global_zero else None
        if writer is None:
            return
        views, _ = batch  # (view_a, view_b), or (view_a, view_b, clean) with the online probe
        view_a, view_b = views[0], views[1]
        count = min(self.num_pairs, view_a.shape[0])
        views = torch.cat([view_a[:count], view_b[:count]]).detach().float().cpu().contiguous()
        images = denormalize(views, _normalization(trainer, self.mean, self.std))
        grid = make_grid(images, nrow=count, padding=2, pad_value=1.0)  # (3, H', W')
        writer.add_image("images/view_pairs", grid, global_step=trainer.global_step)


class EmbeddingProjector(pl.Callback):
    """At the end of training (and every ``every_n_epochs`` epochs if set), writes a TensorBoard
    embedding projector entry of up to ``max_images`` clean val images: the query backbone's
    features (in eval mode, without gradient, under the run's precision), their labels as
    metadata and the images (de-normalised, shrunk to at most ``sprite_size`` pixels) as
    sprites. The images are a class-stratified subset drawn from ``seed`` (the same every
    time). Rank 0 only; TensorBoard only. Tag ``val_backbone``, in the log dir's folder
    ``<step>/val_backbone`` (``tensors.tsv``, ``metadata.tsv``, ``sprite.png``), listed in its
    ``projector_config.pbtxt`` beside the entries of earlier fits of the run (a resume).

    With the module's online probe on, also logs ``probe/val_top1``: the probe's accuracy on
    these (labelled) clean images.

    Args:
        max_images: val images embedded.
        every_n_epochs: also write an entry after every this many epochs; None: at the end only.
        sprite_size: largest side of a sprite image (larger images are shrunk).
        seed: seed of the subset's draw.
        mean, std: per-channel normalisation of the clean images (default: the datamodule's).
    """

    TAG = "val_backbone"

    def __init__(
        self,
        max_images: int = 1000,
        every_n_epochs: int | None = None,
        sprite_size: int = 32,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be positive, got {max_images}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive or null, got {every_n_epochs}")
        if sprite_size < 1:
            raise ValueError(f"sprite_size must be positive, got {sprite_size}")
        self.max_images = max_images
        self.every_n_epochs = every_n_epochs
        self.sprite_size = sprite_size
        self.seed = seed
        self.mean, self.std = mean, std
        self._written: set[int] = set()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self.every_n_epochs is not None and epoch % self.every_n_epochs == 0 and not last:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, pl_module)

    def _loader(self, trainer: pl.Trainer) -> DataLoader[Any] | None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "knn_val_dataloader"):
            return None
        loader: DataLoader[Any] | None = datamodule.knn_val_dataloader()
        if loader is None:
            return None
        dataset = loader.dataset
        length = len(dataset)  # type: ignore[arg-type]
        targets = dataset_targets(dataset)
        if targets is not None and targets.shape != (length,):
            targets = None
        indices = stratified_subset(length, self.max_images, self.seed, targets)
        return DataLoader(
            Subset(dataset, indices.tolist()),
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
            generator=torch.Generator(),  # leaves the global RNG (the run's) alone
        )

    @torch.no_grad()
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Embed the subset and write the projector entry at the current step (once a step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step in self._written:
            return
        writer = tensorboard_writer(trainer)
        loader = self._loader(trainer) if writer is not None else None
        if writer is None or loader is None:
            return
        self._written.add(step)
        normalization = _normalization(trainer, self.mean, self.std)
        channels_last = bool(getattr(pl_module, "channels_last", False))
        features, labels, sprites = [], [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                for images, targets in loader:
                    batch = images.to(pl_module.device, non_blocking=True)
                    if channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    features.append(pl_module(batch).float().cpu())  # (B, F)
                    labels.append(targets.long())
                    sprites.append(self._sprites(images, normalization))
        finally:
            pl_module.train(was_training)
        if not features:
            return
        matrix, label_tensor = torch.cat(features), torch.cat(labels)  # (M, F), (M,)
        keep_projector_entries(writer, replaced=f"{self.TAG}:{step:05d}")
        writer.add_embedding(
            matrix,
            metadata=label_tensor.tolist(),
            label_img=torch.cat(sprites),
            global_step=step,
            tag=self.TAG,
        )
        probe = pl_module.probe if isinstance(pl_module, MoCoModule) else None
        labelled = label_tensor >= 0
        if probe is not None and bool(labelled.any()):
            weight = next(probe.parameters())
            logits = probe(matrix[labelled].to(weight.device, weight.dtype)).cpu()
            top1 = (logits.argmax(dim=1) == label_tensor[labelled]).float().mean().item()
            _log(trainer, {"probe/val_top1": top1}, step)

    def _sprites(
        self, images: Tensor, normalization: tuple[Sequence[float], Sequence[float]] | None
    ) -> Tensor:
        """Clean images (B, C, H, W) as sprites in [0, 1], the larger side at most sprite_size."""
        sprites = denormalize(images, normalization)
        height, width = sprites.shape[-2:]
        if max(height, width) > self.sprite_size:
            scale = self.sprite_size / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            sprites = F.interpolate(sprites, size=size, mode="bilinear", antialias=True)
        return sprites.clamp(0.0, 1.0)


class TimeBreakdown(pl.Callback):
    """Where a training step's time goes, averaged over the last ``window`` steps:

    * ``time/data_s``: host seconds from the end of one training step to the start of the next:
      waiting for the loader's batch, its copy to the device and the launch of the on-device
      augmentation (and Lightning's own per-step bookkeeping and logging; on its logging steps
      that may include waiting for the device). The gap across an epoch boundary (monitors,
      checkpoints) is not counted.
    * ``time/step_s``: the training step itself: forward, loss, backward, optimizer step, EMA
      and enqueue. On CUDA (with ``device_timing``) the device's time between CUDA events
      recorded at the step's start and end, read only once the events have completed (no
      synchronisation: the value trails by a few steps); elsewhere host seconds.
    * ``time/monitor_s``: the wall seconds of a :class:`KNNMonitor` evaluation
      (its ``last_call_seconds``), logged at the step it ran.

    Host timers only: no host-device synchronisation. ``time/data_s`` and ``time/step_s`` are
    rank 0's (logged each step through Lightning, written at its logging cadence).

    Args:
        window: steps averaged.
        device_timing: time the step with CUDA events on CUDA devices.
    """

    def __init__(self, window: int = 20, device_timing: bool = True) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self.device_timing = device_timing
        self._data: deque[float] = deque(maxlen=window)
        self._step: deque[float] = deque(maxlen=window)
        self._pending: deque[tuple[Any, Any]] = deque(maxlen=4 * window)  # CUDA event pairs
        self._start_event: Any | None = None
        self._last_end: float | None = None
        self._start: float | None = None
        self._monitor_seconds = 0.0
        self.new_event: Callable[[], Any] = lambda: torch.cuda.Event(enable_timing=True)

    def _device_timed(self, pl_module: pl.LightningModule) -> bool:
        return self.device_timing and pl_module.device.type == "cuda"

    def _monitors(self, trainer: pl.Trainer) -> list[KNNMonitor]:
        return [c for c in trainer.callbacks if isinstance(c, KNNMonitor)]  # type: ignore[attr-defined]

    def _log_monitor(self, trainer: pl.Trainer) -> None:
        """Log ``time/monitor_s`` if a kNN monitor evaluated since the last look."""
        monitors = self._monitors(trainer)
        total = sum(m.seconds for m in monitors)
        if total > self._monitor_seconds:
            last = sum(m.last_call_seconds for m in monitors)
            _log(trainer, {"time/monitor_s": last}, trainer.global_step)
        self._monitor_seconds = total

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resumed: the monitors' restored totals are old news. Fresh: a kNN evaluation at the
        # start (run before or after this hook) is reported.
        resumed = trainer.global_step > 0
        self._monitor_seconds = sum(m.seconds for m in self._monitors(trainer)) if resumed else 0
        if not resumed:
            self._log_monitor(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None
        self._log_monitor(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_monitor(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_monitor(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._data.append(now - self._last_end)
        self._start = now
        if self._device_timed(pl_module):
            self._start_event = self.new_event()
            self._start_event.record()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._start_event is not None:
            end = self.new_event()
            end.record()
            self._pending.append((self._start_event, end))
            self._start_event = None
            while self._pending and self._pending[0][1].query():  # completed: no waiting
                start, finished = self._pending.popleft()
                self._step.append(start.elapsed_time(finished) / 1000.0)  # ms -> s
        elif self._start is not None:
            self._step.append(now - self._start)
        if self._data:
            pl_module.log("time/data_s", sum(self._data) / len(self._data))
        if self._step:
            pl_module.log("time/step_s", sum(self._step) / len(self._step))
        self._last_end = time.perf_counter()
