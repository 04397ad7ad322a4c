"""Save and stop on SIGTERM or SIGUSR1: a preempted or cancelled run loses no finished step."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL, SIG_IGN or None


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM or SIGUSR1, finish the step in progress, write ``last.ckpt`` and stop.

    Cloud schedulers, ``kill`` and Kubernetes stop a job with SIGTERM; SLURM sends the signal
    chosen with ``sbatch --signal`` (SIGUSR1 in mocoq's scripts) some time before the limit,
    then SIGTERM. The handler only records the signal; at the end of the current training step
    the run saves a checkpoint (atomically, see :mod:`mocoq.checkpointing`) where
    ``resume=<run dir>`` looks for it (the checkpoint callback's ``last.ckpt``) and stops.
    ``mocoq-train`` then prints the command that continues the run and exits with status 0.
    Resuming continues exactly (the data position is in the checkpoint).

    Under SLURM Lightning owns SIGUSR1 (it saves ``hpc_ckpt_<N>.ckpt`` and requeues the job);
    this callback then acts on SIGTERM only, and ``ckpt_path=last`` takes the newer of the two
    checkpoints. Under DDP the ranks agree through one small all-reduce every
    ``ddp_sync_every_n_steps`` steps (not every step: it is a host-device synchronisation), so
    that all of them save and stop at the same step; a stop then waits at most that many steps.

    Attributes:
        saved: the checkpoint written on a signal, or None.
        signal_name: the signal that stopped the run, or None.
        step: the global step the checkpoint holds.
    """

    def __init__(
        self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), ddp_sync_every_n_steps: int = 10
    ) -> None:
        unknown = [name for name in signals if not hasattr(signal, name)]
        if unknown:
            raise ValueError(f"unknown signal names {unknown}: use e.g. SIGTERM, SIGUSR1")
        if ddp_sync_every_n_steps < 1:
            raise ValueError(f"ddp_sync_every_n_steps must be >= 1, got {ddp_sync_every_n_steps}")
        self.signals = tuple(signals)
        self.ddp_sync_every_n_steps = ddp_sync_every_n_steps
        self.saved: Path | None = None
        self.signal_name: str | None = None
        self.step: int | None = None
        self._requested: str | None = None
        self._previous: dict[signal.Signals, Handler] = {}

    # --- signal handling -------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handlers. Lightning installs its SIGTERM handler after this hook and
        calls this one from it."""
        self.saved = self.signal_name = self.step = self._requested = None
        for name in self.signals:
            number = signal.Signals[name]
            if number == signal.SIGUSR1 and SLURMEnvironment.detect():
                continue  # Lightning's SLURM requeue handles it
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                log.warning("PreemptionCheckpoint: %s cannot be handled off the main thread", name)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self._requested = signal.Signals(number).name
        previous = self._previous.get(signal.Signals(number))
        if callable(previous):
            previous(number, frame)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for number, previous in self._previous.items():
            if signal.getsignal(number) == self._handle:
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # --- the save --------------------------------------------------------------------------
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.saved is not None:
            return
        requested = self._requested is not None or bool(trainer.received_sigterm)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            if trainer.global_step % self.ddp_sync_every_n_steps:
                return  # every rank skips the same steps: they all reach the same all-reduces
            flag = torch.tensor([float(requested)], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = bool(flag.item())
        if not requested:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # on every rank; rank 0 writes
        self.saved, self.step = path, trainer.global_step
        self.signal_name = self._requested or "SIGTERM"
        trainer.should_stop = True
        if trainer.is_global_zero:
            log.warning(
                "%s received: step %d saved to %s; the run stops",
                self.signal_name,
                self.step,
                path,
            )

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> Path:
        """``last.ckpt`` of the run's checkpoint callback (else under the root dir)."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            directory = Path(callback.dirpath)
        else:
            directory = Path(trainer.default_root_dir) / "checkpoints"
        return directory / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
