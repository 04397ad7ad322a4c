"""Schedules as pure functions of the step (learning rate and EMA momentum).

A run's total number of steps is ``None`` while it is not known yet: a run trained to a time
budget measures its step rate over its first steps (:mod:`mocoq.budget`) before it fixes the
total. Until then every schedule holds the value its decay starts from (the warmup, which does
not depend on the total, runs as usual), so those first steps are the same whatever total the
measurement gives, and a resumed run repeats them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps`` (then flat)."""
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, total_steps: int | None, warmup_steps: int, start: float = 1.0, end: float = 0.0
) -> float:
    """Linear warmup from ``start / warmup_steps`` to ``start``, then cosine to ``end`` at
    ``total_steps`` (None: not known yet, so ``start`` after the warmup).

    The warmup's first value is ``start / warmup_steps`` rather than 0, so step 0 trains.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start * (step + 1) / warmup_steps
    if total_steps is None:
        return start
    return cosine(step - warmup_steps, total_steps - warmup_steps, start, end)


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base learning rate per optimizer step.

    Args:
        warmup_epochs: linear warmup length, in epochs (fractions allowed).
        final_ratio: the multiplier reached at the last step (0 for the MoCo cosine schedule).
        kind: ``cosine`` (with warmup) or ``constant``.
    """

    warmup_epochs: float = 0.0
    final_ratio: float = 0.0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"schedule kind must be 'cosine' or 'constant', got {self.kind!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """The warmup's length in optimizer steps."""
        return round(self.warmup_epochs * steps_per_epoch)

    def __call__(self, step: int, total_steps: int | None, steps_per_epoch: int) -> float:
        """The multiplier at ``step`` of ``total_steps`` (None: not known yet)."""
        warmup = self.warmup_steps(steps_per_epoch)
        end = 1.0 if self.kind == "constant" else self.final_ratio
        return warmup_cosine(step, total_steps, warmup, 1.0, end)


def ema_momentum_at(step: int, total_steps: int | None, base: float, schedule: str) -> float:
    """The EMA momentum at ``step``: constant ``base``, or cosine from ``base`` up to 1.0 over
    ``total_steps`` (None: not known yet, so ``base``)."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base if total_steps is None else cosine(step, total_steps, base, 1.0)
    raise ValueError(f"ema_momentum_schedule must be 'constant' or 'cosine', got {schedule!r}")
