"""KNNMonitor: weighted kNN accuracy of the query backbone on clean images during training."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from mocoq.eval.features import (
    KNNResult,
    embed,
    embed_sharded,
    knn_evaluate_sharded,
    shard_loader,
)


def _has_labels(dataset: Any) -> bool:
    """Whether a (possibly wrapped) dataset has labels, read without drawing random numbers."""
    base = getattr(dataset, "base", dataset)
    targets = getattr(base, "targets", None)
    if targets is not None:
        return bool((torch.as_tensor(targets) >= 0).any())
    return int(base[0][1]) >= 0


class KNNMonitor(pl.Callback):
    """Every ``every_n_epochs`` epochs (and after the last), embeds a clean bank and val set
    with the query backbone in eval mode and logs ``knn/top1`` and ``knn/top5``.

    The bank and queries come from the constructor's loaders or, when those are None, from the
    datamodule's ``knn_bank_dataloader()`` and ``knn_val_dataloader()``. The protocol (k, T) is
    logged beside the accuracy as ``knn/k`` and ``knn/temperature``.

    Under DDP each rank embeds only its 1/W shard of the bank and of the queries: the bank is
    gathered whole on every rank, each rank scores its own queries against it and the correct
    counts are summed, so every rank holds the same result, equal to the one-process result.
    The hooks run on every rank, as the collectives need.

    Args:
        every_n_epochs: evaluation cadence in epochs (the last epoch is always evaluated).
        k: neighbours.
        temperature: voting temperature T.
        at_start: also evaluate the randomly initialised encoder before the first step, logged
            at step 0 (the baseline the run must beat).
        bank_loader, val_loader: explicit clean loaders of ``(images, targets)``.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.1,
        at_start: bool = False,
        bank_loader: DataLoader[Any] | None = None,
        val_loader: DataLoader[Any] | None = None,
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        if k < 1 or temperature <= 0:
            raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.at_start = at_start
        self.bank_loader = bank_loader
        self.val_loader = val_loader
        self.disabled = False
        self.initial: KNNResult | None = None
        self.last: KNNResult | None = None
        self.seconds = 0.0

    def _loaders(self, trainer: pl.Trainer) -> tuple[DataLoader[Any], DataLoader[Any]] | None:
        bank, val = self.bank_loader, self.val_loader
        datamodule = getattr(trainer, "datamodule", None)
        if bank is None and datamodule is not None and hasattr(datamodule, "knn_bank_dataloader"):
            bank = datamodule.knn_bank_dataloader()
        if val is None and datamodule is not None and hasattr(datamodule, "knn_val_dataloader"):
            val = datamodule.knn_val_dataloader()
        if bank is None or val is None:
            return None
        return bank, val

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> KNNResult | None:
        """Embed bank and queries with ``pl_module``'s forward and score them."""
        if self.disabled:
            return None
        loaders = self._loaders(trainer)
        if loaders is None:
            rank_zero_warn("KNNMonitor: no kNN bank or val loader; kNN evaluation is off")
            self.disabled = True
            return None
        if not _has_labels(loaders[0].dataset):
            rank_zero_warn(
                "KNNMonitor: the kNN bank is unlabelled; set dataset.bank_split to a labelled "
                "split to measure kNN accuracy (kNN evaluation is off)"
            )
            self.disabled = True
            return None
        start = time.perf_counter()
        bank_loader, val_loader = loaders
        # The run's precision (bf16 autocast where configured) makes extraction ~2x cheaper.
        with trainer.precision_plugin.forward_context():
            # Every rank: the whole bank (B, F), (B,); this rank's queries (M_r, F), (M_r,).
            bank, bank_labels = embed_sharded(pl_module, bank_loader, pl_module.device)
            queries, query_labels = embed(pl_module, shard_loader(val_loader), pl_module.device)
        result = knn_evaluate_sharded(
            bank, bank_labels, queries, query_labels, self.k, self.temperature
        )
        self.seconds += time.perf_counter() - start
        return result

    def _metrics(self, result: KNNResult) -> dict[str, float]:
        return {
            "knn/top1": result.top1,
            "knn/top5": result.top5,
            "knn/k": float(result.k),
            "knn/temperature": result.temperature,
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_start or trainer.global_step > 0:
            return
        self.initial = self.evaluate(trainer, pl_module)
        if self.initial is not None:
            rank_zero_info(f"kNN at initialisation: {self.initial.describe()}")
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(self.initial), step=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        result = self.evaluate(trainer, pl_module)
        if result is None:
            return
        self.last = result
        rank_zero_info(f"kNN after epoch {epoch}: {result.describe()}")
        # Every rank holds the same values: syncing them with max keeps them exact (a mean could
        # round) and is what Lightning asks of epoch-level metrics under DDP.
        pl_module.log_dict(
            self._metrics(result), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = float(state_dict.get("seconds", 0.0))
