"""Callbacks that let tests look inside every rank of a real run (added with ``+callbacks``)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch


class SaveRankState(pl.Callback):
    """At the end of training, every rank saves its queue, pointer, key-BN mode and data position
    to ``<directory>/rank<r>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            "queue": pl_module.queue.keys.detach().cpu().clone(),
            "pointer": pl_module.queue.pointer,
            "key_bn": pl_module.key_bn_mode,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            "position": trainer.datamodule.train_position(),
        }
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")
