"""Faults injected into real runs: a non-finite step, a full disk, stop signals, SIGKILL at
random steps, and memory over a few hundred steps. Each ends with a clear message and a
checkpoint the run can go on from (docs/reliability.md lists them)."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from mocoq import checkpointing
from mocoq.checkpointing import CheckpointWriteError, atomic_torch_save
from mocoq.module import MoCoModule, NonFiniteError, repair_epoch_progress
from mocoq.train import build

from conftest import tiny_module
from faults import CountTensors
from test_resume import assert_same, final_state, train

# ------------------------------------------------------------------------ non-finite steps


@pytest.fixture(scope="module")
def every_step(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoints of every step of an uninterrupted run (``step03.ckpt`` after 3 steps)."""
    run_dir = tmp_path_factory.mktemp("reference")
    reference = train(
        run_dir,
        "callbacks.checkpoint.save_top_k=-1",
        "callbacks.checkpoint.filename='step{step:02d}'",
    )
    assert reference.returncode == 0, reference.stderr
    return run_dir / "checkpoints"


@pytest.mark.parametrize(
    "where,quantity", [("input", "the input views"), ("weights", "the query encoder's weights")]
)
def test_a_nan_is_caught_at_its_step_and_the_last_checkpoint_is_intact(
    where: str, quantity: str, every_step: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    result = train(
        run_dir,
        "+callbacks.nan._target_=faults.NaNAtStep",
        "+callbacks.nan.step=3",
        f"+callbacks.nan.where={where}",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"mocoq-train: error: step 3: {quantity} went non-finite" in result.stderr
    assert "the step's update was not applied" in result.stderr
    # The checkpoint after step 2 (global step 3) is whole and is what 3 clean steps give.
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    clean = torch.load(every_step / "step03.ckpt", weights_only=False)
    assert saved["global_step"] == clean["global_step"] == 3
    assert_same(clean["state_dict"], saved["state_dict"])
    assert_same(clean["optimizer_states"][0]["state"], saved["optimizer_states"][0]["state"])
    assert all(
        torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()
    )


class Pairs(Dataset[Any]):
    """Two views of noise images; the batches of ``nan_batches`` (batch size 8) are NaN."""

    def __init__(self, nan_batches: tuple[int, ...] = (), n: int = 48) -> None:
        generator = torch.Generator().manual_seed(0)
        self.views = torch.randn(2, n, 1, 12, 12, generator=generator)
        for batch in nan_batches:
            self.views[0, batch * 8 : (batch + 1) * 8] = float("nan")

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> Any:
        return (self.views[0, index], self.views[1, index]), 0


class Snapshots(pl.Callback):
    """Everything a step can change, before and after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    @staticmethod
    def state(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
        optimizer = trainer.optimizers[0].state_dict()["state"]
        return {
            "module": {k: v.clone() for k, v in module.state_dict().items()},
            "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.items()},
        }

    def on_train_batch_start(
        self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any
    ) -> None:
        if trainer.global_step == self.step:
            self.before = self.state(trainer, module)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self.state(trainer, module)


def fit(module: MoCoModule, data: Dataset[Any], tmp_path: Path, *callbacks: pl.Callback) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(module, DataLoader(data, batch_size=8, drop_last=True))


def test_skip_leaves_the_step_out_entirely_and_the_run_goes_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(on_nonfinite="skip", max_nonfinite_skips=1)
    snapshots = Snapshots(step=2)
    with pytest.warns(
        UserWarning, match=r"step 2: the input views went non-finite.*1 of at most 1"
    ):
        fit(module, Pairs(nan_batches=(2,)), tmp_path, snapshots)
    # Weights, key encoder (no EMA), queue keys and pointer, optimizer momentum: all unchanged.
    assert_same(snapshots.before, snapshots.after)
    assert module.global_step == 6 and module.nonfinite_skips == 1  # and the run went on
    assert module.queue.pointer == 5 * 8 % module.queue.size  # 5 batches of keys enqueued
    assert all(torch.isfinite(p).all() for p in module.parameters())
    # One more than the budget stops the run.
    again = tiny_module(on_nonfinite="skip", max_nonfinite_skips=1)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="max_nonfinite_skips"):
        fit(again, Pairs(nan_batches=(1, 3)), tmp_path)


def test_a_non_finite_gradient_stops_before_the_optimizer_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module()
    snapshots = Snapshots(step=2)

    class PoisonGradient(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == 2:  # the loss stays finite, one gradient does not
                module.head[0].weight.register_hook(lambda grad: grad * float("inf"))

    with pytest.raises(NonFiniteError, match=r"step 2: the gradient of head\.0\.weight"):
        fit(module, Pairs(), tmp_path, snapshots, PoisonGradient())
    after = Snapshots.state(module.trainer, module)
    # Every weight, the key encoder and the optimizer state are as before the step (its keys
    # were already in the queue: they come from the finite forward pass).
    weights = {k: v for k, v in after["module"].items() if not k.startswith("queue.")}
    assert_same({k: snapshots.before["module"][k] for k in weights}, weights)
    assert_same(snapshots.before["optimizer"], after["optimizer"])


# ---------------------------------------------------------------------- atomic checkpoints


def test_atomic_save_keeps_the_old_file_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    real_save = torch.save

    def full_disk(obj: Any, file: Any) -> None:
        real_save(obj, file)  # some bytes reach the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        atomic_torch_save({"step": 2}, target)
    message = str(caught.value)
    assert message.startswith(f"could not write checkpoint {target}: No space left on device")
    assert "the previous last.ckpt there is intact" in message and "free space" in message
    assert torch.load(target) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind

    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    atomic_torch_save({"step": 3}, target)
    assert torch.load(target) == {"step": 3} and os.listdir(tmp_path) == ["last.ckpt"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs (needs root, as CI runs; elsewhere the test is skipped, in CI it fails)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {mounted.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_checkpointing_keeps_the_previous_checkpoint(
    small_disk: Path, tmp_path: Path
) -> None:
    checkpoints = small_disk / "checkpoints"
    result = train(
        tmp_path / "run",
        f"callbacks.checkpoint.dirpath={checkpoints}",
        "+callbacks.fill._target_=faults.FillDiskAtStep",
        "+callbacks.fill.step=3",
        f"+callbacks.fill.directory={small_disk}",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"mocoq-train: error: could not write checkpoint {checkpoints}/" in result.stderr
    assert "No space left on device" in result.stderr and "is intact" in result.stderr
    saved = torch.load(checkpoints / "last.ckpt", weights_only=False)  # whole and readable
    assert saved["global_step"] == 3  # written after the last step that had room
    assert not [p for p in os.listdir(checkpoints) if p.startswith(".")]  # no temporaries


# ------------------------------------------------------------------------- stop signals


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_exits_cleanly_and_the_run_resumes_exactly(
    signal_name: str, tmp_path: Path
) -> None:
    reference = train(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "run"
    stopped = train(
        run_dir,
        "+callbacks.stop._target_=faults.SignalSelfAtStep",
        "+callbacks.stop.step=2",
        f"+callbacks.stop.signal_name={signal_name}",
    )
    assert stopped.returncode == 0, stopped.stderr
    assert f"Stopped by {signal_name} after step 3" in stopped.stdout
    assert f"Continue with: mocoq-train resume={run_dir}" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3  # the step in progress finished and was saved
    finished = train(run_dir, "ckpt_path=last")
    assert finished.returncode == 0, finished.stderr
    assert_same(final_state(tmp_path / "reference"), final_state(run_dir))


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("MOCOQ_FAULT_SEED", time.time_ns() % 2**31))
    draw = random.Random(seed)
    # 3 epochs x 4 steps. One kill right after an epoch's last step: resuming from there and
    # being killed again mid-epoch is where Lightning's epoch counters go wrong (see
    # mocoq.module.repair_epoch_progress).
    boundary = draw.choice([4, 8])
    kills = sorted([boundary, *draw.sample([s for s in range(1, 12) if s != boundary], 2)])
    where = f"(MOCOQ_FAULT_SEED={seed}: kills before steps {kills})"
    reference = train(tmp_path / "reference", "trainer.max_epochs=3")
    assert reference.returncode == 0, reference.stderr
    run_dir = tmp_path / "run"
    for kill_at in kills:
        killed = train(
            run_dir,
            "trainer.max_epochs=3",
            "ckpt_path=last",
            "+callbacks.kill._target_=faults.KillAtStep",
            f"+callbacks.kill.step={kill_at}",
        )
        assert killed.returncode == -9, f"{where} {killed.stderr}"
        saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == kill_at, where
    finished = train(run_dir, "trainer.max_epochs=3", "ckpt_path=last")
    assert finished.returncode == 0, f"{where} {finished.stderr}"
    expected = final_state(tmp_path / "reference")
    assert expected["global_step"] == 12
    assert_same(expected, final_state(run_dir), where)


def test_epoch_counters_of_a_mid_epoch_checkpoint_are_repaired() -> None:
    def checkpoint(epochs: dict[str, int], batches: int, last: bool) -> dict[str, Any]:
        batch = {
            "ready": batches,
            "completed": batches - 1,
            "started": batches,
            "processed": batches,
        }
        return {
            "loops": {
                "fit_loop": {
                    "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
                    "epoch_loop.batch_progress": {"current": batch, "is_last_batch": last},
                }
            }
        }

    # Written mid-epoch after a resume from an epoch's last batch: no epoch counted as running.
    broken = checkpoint({"ready": 1, "started": 1, "processed": 1, "completed": 1}, 2, False)
    assert repair_epoch_progress(broken)
    fixed = broken["loops"]["fit_loop"]["epoch_progress"]
    assert (
        fixed["total"]
        == fixed["current"]
        == {"ready": 2, "started": 2, "processed": 1, "completed": 1}
    )
    # What Lightning writes elsewhere is left alone: mid-epoch, and after an epoch's last batch.
    normal = checkpoint({"ready": 2, "started": 2, "processed": 1, "completed": 1}, 2, False)
    end = checkpoint({"ready": 1, "started": 1, "processed": 0, "completed": 0}, 4, True)
    for state in (normal, end, {}):
        before = repr(state)
        assert not repair_epoch_progress(state) and repr(state) == before


# ---------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_no_tensors_or_memory_pile_up_over_hundreds_of_steps(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg(
        "trainer.max_epochs=80",  # 4 steps each: 320 steps
        "callbacks.knn.every_n_epochs=20",
        "callbacks.diagnostics.every_n_steps=10",
        "logger=all",
    )
    datamodule, module, trainer = build(cfg)
    probe = CountTensors(at=(40, 120, 320))
    trainer.callbacks.append(probe)  # type: ignore[attr-defined]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 320
    growth = probe.counts[320] - probe.counts[120]
    assert growth <= 8, f"live tensors {probe.counts}: something keeps a tensor per step"
    rss = {step: value / 2**20 for step, value in probe.rss.items()}
    assert rss[320] - rss[120] < 64, f"resident memory (MiB) {rss}"
