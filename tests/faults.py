"""Faults injected into real training runs (added with Hydra: ``+callbacks.kill.step=N``): a
SIGKILL, a NaN, a full disk, a stop signal; and a probe of memory over many steps."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
from typing import Any

import pytorch_lightning as pl
import torch


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


class NaNAtStep(pl.Callback):
    """Makes optimizer step ``step`` non-finite: NaN in the first view of its batch
    (``where="input"``) or in the query backbone's first weight (``where="weights"``)."""

    def __init__(self, step: int, where: str = "input") -> None:
        if where not in ("input", "weights"):
            raise ValueError(f"where must be input or weights, got {where!r}")
        self.step = step
        self.where = where

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        if self.where == "input":
            batch[0][0].fill_(float("nan"))  # ((view_a, view_b, ...), targets): in place
        else:
            with torch.no_grad():
                weight = next(pl_module.backbone.parameters())  # type: ignore[union-attr]
                weight[(0,) * weight.dim()] = float("nan")  # any memory layout


class FillDiskAtStep(pl.Callback):
    """Before step ``step``, fills the file system of ``directory`` with a file until no byte is
    left, so that the checkpoint written after that step finds a full disk."""

    def __init__(self, step: int, directory: str) -> None:
        self.step = step
        self.directory = directory

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        chunk = b"\0" * (1 << 16)
        with open(os.path.join(self.directory, "filler"), "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(chunk)
            except OSError:
                pass
            for size in (4096, 512, 1):  # the last few bytes too
                with contextlib.suppress(OSError):
                    while True:
                        filler.write(b"\0" * size)


class SignalSelfAtStep(pl.Callback):
    """Sends ``signal_name`` to this process at the start of optimizer step ``step``, as
    ``kill -TERM <pid>`` or a scheduler's preemption would."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal.Signals[signal_name]

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class CountTensors(pl.Callback):
    """Records, at the end of steps ``at``, the number of live tensors the garbage collector
    sees and the process's resident memory (bytes), into ``counts`` and ``rss``."""

    def __init__(self, at: tuple[int, ...]) -> None:
        self.at = set(at)
        self.counts: dict[int, int] = {}
        self.rss: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        step = trainer.global_step
        if step not in self.at:
            return
        gc.collect()
        self.counts[step] = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
        with open("/proc/self/statm") as statm:
            self.rss[step] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FakeClock(pl.Callback):
    """Gives the run's :class:`~mocoq.callbacks.TimeBudget` a clock that reads
    ``seconds_per_step`` times the training batches this process has run, so the measured step
    rate (``1 / seconds_per_step``) and the budget's plan do not depend on the machine's load.

    Listed among the config's callbacks it comes before the TimeBudget that ``build`` appends,
    so its hooks run first: the clock is in place before the budget reads it in ``setup``, and
    it has advanced past a batch before the budget reads it at that batch's end.

    With ``slower`` set, the steps after global step ``slower_after`` take ``slower`` seconds
    each instead: a machine that slows down after the budget's first measurement.
    """

    def __init__(
        self, seconds_per_step: float, slower: float | None = None, slower_after: int = 0
    ) -> None:
        self.seconds_per_step = seconds_per_step
        self.slower = slower
        self.slower_after = slower_after
        self.now = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from mocoq.callbacks import TimeBudget

        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, TimeBudget):
                callback.clock = lambda: self.now

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        slow = self.slower is not None and trainer.global_step > self.slower_after
        self.now += self.slower if slow and self.slower is not None else self.seconds_per_step
