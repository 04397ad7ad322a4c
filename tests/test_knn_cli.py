"""mocoq-knn: the grid reproduces the training monitor, reuses one similarity pass, and fails
clearly on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from mocoq.eval.checkpoint import evaluation_datamodule, load_encoder
from mocoq.eval.features import embed, knn_evaluate
from mocoq.eval.knn_cli import knn_grid, run_knn
from mocoq.export import export_backbone
from mocoq.train import CONFIG_DIR, ConfigError, run

from conftest import TINY

Run = tuple[Path, dict[str, Any], DictConfig]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny training run whose kNN monitor used k=20, T=0.07 (fp32, as the offline tool)."""
    run_dir = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                *TINY,
                f"run_dir={run_dir}",
                "trainer.precision=32-true",
                "trainer.limit_train_batches=3",
                "callbacks.knn.k=20",
                "callbacks.knn.temperature=0.07",
            ],
        )
    summary = run(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir, summary, cfg


def knn_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="knn", overrides=list(overrides))


def entry(report: dict[str, Any], features: str, k: int, temperature: float) -> dict[str, Any]:
    return next(
        r
        for r in report["results"]
        if (r["features"], r["k"], r["temperature"]) == (features, k, temperature)
    )


def test_grid_entry_at_the_monitors_k_and_t_reproduces_the_monitor(
    trained_run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, summary, _ = trained_run
    report = run_knn(knn_cfg(f"checkpoint={run_dir}", f"output_dir={tmp_path}"))
    monitor = summary["knn"]
    offline = entry(report, "backbone", monitor["k"], monitor["temperature"])
    assert (offline["top1"], offline["top5"]) == (monitor["top1"], monitor["top5"])
    assert offline["bank_size"] == monitor["bank_size"] == 128
    assert report["step"] == summary["steps"] == 3

    # The whole grid: 5 k (200 clamped to the 128-image bank) x 4 T x 2 feature kinds.
    assert report["k"] == [10, 20, 50, 100, 128]
    assert len(report["results"]) == 5 * 4 * 2
    assert {r["features"] for r in report["results"]} == {"backbone", "head"}
    written = json.loads((tmp_path / "knn.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["best"]["top1"] == max(r["top1"] for r in written["results"])
    printed = capsys.readouterr().out
    assert "T=0.07" in printed and "k=20" in printed and "Best    : " in printed


def test_one_similarity_pass_equals_knn_evaluate_per_entry() -> None:
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 8, generator=generator), torch.randn(25, 8, generator=generator)
    bank_labels = torch.randint(0, 4, (60,), generator=generator)
    bank_labels[:5] = -1  # unlabelled items are dropped from the bank
    query_labels = torch.randint(0, 4, (25,), generator=generator)
    ks, temperatures = [1, 7, 55, 300], [0.05, 0.5]
    grid = knn_grid(bank, bank_labels, queries, query_labels, ks, temperatures, chunk_size=10)
    expected = [
        knn_evaluate(bank, bank_labels, queries, query_labels, k, t)
        for k in ks
        for t in temperatures
    ]
    assert grid == expected
    assert grid[-1].k == 55  # 300 clamped to the 55 labelled bank items


def test_dataset_changes_and_exports(trained_run: Run, tmp_path: Path) -> None:
    run_dir, _, _ = trained_run
    common = [f"output_dir={tmp_path}", "k=[5]", "temperature=[0.1]"]
    report = run_knn(knn_cfg(f"checkpoint={run_dir}", "+dataset.val_split=train", *common))
    assert report["dataset"]["query_split"] == "train"
    assert entry(report, "backbone", 5, 0.1)["top1"] > 0.5  # queries are bank items

    weights, _ = export_backbone(load_encoder(run_dir), tmp_path / "backbone.pt")
    exported = run_knn(knn_cfg(f"checkpoint={weights}", *common))
    from_checkpoint = run_knn(knn_cfg(f"checkpoint={run_dir}", "features=[backbone]", *common))
    assert exported["results"] == from_checkpoint["results"]  # backbone only, same numbers
    with pytest.raises(ConfigError, match=r"no projection head.*features=\[backbone\]"):
        run_knn(knn_cfg(f"checkpoint={weights}", "features=[head]", *common))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["dataset=synthetic", "dataset.channels=1", "dataset.mean=[0.5]", "dataset.std=[0.2]"],
            "trained on 3-channel images but the evaluation data has dataset.channels=1",
        ),
        (["+dataset.bank_split=null"], r"dataset.bank_split is null.*\+dataset.bank_split="),
        (["k=[0]"], r"k must be a non-empty list of positive integers"),
        (["features=[pixels]"], r"features must be among \['backbone', 'head'\]"),
        (["encoder=ema"], r"encoder must be one of \('query', 'key'\)"),
        (["precision=16"], r"precision must be one of"),
    ],
    ids=["channels", "no-bank", "bad-k", "bad-features", "bad-encoder", "bad-precision"],
)
def test_bad_options_are_clear_errors(
    trained_run: Run, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = knn_cfg(f"checkpoint={trained_run[0]}", f"output_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError, match=message):
        run_knn(cfg)


def test_cli_prints_the_table_and_reports_errors_in_one_line(
    trained_run: Run, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "mocoq.eval.knn_cli", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run(
        [*command, f"checkpoint={trained_run[0]}", "k=[5,20]", "temperature=[0.1]"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "k=20" in done.stdout and (tmp_path / "out" / "knn.json").is_file()
    failed = subprocess.run(
        [*command, f"checkpoint={tmp_path / 'missing.ckpt'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert failed.returncode == 2
    assert "mocoq-knn: error: checkpoint=" in failed.stderr and "does not exist" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_baselines_use_the_same_protocol(trained_run: Run, tmp_path: Path) -> None:
    """raw_pixels is kNN on the normalised images themselves; random_init is the run's
    backbone with fresh weights: the same bank, queries, k and T as the trained encoder."""
    run_dir, _, _ = trained_run
    common = [f"checkpoint={run_dir}", f"output_dir={tmp_path}", "k=[20]", "temperature=[0.07]"]
    pixels = run_knn(knn_cfg(*common, "baseline=raw_pixels"))
    assert pixels["baseline"] == "raw_pixels"
    assert [r["features"] for r in pixels["results"]] == ["backbone"]
    # By hand: the datamodule's clean images, flattened, through knn_evaluate.
    datamodule = evaluation_datamodule(load_encoder(run_dir), None)
    bank, bank_labels = embed(torch.nn.Flatten(), datamodule.clean_dataloader("train"))
    queries, query_labels = embed(torch.nn.Flatten(), datamodule.clean_dataloader("test"))
    expected = knn_evaluate(bank, bank_labels, queries, query_labels, 20, 0.07)
    assert pixels["results"][0]["top1"] == expected.top1
    assert bank.shape[1] == 3 * 16 * 16  # TINY: 3 x 16 x 16 images

    first = run_knn(knn_cfg(*common, "baseline=random_init"))
    again = run_knn(knn_cfg(*common, "baseline=random_init"))
    assert first["results"] == again["results"]  # seeded: the same fresh weights
    encoder = load_encoder(run_dir)
    fresh = encoder.baseline("random_init", seed=0).backbone
    assert type(fresh) is type(encoder.backbone) and not fresh.training
    trained_weights, fresh_weights = encoder.backbone.state_dict(), fresh.state_dict()
    assert trained_weights.keys() == fresh_weights.keys()
    assert not torch.equal(trained_weights["conv1.weight"], fresh_weights["conv1.weight"])
    with pytest.raises(ConfigError, match="baseline must be null, random_init or raw_pixels"):
        run_knn(knn_cfg(*common, "baseline=imagenet"))
