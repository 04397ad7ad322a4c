"""Training to a time budget: how many optimizer steps a budget of wall time buys.

Machines differ several-fold in speed (a 2-core CPU with native bf16 runs a step about 4x faster
than one without), so a recipe sized in epochs is too short on one and too long on another. A
budgeted run instead measures its own step rate over its first steps and fixes its total number
of steps from it, once; every schedule (learning rate, EMA momentum, the kNN monitor's cadence)
is then sized to that total, and the total is saved with the run, so a resumed run follows the
same schedule. :class:`mocoq.callbacks.TimeBudget` does the measuring inside a run; this module
holds the arithmetic, free of torch and Lightning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


class BudgetTooSmallError(ValueError):
    """The budget buys less than one epoch at the measured step rate."""


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget bought, fixed once the step rate is measured.

    Attributes:
        minutes: the budget.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps of one epoch (for the epochs the budget bought).
        steps_per_second: the measured rate.
        measured_from, measured_to: the steps the rate was measured over (``[from, to)``).
        elapsed_seconds: budget already spent when the plan was made (start-up and the first
            steps, and any earlier part of a resumed run).
        checked_at: the step the plan was checked again, over a longer stretch of the run
            (None: not yet); see :func:`revise_plan`.
        first_total: the total of the first plan where the check changed it (None: unchanged).
    """

    minutes: float
    total_steps: int
    steps_per_epoch: int
    steps_per_second: float
    measured_from: int
    measured_to: int
    elapsed_seconds: float
    checked_at: int | None = None
    first_total: int | None = None

    @property
    def epochs(self) -> float:
        """The epochs the budget bought (a fraction where the last one is cut short)."""
        return self.total_steps / self.steps_per_epoch

    def describe(self) -> str:
        return (
            f"budget {self.minutes:g} min: {self.total_steps:,} steps ({self.epochs:.2f} epochs "
            f"of {self.steps_per_epoch:,}{first_planned_note(self.first_total)}) at "
            f"{self.steps_per_second:.3g} steps/s, measured over steps "
            f"{self.measured_from}-{self.measured_to}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epochs": round(self.epochs, 4)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> BudgetPlan:
        fields = cls.__dataclass_fields__  # a plan saved before a field existed: its default
        return cls(**{name: state[name] for name in fields if name in state})


def first_planned_note(first_total: int | None) -> str:
    """``; first planned: N`` where the budget's check changed the total, else nothing."""
    return "" if first_total is None else f"; first planned: {first_total:,}"


def _steps_left(usable_seconds: float, elapsed_seconds: float, steps_per_second: float) -> int:
    """The steps the rest of ``usable_seconds`` holds at a measured rate (none once spent)."""
    if steps_per_second <= 0 or not math.isfinite(steps_per_second):
        raise ValueError(f"the measured step rate must be positive, got {steps_per_second}")
    return max(0, math.floor((usable_seconds - elapsed_seconds) * steps_per_second))


def plan_budget(
    minutes: float,
    elapsed_seconds: float,
    steps_done: int,
    steps_per_second: float,
    steps_per_epoch: int,
    reserve: float = 0.0,
    measured_from: int = 0,
) -> BudgetPlan:
    """The total number of steps a budget buys at a measured rate.

    ``total = steps_done + floor((minutes * 60 * (1 - reserve) - elapsed_seconds) * rate)``:
    the steps already taken and those the rest of the budget holds at the measured rate, less
    ``reserve``, the share of the budget kept for what is not a training step (the kNN monitor's
    evaluations, checkpoints).

    Args:
        minutes: the budget, > 0.
        elapsed_seconds: budget already spent (start-up and the steps taken so far).
        steps_done: optimizer steps taken so far.
        steps_per_second: the measured rate, > 0.
        steps_per_epoch: optimizer steps of one epoch, >= 1.
        reserve: share of the budget kept for evaluations and checkpoints, in [0, 1).
        measured_from: the first step of the measurement (recorded in the plan).

    Raises:
        BudgetTooSmallError: the budget buys less than one epoch; the message names the budget
            one epoch needs.
    """
    if minutes <= 0:
        raise ValueError(f"budget.minutes must be positive, got {minutes}")
    if not 0.0 <= reserve < 1.0:
        raise ValueError(f"budget.reserve must be in [0, 1), got {reserve}")
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch needs at least one step, got {steps_per_epoch}")
    total = steps_done + _steps_left(
        minutes * 60.0 * (1.0 - reserve), elapsed_seconds, steps_per_second
    )
    if total < steps_per_epoch:
        # One epoch at this rate, plus what is already spent, plus the reserve.
        needed = (elapsed_seconds + (steps_per_epoch - steps_done) / steps_per_second) / (
            60.0 * (1.0 - reserve)
        )
        raise BudgetTooSmallError(
            f"budget.minutes={minutes:g} buys {total:,} steps at the measured "
            f"{steps_per_second:.3g} steps/s, less than one epoch ({steps_per_epoch:,} steps): "
            f"raise budget.minutes to at least {math.ceil(needed * 10) / 10:g}, or train by "
            "epochs with budget.minutes=null trainer.max_epochs=<N>"
        )
    return BudgetPlan(
        minutes=float(minutes),
        total_steps=int(total),
        steps_per_epoch=int(steps_per_epoch),
        steps_per_second=float(steps_per_second),
        measured_from=int(measured_from),
        measured_to=int(steps_done),
        elapsed_seconds=float(elapsed_seconds),
    )


def revise_plan(
    plan: BudgetPlan,
    elapsed_seconds: float,
    steps_done: int,
    steps_per_second: float,
    measured_from: int,
    tolerance: float = 0.05,
) -> BudgetPlan:
    """The plan checked against the rate of a longer stretch of the run.

    A shared machine's speed moves over minutes, so the first ``timed_steps`` can fall on a fast
    or a slow stretch. Part-way through the run (``budget.check_at``) the rate is measured
    again, from the first measurement's start to now, and the total is planned again from it
    when it moves by more than ``tolerance``; the schedules then decay over the new total from
    this step on (a small step in the learning rate, where overrunning the budget by a fifth
    is not). No reserve is kept this time: the longer stretch's rate already includes the kNN
    monitor's evaluations and the checkpoints in it.

    Returns:
        the plan with ``checked_at`` set; its total, rate and measured steps replaced (and the
        first total kept in ``first_total``) where the check changed it. A total that would
        end before ``steps_done`` (the budget already spent) ends at ``steps_done``.
    """
    total = steps_done + _steps_left(plan.minutes * 60.0, elapsed_seconds, steps_per_second)
    if abs(total - plan.total_steps) <= tolerance * plan.total_steps:
        return replace(plan, checked_at=int(steps_done))
    return replace(
        plan,
        total_steps=int(total),
        steps_per_second=float(steps_per_second),
        measured_from=int(measured_from),
        measured_to=int(steps_done),
        elapsed_seconds=float(elapsed_seconds),
        checked_at=int(steps_done),
        first_total=plan.first_total if plan.first_total is not None else plan.total_steps,
    )
