"""What SLURM does to a job near its time limit, injected into real runs (``+callbacks.<name>``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends ``signal_name`` to every process of the job step once optimizer step ``step`` is done.

    As ``sbatch --signal=USR1@120`` does: slurmstepd signals the whole step (here: the process
    group the fake srun started), not one process. Only the first start of a job is signalled;
    a requeued one (``SLURM_RESTART_COUNT`` > 0) runs to the end.
    """

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signal = signal.Signals[signal_name]

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        first_start = int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
        if first_start and trainer.global_step == self.step:
            os.killpg(os.getpgrp(), self.signal)
