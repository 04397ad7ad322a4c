"""The whole pipeline: compose -> build -> fit -> report, on tiny synthetic data."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mocoq.train import run


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_short_fit_learns_and_writes_tensorboard(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "trainer.max_epochs=6",
        "trainer.limit_train_batches=8",
        "dataset.loader.num_samples=128",
        "model.queue_size=64",
        "optim.lr=0.05",
        "report.raw_pixel_baseline=true",
        "callbacks.knn.at_start=true",
        "callbacks.knn.every_n_epochs=3",
    )
    summary = run(cfg)

    logged = scalars(tmp_path)
    for tag in (
        "train/loss",
        "train/acc1",
        "train/lr",
        "train/ema_momentum",
        "train/pos_logit",
        "train/neg_logit",
        "throughput/images_per_s",
        "knn/top1",
        "knn/top5",
        "knn/k",
        "knn/temperature",
    ):
        assert logged.get(tag), f"{tag} missing from the event file"
    # Learning, measured where a tiny net on tiny images shows it within 48 steps: the kNN
    # accuracy of the encoder rises well above its random-init value (by 0.16 to 0.8 over seeds
    # 0-5). (The InfoNCE value itself first rises here as the random initial queue fills with
    # real keys, and the 65-way top-1 stays near chance in 48 steps once the key batch is
    # shuffled for split BatchNorm; the loss's fall is checked on Fashion-MNIST in
    # test_real_data.py.)
    knn = logged["knn/top1"]
    assert max(knn[1:]) > knn[0] + 0.1, knn
    assert logged["knn/k"][-1] == 128  # k=200 clamped to the 128-image bank, and recorded
    assert logged["knn/temperature"][-1] == pytest.approx(cfg.callbacks.knn.temperature)
    assert logged["train/lr"][-1] < logged["train/lr"][0]  # cosine decay
    assert len(logged["knn/top1"]) == 3  # at start, after epoch 3 and after epoch 6

    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["knn"]["top1"] == logged["knn/top1"][-1]
    assert {"knn_random_init", "knn_raw_pixels"} <= written.keys()
    assert written["knn"]["k"] == written["knn_raw_pixels"]["k"]
    assert written["epochs"] == 6


def test_hparams_hold_the_composed_config_and_results(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    run(make_cfg("trainer.limit_train_batches=2"))
    hparams = (tmp_path / "tensorboard" / "hparams.yaml").read_text()
    assert "queue_size: 64" in hparams and "mocoq.data.datasets.synthetic" in hparams
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    session = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"model/queue_size" in session and b"dataset/batch_size" in session
    assert scalars(tmp_path)["hparams/knn_top1"]  # the final kNN is the HParams metric


def test_resume_from_last_checkpoint_continues_the_run(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    first = run(make_cfg("trainer.max_epochs=1", "~callbacks.knn"))
    assert first["steps"] == 4
    resumed = run(
        make_cfg(
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "~callbacks.knn",
            "ckpt_path=last",
        )
    )
    # Resumed: epoch 2 adds 2 steps to the 4 already taken (a fresh run would stop at 2 x 2 = 4).
    assert resumed["epochs"] == 2 and resumed["steps"] == 6


def test_unlabelled_bank_turns_the_monitor_off_instead_of_failing(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    summary = run(make_cfg("dataset.bank_split=unlabeled", "trainer.max_epochs=1"))
    assert summary["steps"] == 4 and "knn" not in summary
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
