"""ThroughputMonitor: images per second of the training loop, data loading included."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pytorch_lightning as pl


class ThroughputMonitor(pl.Callback):
    """Logs ``throughput/images_per_s``: images (a pair of views counts as one image) per
    wall-clock second between consecutive training batches, over the last ``window`` batches."""

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.window = window
        self._last: float | None = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None  # the gap across an epoch boundary (monitors, checkpoints) is not data

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            views, _ = batch  # two views, or three with the online probe's clean view
            self._recent.append((int(views[0].shape[0]) * trainer.world_size, now - self._last))
            images = sum(count for count, _ in self._recent)
            seconds = sum(elapsed for _, elapsed in self._recent)
            pl_module.log("throughput/images_per_s", images / max(seconds, 1e-9))
        self._last = now
