"""Exact resume: a run killed mid-epoch and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

TESTS = Path(__file__).resolve().parent
RUN = [
    *TINY,
    "trainer.max_epochs=2",  # 2 epochs x 4 steps: kills land mid-epoch in both epochs
    "dataset.num_workers=1",  # augmentation in a worker process, as in real runs
    "callbacks.knn=null",
    "callbacks.throughput=null",
    "callbacks.checkpoint.every_n_epochs=null",
    "callbacks.checkpoint.every_n_train_steps=1",
    "logger=csv",
]


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "mocoq.train", *RUN, f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def final_state(run_dir: Path) -> dict[str, object]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return {
        "global_step": checkpoint["global_step"],
        "epoch": checkpoint["epoch"],
        "state_dict": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"][0]["state"],
        "lr_scheduler": checkpoint["lr_schedulers"][0],
    }


def assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.slow
def test_run_killed_twice_mid_epoch_resumes_exactly(tmp_path: Path) -> None:
    reference = train(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    interrupted = tmp_path / "interrupted"
    for kill_at in (2, 6):  # step 2 of epoch 0, then step 2 of epoch 1
        killed = train(
            interrupted,
            "ckpt_path=last",
            "+callbacks.kill._target_=faults.KillAtStep",
            f"+callbacks.kill.step={kill_at}",
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        saved = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == kill_at  # the checkpoint after the last finished step
    finished = train(interrupted, "ckpt_path=last")
    assert finished.returncode == 0, finished.stderr

    expected, resumed = final_state(tmp_path / "reference"), final_state(interrupted)
    assert expected["global_step"] == 8
    # Query and key encoders, queue keys and pointer, optimizer momentum, LR schedule: equal.
    names = expected["state_dict"].keys()  # type: ignore[attr-defined]
    assert {"queue.keys", "queue.ptr"} <= names
    assert any(n.startswith("key_backbone.") for n in names)
    assert_same(expected, resumed)


def test_resume_a_run_directory_with_its_own_overrides(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = train(run_dir, "trainer.max_epochs=1", "model.temperature=0.3")
    assert first.returncode == 0, first.stderr
    # Only the directory and what changes: the run's overrides come from its .hydra folder.
    command = [sys.executable, "-m", "mocoq.train", f"resume={run_dir}", "trainer.max_epochs=2"]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 8 and state["epoch"] == 1  # 4 steps + 4 more, same directory
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "temperature: 0.3" in config and "max_epochs: 2" in config
    assert not (tmp_path / "outputs").exists()  # nothing written anywhere else

    missing = subprocess.run(
        [sys.executable, "-m", "mocoq.train", f"resume={tmp_path}/nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "mocoq-train: error: resume=" in missing.stderr and "no checkpoints/last.ckpt" in (
        missing.stderr
    )
