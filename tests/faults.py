"""Faults injected into real training runs (added with Hydra: ``+callbacks.kill.step=N``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILLs the process before optimizer step ``step`` runs: no cleanup, no last words.

    The checkpoint written after step ``step - 1`` (when the run checkpoints every step) is the
    newest state that survives.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
