"""mocoq-linear: the probe learns what is linearly decodable, both paths run with a frozen
backbone, results reach the JSON and TensorBoard, and bad input is refused clearly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import mocoq.eval.linear as linear
from mocoq.eval.checkpoint import LoadedEncoder, load_encoder
from mocoq.eval.linear import LinearProtocol, cached_batches, run_linear, train_linear
from mocoq.train import CONFIG_DIR, ConfigError, run

from conftest import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-training run on synthetic data (10 classes) with its .hydra/config.yaml."""
    directory = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[*TINY, f"run_dir={directory}", "trainer.limit_train_batches=2"],
        )
    cfg.callbacks.knn = None
    run(cfg)
    (directory / ".hydra").mkdir()
    OmegaConf.save(cfg, directory / ".hydra" / "config.yaml")
    return directory


# 8 steps per epoch on the 128 images; their 32-d features have about unit norm (lr 3).
QUICK = ["batch_size=16", "lr=3"]


def linear_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="linear", overrides=list(overrides))


def separable(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes whose features (count, 16) are their class's direction, scaled, plus
    noise: a linear classifier must separate them."""
    labels = torch.randint(0, 4, (count,), generator=generator)
    directions = torch.eye(16)[:4] * 3.0  # (4, 16)
    features = directions[labels] + 0.5 * torch.randn(count, 16, generator=generator)
    return features.relu(), labels  # non-negative, like pooled ReLU features


def test_probe_separates_linearly_separable_features() -> None:
    generator = torch.Generator().manual_seed(0)
    train_features, train_labels = separable(512, generator)
    val_features, val_labels = separable(256, generator)
    protocol = LinearProtocol(epochs=10, batch_size=64)
    classifier, history = train_linear(
        cached_batches(train_features, train_labels, protocol.batch_size),
        val_features,
        val_labels,
        16,
        4,
        protocol,
    )
    assert history[-1]["val_top1"] > 0.95  # chance: 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [record["epoch"] for record in history] == list(range(1, 11))
    assert history[-1]["lr"] < protocol.lr  # cosine decay
    assert isinstance(classifier, nn.Linear) and classifier.weight.shape == (4, 16)


def test_schedules_follow_the_protocol() -> None:
    paper = LinearProtocol(epochs=100, lr=30.0, lr_schedule="step")
    assert paper.milestone_epochs() == (60, 80)  # the default: 60% and 80% of the epochs
    assert [paper.lr_at(e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [30, 30, 3, 3, 0.3, 0.3]
    )
    cosine = LinearProtocol(epochs=10, lr=1.0)
    assert cosine.lr_at(0) == 1.0 and cosine.lr_at(5) == pytest.approx(0.5)
    assert LinearProtocol().weight_decay == 0.0 and LinearProtocol().momentum == 0.9


def scalars(directory: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cached_probe_writes_json_tensorboard_and_classifier(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = run_linear(
        linear_cfg(f"checkpoint={run_dir}", f"output_dir={tmp_path}", *QUICK, "epochs=4")
    )
    assert report["top1"] > 0.4  # synthetic classes, a barely trained encoder: chance is 0.1
    assert report["dataset"] == {
        "train_split": "train",
        "val_split": "test",
        "num_train": 128,
        "num_val": 128,
        "num_classes": 10,
    }
    assert not report["augmentation"] and report["protocol"]["weight_decay"] == 0.0

    written = json.loads((tmp_path / "linear.json").read_text())
    assert written == json.loads(json.dumps(report))
    logged = scalars(tmp_path / "tensorboard")
    assert len(logged["linear/val_top1"]) == 4
    assert logged["linear/val_top1"][-1] == pytest.approx(report["top1"])
    assert logged["linear/val_top5"][-1] == pytest.approx(report["top5"])
    assert {"linear/train_loss", "linear/train_top1", "linear/lr"} <= logged.keys()

    classifier = nn.Linear(report["feature_dim"], 10)
    classifier.load_state_dict(torch.load(tmp_path / "linear_classifier.pt", weights_only=True))
    assert "val top-1" in capsys.readouterr().out


def test_augmented_probe_keeps_the_backbone_frozen(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[LoadedEncoder] = []

    def keep(*args: Any, **kwargs: Any) -> LoadedEncoder:
        loaded.append(load_encoder(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(linear, "load_encoder", keep)
    cfg = linear_cfg(
        f"checkpoint={run_dir}",
        f"output_dir={tmp_path}",
        "augmentation=true",
        "epochs=5",
        *QUICK,
        "crop_scale=[0.5,1.0]",
    )
    report = run_linear(cfg)
    assert report["augmentation"] and len(report["history"]) == 5
    assert math.isfinite(report["history"][-1]["train_loss"])
    assert report["top1"] > 0.25  # chance: 0.1
    trained = loaded[0].backbone
    assert not trained.training  # BatchNorm in eval mode: running statistics untouched
    assert all(p.grad is None and not p.requires_grad for p in trained.parameters())
    fresh = load_encoder(run_dir).backbone.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in trained.state_dict().items())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["epochs=0"], "epochs must be positive, got 0"),
        (["lr_schedule=linear"], r"lr_schedule must be one of \('cosine', 'step'\)"),
        (["lr_schedule=step", "epochs=10", "milestones=[60,80]"], "milestones .* epochs=10"),
        (["lr=-1"], "lr must be positive"),
        (["encoder=ema"], "encoder must be one of"),
        (["train_split=unlabeled"], r"'unlabeled' split has no labels: set train_split"),
        (["lr=1e38", "epochs=1", "batch_size=16"], r"loss is not finite in epoch 1: lower lr"),
        (["augmentation=true", "crop_scale=[0,1]"], "crop_scale must be"),
        (["config=/no/such.yaml"], r"config=/no/such\.yaml does not exist"),
    ],
    ids=[
        "epochs",
        "schedule",
        "milestones",
        "lr",
        "encoder",
        "unlabelled",
        "diverges",
        "scale",
        "config",
    ],
)
def test_bad_inputs_are_clear_errors(
    run_dir: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = linear_cfg(f"checkpoint={run_dir}", f"output_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError, match=message) as error:
        run_linear(cfg)
    assert "\n" not in str(error.value)


def test_cli_runs_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mocoq.eval.linear",
            f"checkpoint={run_dir}",
            "epochs=2",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "val top-1" in done.stdout
    assert (tmp_path / "out" / "linear.json").is_file()
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_baselines_run_the_same_protocol(run_dir: Path, tmp_path: Path) -> None:
    common = [f"checkpoint={run_dir}", f"output_dir={tmp_path}", *QUICK, "epochs=2"]
    pixels = run_linear(linear_cfg(*common, "baseline=raw_pixels"))
    assert pixels["baseline"] == "raw_pixels" and pixels["feature_dim"] == 3 * 16 * 16
    fresh = run_linear(linear_cfg(*common, "baseline=random_init"))
    trained = run_linear(linear_cfg(*common))
    assert fresh["baseline"] == "random_init" and trained["baseline"] is None
    assert fresh["feature_dim"] == trained["feature_dim"]
