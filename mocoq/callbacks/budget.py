"""TimeBudget: train for a number of minutes, sized in steps from the measured step rate."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from mocoq.budget import BudgetPlan, plan_budget, revise_plan


class TimeBudget(pl.Callback):
    """Trains for ``minutes`` of wall time, as a number of steps fixed early in the run.

    The run starts with no end (``max_epochs=-1``, ``max_steps=-1``, set in :meth:`setup`):
    its schedules hold their starting values after the warmup while the total is unknown (see
    :mod:`mocoq.schedules`). After ``skip_steps`` steps (start-up: the allocator, oneDNN's
    kernel choice, compilation) the next ``timed_steps`` optimizer steps are timed, data
    loading, logging and the step's callbacks included; from that rate
    :func:`mocoq.budget.plan_budget` fixes the total, which becomes the trainer's ``max_steps``.
    From then on the LR and EMA-momentum schedules decay over that total (the module reads it
    from ``trainer.estimated_stepping_batches``) and a :class:`~mocoq.callbacks.KNNMonitor` with
    ``evaluations`` set spreads its evaluations over it.

    A shared machine's speed moves over minutes, so once ``check_at`` of the planned steps are
    done the rate is measured again, from the start of the first measurement, and the total is
    planned again from it if it moved by more than 5% (:func:`mocoq.budget.revise_plan`), once:
    a first measurement that fell on a fast stretch would otherwise overrun the budget.

    The plan is saved in every checkpoint: a resumed run keeps its total (and so its
    schedule), whatever the machine it resumes on, and continues exactly. A run stopped before
    its rate was measured measures again when resumed, counting the budget its earlier part
    spent. Under DDP rank 0's measurement is broadcast, so every rank stops at the same step.

    The plan is logged as ``budget/total_steps``, ``budget/epochs`` and
    ``budget/steps_per_second`` at the step it is made, and printed.

    Args:
        minutes: the budget: the wall time of ``trainer.fit`` (start-up, training, the kNN
            monitor's evaluations and checkpoints), not counting the final full-protocol kNN
            evaluation, which reports on the finished encoder.
        skip_steps: steps left out of the measurement at the start of each process.
        timed_steps: optimizer steps the rate is measured over.
        reserve: share of the budget kept for what is not a training step.
        check_at: the share of the planned steps after which the plan is checked (and
            changed where the rate moved); None: never.

    Attributes:
        plan: the :class:`~mocoq.budget.BudgetPlan` once the rate is measured (or restored).
        clock: the clock read, in seconds (``time.perf_counter``; tests give a fake one).
    """

    def __init__(
        self,
        minutes: float,
        skip_steps: int = 10,
        timed_steps: int = 50,
        reserve: float = 0.05,
        check_at: float | None = 0.3,
    ) -> None:
        if minutes <= 0:
            raise ValueError(f"budget.minutes must be positive, got {minutes}")
        if skip_steps < 0 or timed_steps < 1:
            raise ValueError(
                f"budget.skip_steps must be >= 0 and budget.timed_steps >= 1, got {skip_steps} "
                f"and {timed_steps}"
            )
        if not 0.0 <= reserve < 1.0:
            raise ValueError(f"budget.reserve must be in [0, 1), got {reserve}")
        if check_at is not None and not 0.0 < check_at < 1.0:
            raise ValueError(f"budget.check_at must be in (0, 1) or null, got {check_at}")
        self.check_at = check_at
        self.minutes = float(minutes)
        self.skip_steps = skip_steps
        self.timed_steps = timed_steps
        self.reserve = reserve
        self.clock: Callable[[], float] = time.perf_counter
        self.plan: BudgetPlan | None = None
        self._spent_before = 0.0  # budget spent by the earlier parts of a resumed run
        self._started: float | None = None  # the clock when this process's fit began
        self._first_step: int | None = None  # the global step this process started at
        self._timer: tuple[int, float] | None = None  # (step, clock) where the timing began

    @property
    def spent_seconds(self) -> float:
        """Budget spent so far: this process's fit time and that of the run's earlier parts."""
        if self._started is None:
            return self._spent_before
        return self._spent_before + self.clock() - self._started

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._started = self.clock()
        # No end until the rate is measured: the trainer's epoch and step limits are the plan's.
        trainer.fit_loop.max_epochs = -1
        trainer.fit_loop.epoch_loop.max_steps = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step
        self._timer = None
        if self.plan is None:
            return
        if not math.isclose(self.plan.minutes, self.minutes):
            rank_zero_warn(
                f"budget.minutes={self.minutes:g} differs from the resumed run's "
                f"{self.plan.minutes:g}: the run keeps its plan ({self.plan.total_steps:,} "
                "steps), so that its schedule stays the same"
            )
        self._apply(trainer, self.plan)
        rank_zero_info(f"resumed with its {self.plan.describe()}")

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._first_step is None:
            return
        step = trainer.global_step  # optimizer steps done
        if self._timer is None:
            if step >= self._first_step + self.skip_steps:
                self._timer = (step, self.clock())
            return
        if self.plan is not None:
            self._check(trainer, step)
            return
        first = self._timer[0]
        if step - first < self.timed_steps:
            return
        rate, spent = self._measure(trainer, step)
        batches = trainer.num_training_batches
        per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        self.plan = plan_budget(
            self.minutes, spent, step, rate, per_epoch, self.reserve, measured_from=first
        )
        self._apply(trainer, self.plan)
        rank_zero_info(self.plan.describe())
        self._log(trainer, self.plan, step)

    def _measure(self, trainer: pl.Trainer, step: int) -> tuple[float, float]:
        """The step rate since this process's timing began, and the budget spent; every rank
        gets rank 0's numbers, so that all of them stop at the same step."""
        assert self._timer is not None
        first, started = self._timer
        rate = (step - first) / max(self.clock() - started, 1e-9)
        rate, spent = trainer.strategy.broadcast((rate, self.spent_seconds), src=0)
        return float(rate), float(spent)

    def _check(self, trainer: pl.Trainer, step: int) -> None:
        """Once ``check_at`` of the plan's steps are done (and ``timed_steps`` timed in this
        process), plan again from the rate since the timing began, if it moved."""
        plan = self.plan
        if self.check_at is None or plan is None or plan.checked_at is not None:
            return
        assert self._timer is not None
        due = max(math.ceil(self.check_at * plan.total_steps), self._timer[0] + self.timed_steps)
        if step < due or step >= plan.total_steps:
            return
        rate, spent = self._measure(trainer, step)
        self.plan = revise_plan(plan, spent, step, rate, measured_from=self._timer[0])
        if self.plan.total_steps == plan.total_steps:
            return
        self._apply(trainer, self.plan)
        rank_zero_info(
            f"{self.plan.describe()}: the step rate moved from {plan.steps_per_second:.3g}, "
            "so the run ends at the new total (its schedules decay over it from here)"
        )
        self._log(trainer, self.plan, step)

    @staticmethod
    def _log(trainer: pl.Trainer, plan: BudgetPlan, step: int) -> None:
        """budget/*: what the measurement bought, at the step it was made."""
        metrics = {"budget/total_steps": float(plan.total_steps), "budget/epochs": plan.epochs}
        metrics["budget/steps_per_second"] = plan.steps_per_second
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @staticmethod
    def _apply(trainer: pl.Trainer, plan: BudgetPlan) -> None:
        trainer.fit_loop.max_epochs = -1
        trainer.fit_loop.epoch_loop.max_steps = plan.total_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "spent_seconds": self.spent_seconds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        plan = state_dict.get("plan")
        self.plan = None if plan is None else BudgetPlan.from_dict(plan)
        self._spent_before = float(state_dict.get("spent_seconds", 0.0))
