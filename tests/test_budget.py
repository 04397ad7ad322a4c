"""Training to a time budget: the plan from the measured rate, the schedules sized to it, exact
resume, and the refusals. The runs use ``faults.FakeClock``: each training batch takes 0.5 s on
its clock, so the measured rate is 2 steps/s whatever the machine is doing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mocoq.budget import BudgetPlan, BudgetTooSmallError, plan_budget, revise_plan
from mocoq.schedules import LRSchedule, cosine, ema_momentum_at
from mocoq.train import ConfigError, run, size_from_command_line
from mocoq.validate import validate_config

from test_resume import RUN, TESTS, assert_same, final_state

# 0.2 min = 12 s of fake time at 0.5 s a step: 24 steps, 6 epochs of 4 (TINY's 4 batches).
# The rate is timed over steps 2-6, so the plan is made at step 6, with 3 s spent.
BUDGET = [
    "budget.minutes=0.2",
    "budget.skip_steps=2",
    "budget.timed_steps=4",
    "budget.reserve=0",
    "+callbacks.clock._target_=faults.FakeClock",
    "+callbacks.clock.seconds_per_step=0.5",
]


def train_in_subprocess(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``mocoq-train`` with test_resume's tiny config (a checkpoint after every step), sized by
    the budget in ``overrides``: the config's epochs are not given on the command line, where
    they would size the run instead."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = [o for o in RUN if not o.startswith("trainer.max_epochs=")]
    command = [sys.executable, "-m", "mocoq.train", *config, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        [*command, *overrides], capture_output=True, text=True, env=env, timeout=300
    )


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def csv_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a run logged with ``logger=csv`` (test_resume's config), by tag."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as metrics:
        rows = list(csv.DictReader(metrics))
    tags = [tag for tag in rows[0] if tag not in ("step", "epoch")] if rows else []
    return {
        tag: [(int(row["step"]), float(row[tag])) for row in rows if row[tag] != ""] for tag in tags
    }


def test_plan_from_the_measured_rate() -> None:
    # 10 min at 2 steps/s, 60 s spent by step 100, epochs of 500 steps: 100 + (600 - 60) x 2.
    plan = plan_budget(10, 60.0, 100, 2.0, 500, measured_from=40)
    assert plan.total_steps == 1180 and plan.epochs == pytest.approx(2.36)
    assert (plan.measured_from, plan.measured_to, plan.steps_per_epoch) == (40, 100, 500)
    # The reserve comes off the budget first: 100 + (540 - 60) x 2.
    assert plan_budget(10, 60.0, 100, 2.0, 500, reserve=0.1).total_steps == 1060
    # Twice the rate buys twice the steps still to come.
    assert plan_budget(10, 60.0, 100, 4.0, 500).total_steps == 100 + 2 * 1080
    assert plan_budget(10, 60.0, 100, 2.0, 500).to_dict()["epochs"] == pytest.approx(2.36)


def test_a_plan_is_checked_against_a_longer_stretch_and_changed_only_if_the_rate_moved() -> None:
    # 10 min less a 5% reserve, planned at 2 steps/s from step 100 (60 s spent): 1,120 steps.
    plan = plan_budget(10, 60.0, 100, 2.0, 500, reserve=0.05, measured_from=40)
    assert plan.total_steps == 1120 and plan.checked_at is None
    # At step 400, 210 s spent, 400 - 40 steps over 190 s: 1.895 steps/s, 400 + 390 x 1.895 =
    # 1,138 steps, within 5% of the plan: the plan stays, checked.
    same = revise_plan(plan, 210.0, 400, 360 / 190, measured_from=40)
    assert same == BudgetPlan(**{**plan.__dict__, "checked_at": 400})
    # The machine slowed to 1.2 steps/s: 400 + floor(390 x 1.2) = 868 steps, no reserve (the
    # stretch's rate has the monitor's evaluations in it); the first total is kept.
    revised = revise_plan(plan, 210.0, 400, 1.2, measured_from=40)
    assert revised.total_steps == 868 and revised.first_total == 1120
    assert (revised.measured_from, revised.measured_to, revised.checked_at) == (40, 400, 400)
    assert revised.elapsed_seconds == 210.0 and revised.steps_per_second == 1.2
    assert "868 steps (1.74 epochs of 500; first planned: 1,120)" in revised.describe()
    # A faster machine buys more; a budget already spent ends at the step it is checked at.
    assert revise_plan(plan, 210.0, 400, 3.0, measured_from=40).total_steps == 400 + 1170
    assert revise_plan(plan, 700.0, 400, 1.0, measured_from=40).total_steps == 400
    # A plan saved before the check existed loads with no check done.
    old = {k: v for k, v in plan.to_dict().items() if k not in ("checked_at", "first_total")}
    assert BudgetPlan.from_dict(old) == plan


def test_a_budget_under_one_epoch_is_refused_with_what_it_needs() -> None:
    # 1 min at 2 steps/s with 4 s spent: 112 steps of a 500-step epoch. One epoch needs
    # 4 s + 500 / 2 s = 254 s: 4.3 minutes, rounded up to a tenth.
    expected = (
        r"budget.minutes=1 buys 112 steps at the measured 2 steps/s, less than one epoch "
        r"\(500 steps\): raise budget.minutes to at least 4.3, or train by epochs with "
        r"budget.minutes=null trainer.max_epochs=<N>"
    )
    with pytest.raises(BudgetTooSmallError, match=expected):
        plan_budget(1, 4.0, 0, 2.0, 500)
    # Spent beyond the budget: nothing left, still the same message.
    with pytest.raises(BudgetTooSmallError, match="buys 10 steps"):
        plan_budget(0.1, 100.0, 10, 2.0, 500)
    for bad in ({"minutes": 0}, {"steps_per_second": 0.0}, {"reserve": 1.0}):
        arguments = {"minutes": 1, "steps_per_second": 2.0, "reserve": 0.0} | bad
        with pytest.raises(ValueError):
            plan_budget(
                arguments["minutes"], 0.0, 0, arguments["steps_per_second"], 10,
                reserve=arguments["reserve"],
            )  # fmt: skip


def test_schedules_hold_their_start_until_the_total_is_known() -> None:
    schedule = LRSchedule(warmup_epochs=1, final_ratio=0.0)
    # The warmup (4 steps an epoch) does not depend on the total; after it, an unknown total
    # holds the multiplier at the start of the decay.
    assert [schedule(s, None, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert schedule(14, 24, 4) == pytest.approx(cosine(10, 20, 1.0, 0.0))
    assert ema_momentum_at(10, None, 0.99, "cosine") == 0.99
    assert ema_momentum_at(12, 24, 0.99, "cosine") == pytest.approx(0.995)


def test_budget_sizes_the_run_and_its_schedules_from_the_measured_rate(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        *BUDGET,  # sizes the run, not TINY's trainer.max_epochs=1
        "schedule.warmup_epochs=1",
        "model.ema_momentum_schedule=cosine",
        "callbacks.knn.evaluations=3",
        "report.raw_pixel_baseline=true",
    )
    summary = run(cfg)

    assert summary["steps"] == 24 and summary["epochs"] == 6.0
    plan = summary["budget"]
    assert plan["total_steps"] == 24 and plan["steps_per_second"] == pytest.approx(2.0)
    assert (plan["measured_from"], plan["measured_to"], plan["elapsed_seconds"]) == (2, 6, 3.0)
    assert json.loads((tmp_path / "summary.json").read_text())["budget"] == plan
    # Checked after step 8 (0.3 x 24): the rate had not moved, so the plan stayed.
    assert (plan["checked_at"], plan["first_total"]) == (8, None)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["callbacks"]["TimeBudget"]["plan"]["total_steps"] == 24

    logged = scalars(tmp_path)
    base = 0.06  # optim.lr for TINY's batch of 16
    schedule = LRSchedule(warmup_epochs=1)
    # The plan is made after step 5; step 6's lr was computed before it, with no total.
    expected_lr = [base * schedule(s, None if s <= 6 else 24, 4) for s in range(24)]
    lrs = [value for _, value in logged["train/lr"]]
    assert lrs == pytest.approx(expected_lr, rel=1e-5)
    assert lrs[-1] < 0.01 * base  # decayed over the 24 steps the budget bought
    expected_ema = [ema_momentum_at(s, None if s < 6 else 24, 0.99, "cosine") for s in range(24)]
    emas = [value for _, value in logged["train/ema_momentum"]]
    assert emas == pytest.approx(expected_ema, rel=1e-6)
    # The monitor's cadence is sized to the total: after steps 8 and 16, then the full
    # protocol after the last, with k=20 beside it.
    assert [step for step, _ in logged["knn/top1"]][:2] == [8, 16]
    assert len(logged["knn/top1"]) == 3 and len(logged["knn/top1_k20"]) == 1
    assert logged["budget/total_steps"] == [(6, 24.0)]
    assert [r["k"] for r in summary["knn_extra"]] == [20]
    assert [r["k"] for r in summary["knn_raw_pixels_extra"]] == [20]


def test_too_small_a_budget_stops_with_one_line(tmp_path: Path) -> None:
    # 0.05 min = 3 s at 2 steps/s: 6 steps, under one epoch of 8 (3 s spent by step 6).
    result = train_in_subprocess(
        tmp_path / "run",
        *[o.replace("budget.minutes=0.2", "budget.minutes=0.05") for o in BUDGET],
        "trainer.limit_train_batches=8",
    )
    assert result.returncode == 2, result.stderr
    assert (
        "mocoq-train: error: budget.minutes=0.05 buys 6 steps at the measured 2 steps/s, less "
        "than one epoch (8 steps): raise budget.minutes to at least 0.1" in result.stderr
    )


@pytest.mark.slow
def test_budgeted_run_killed_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    reference = train_in_subprocess(tmp_path / "reference", *BUDGET)
    assert reference.returncode == 0, reference.stderr

    interrupted = tmp_path / "interrupted"
    for kill_at in (9, 18):  # after the plan (step 6), mid-epoch both times
        killed = train_in_subprocess(
            interrupted,
            *BUDGET,
            "ckpt_path=last",
            "+callbacks.kill._target_=faults.KillAtStep",
            f"+callbacks.kill.step={kill_at}",
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Resumed with another budget: the run keeps its plan (and says so).
    other_budget = [o.replace("budget.minutes=0.2", "budget.minutes=5") for o in BUDGET]
    finished = train_in_subprocess(interrupted, *other_budget, "ckpt_path=last")
    assert finished.returncode == 0, finished.stderr
    assert "keeps its plan (24 steps)" in finished.stderr + finished.stdout

    expected, resumed = final_state(tmp_path / "reference"), final_state(interrupted)
    assert expected["global_step"] == 24
    assert_same(expected, resumed)


# After step 6 (the plan: 24 steps at 2 steps/s) every step takes 1 s instead of 0.5.
SLOWER = ["+callbacks.clock.slower=1.0", "+callbacks.clock.slower_after=6"]


@pytest.mark.slow
def test_a_machine_that_slows_down_gets_a_new_plan_that_resumes_exactly(tmp_path: Path) -> None:
    reference = train_in_subprocess(tmp_path / "reference", *BUDGET, *SLOWER)
    assert reference.returncode == 0, reference.stderr
    plan = json.loads((tmp_path / "reference" / "summary.json").read_text())["budget"]
    # Checked at step 8 (0.3 x 24, rounded up): 6 steps since step 2 in 4 s, 1.5 steps/s,
    # 5 s spent: 8 + floor(7 x 1.5) = 18 steps, which end 15 s in, where 24 would end 21 s in.
    assert (plan["total_steps"], plan["first_total"], plan["checked_at"]) == (18, 24, 8)
    assert (plan["measured_from"], plan["measured_to"], plan["steps_per_second"]) == (2, 8, 1.5)
    logged = csv_scalars(tmp_path / "reference")
    assert logged["budget/total_steps"] == [(6, 24.0), (8, 18.0)]
    lrs = [value for _, value in logged["train/lr"]]
    assert len(lrs) == 18 and lrs[-1] < 0.01 * lrs[0]  # decayed over the new total
    assert "(4.50 epochs of 4; first planned: 24)" in reference.stderr + reference.stdout

    # Killed after the check, resumed: the new plan is kept and the run ends as the reference.
    interrupted = tmp_path / "interrupted"
    killed = train_in_subprocess(
        interrupted, *BUDGET, *SLOWER, "+callbacks.kill._target_=faults.KillAtStep",
        "+callbacks.kill.step=12",
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = train_in_subprocess(interrupted, *BUDGET, *SLOWER, "ckpt_path=last")
    assert finished.returncode == 0, finished.stderr
    assert json.loads((interrupted / "summary.json").read_text())["budget"] == plan
    assert_same(final_state(tmp_path / "reference"), final_state(interrupted))


def test_a_run_stopped_before_its_plan_measures_again_and_counts_what_was_spent(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    killed = train_in_subprocess(
        run_dir, *BUDGET, "+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=3"
    )
    assert killed.returncode == -signal.SIGKILL
    finished = train_in_subprocess(run_dir, *BUDGET, "ckpt_path=last")
    assert finished.returncode == 0, finished.stderr
    plan = json.loads((run_dir / "summary.json").read_text())["budget"]
    # Timed over steps 5-9 of the resumed process; the 1.5 s its first part spent count.
    assert (plan["measured_from"], plan["measured_to"]) == (5, 9)
    assert plan["elapsed_seconds"] == 4.5 and plan["total_steps"] == 24


def test_command_line_epochs_size_a_budgeted_run(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("budget.minutes=10")
    size_from_command_line(cfg, ["experiment=x", "trainer.max_epochs=2"])
    assert cfg.budget.minutes is None
    cfg = make_cfg("budget.minutes=10")
    size_from_command_line(cfg, ["model.temperature=0.1"])  # nothing sizes it: the budget stays
    assert cfg.budget.minutes == 10
    with pytest.raises(ConfigError, match=r"budget\.minutes and trainer\.max_steps both size"):
        size_from_command_line(cfg, ["budget.minutes=10", "trainer.max_steps=100"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["budget.minutes=0"], "budget.minutes must be a positive number of minutes"),
        (
            ["budget.minutes=5", "trainer.max_steps=100"],
            "budget.minutes=5 and trainer.max_steps=100 both size the run",
        ),
        (["budget.minutes=5", "budget.timed_steps=0"], "budget.timed_steps >= 1"),
        (["budget.minutes=5", "budget.reserve=1.5"], r"budget.reserve must be in \[0, 1\)"),
        (["budget.minutes=5", "budget.check_at=1"], r"budget.check_at must be a share"),
    ],
)
def test_budget_values_are_checked(
    make_cfg: Callable[..., DictConfig], overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(make_cfg(*overrides))


def test_the_report_states_the_budget_and_the_gap_to_pixels_at_every_k() -> None:
    from mocoq.train import format_summary

    def knn(k: int, top1: float) -> dict[str, float]:
        return {"k": k, "top1": top1, "temperature": 0.1}

    summary = {
        "run_dir": "run",
        "checkpoint": "run/last.ckpt",
        "epochs": 4.034188,
        "fit_seconds": 594.0,
        "dataset": {"queries": "test", "bank": "train"},
        "budget": {
            "minutes": 10.0,
            "total_steps": 1888,
            "epochs": 4.034188,
            "steps_per_second": 3.3216,
            "measured_from": 10,
            "measured_to": 60,
        },
        "knn": knn(200, 0.8331),
        "knn_extra": [knn(20, 0.8684)],
        "knn_raw_pixels": knn(200, 0.8178),
        "knn_raw_pixels_extra": [knn(20, 0.8547)],
    }
    lines = format_summary(summary).splitlines()
    assert (
        "Budget        : 10 min bought 1,888 steps (4.03 epochs) at 3.32 steps/s, measured over "
        "steps 10-60; fit took 9.9 min" in lines
    )
    encoder = next(line for line in lines if "mocoq encoder" in line)
    assert "(4.03 epochs)" in encoder and encoder.split()[-2:] == ["0.8331", "0.8684"]
    pixels = next(line for line in lines if line.strip().startswith("raw pixels"))
    assert pixels.split()[-2:] == ["0.8178", "0.8547"]
    gap = next(line for line in lines if "encoder - raw pixels" in line)
    assert gap.split()[-2:] == ["+1.53", "+1.37"]
    # A plan the check changed says what it first was.
    summary["budget"] = {**summary["budget"], "first_total": 2040, "measured_to": 600}
    assert (
        "Budget        : 10 min bought 1,888 steps (4.03 epochs; first planned: 2,040) at 3.32 "
        "steps/s, measured over steps 10-600; fit took 9.9 min" in format_summary(summary)
    )
