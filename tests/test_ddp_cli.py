"""``mocoq-train`` under Lightning's DDP on 2 CPU processes, and a resume across device counts."""

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
BASE = [
    *TINY,
    "trainer.limit_train_batches=1.0",  # whole epochs: 128 images
    "trainer.max_epochs=1",
    "model.queue_size=128",
    "callbacks.knn=null",
    "callbacks.throughput=null",
    "callbacks.checkpoint.every_n_epochs=null",
    "callbacks.checkpoint.every_n_train_steps=1",
]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LOCAL_RANK", None)
    command = [
        sys.executable,
        "-m",
        "mocoq.train",
        *BASE,
        f"hydra.run.dir={run_dir}",
        "+callbacks.probe._target_=probes.SaveRankState",
        f"+callbacks.probe.directory={run_dir}/ranks",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_ddp_run_keeps_one_queue_and_resumes_across_device_counts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 1 process, batch 16: killed before step 3, so the last checkpoint is after step 3.
    killed = train(run_dir, "+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert before["global_step"] == 3 and int(before["state_dict"]["queue.ptr"]) == 48

    events_before = set((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    # Resumed on 2 processes (global batch 32): the 80 images left in the epoch make 2 steps.
    resumed = train(run_dir, *DDP, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr
    ranks = [torch.load(run_dir / "ranks" / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["key_bn"] for r in ranks] == ["shuffle", "shuffle"]  # auto under DDP
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # one global queue
    assert ranks[0]["global_step"] == 5
    assert ranks[0]["pointer"] == ranks[1]["pointer"] == 48 + 2 * 32
    # The keys enqueued before the interruption that nothing overwrote are still there.
    kept = slice(0, 48)  # the 3 steps before the kill wrote rows 0..47, the 2 after 48..111
    assert torch.equal(ranks[0]["queue"][kept], before["state_dict"]["queue.keys"][kept])
    # The lr follows the new global batch (16 -> 32 images per step, linear rule), not the
    # value restored with the optimizer state.
    lr_before = before["optimizer_states"][0]["param_groups"][0]["initial_lr"]
    assert ranks[0]["lr"] == pytest.approx(2 * lr_before)
    # Rank 0 alone writes the logs and the checkpoints.
    new_events = set((run_dir / "tensorboard").rglob("events.out.tfevents.*")) - events_before
    writers = {
        e.name.split(".")[-2] for e in new_events
    }  # events.out.tfevents.<t>.<host>.<pid>.<n>
    assert new_events and len(writers) == 1, new_events  # one writing process of the two
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 5
    assert torch.equal(final["state_dict"]["queue.keys"], ranks[0]["queue"])
