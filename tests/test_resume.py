"""Exact resume: a run killed mid-epoch and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mocoq.backbones import SmallResNet
from mocoq.heads import ProjectionHead
from mocoq.module import MoCoModule
from mocoq.train import ConfigError, load_initial_weights

from conftest import TINY, tiny_module

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


def test_another_queue_size_is_refused_and_init_weights_starts_afresh(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(run_dir, "trainer.max_epochs=1").returncode == 0
    refused = train(run_dir, "trainer.max_epochs=2", "ckpt_path=last", "model.queue_size=128")
    assert refused.returncode == 2
    assert "checkpoint queue holds 64 keys of dim 16, but this model's queue is 128 x 16" in (
        refused.stderr
    )
    assert "init_weights=<checkpoint>" in refused.stderr

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    fresh = tmp_path / "fresh"
    started = train(fresh, f"init_weights={checkpoint}", "model.queue_size=128")
    assert started.returncode == 0, started.stderr
    assert "encoder weights initialised from" in started.stderr + started.stdout
    state = torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["state_dict"]["queue.keys"].shape == (128, 16) and state["global_step"] == 8
    # Requeued with the same command (+ ckpt_path=last): it resumes, init_weights is not reapplied.
    again = train(
        fresh,
        f"init_weights={checkpoint}",
        "model.queue_size=128",
        "ckpt_path=last",
        "trainer.max_epochs=3",
    )
    assert again.returncode == 0, again.stderr
    assert "init_weights is not applied again" in again.stderr + again.stdout
    assert torch.load(fresh / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12


def test_init_weights_loads_encoders_but_not_the_queue(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tiny_module(queue_size=32)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    torch.manual_seed(1)
    target = tiny_module(queue_size=64)
    queue_before = target.queue.keys.clone()
    load_initial_weights(target, str(tmp_path / "source.ckpt"))
    for name, value in source.state_dict().items():
        if not name.startswith("queue."):
            assert torch.equal(target.state_dict()[name], value), name
    assert torch.equal(target.queue.keys, queue_before)

    other = MoCoModule(
        backbone=SmallResNet(1, widths=(8, 8), blocks=(1, 1)),
        head=functools.partial(ProjectionHead, out_dim=8),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_initial_weights(other, str(tmp_path / "source.ckpt"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_initial_weights(other, str(tmp_path / "missing.ckpt"))
