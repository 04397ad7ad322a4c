"""scripts/baselines.py and scripts/peer_lightly.py on tiny synthetic configs: what they compute
is what they say (the raw-pixel kNN is the protocol's, the supervised baseline learns, the crops
are padded shifts and flips, the peer's transform and schedule are the config's), and both write
their reports."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from mocoq.eval.features import flatten_pixels, knn_evaluate

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY = [
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.channels=3",
    "dataset.batch_size=16",
    "dataset.loader.num_samples=256",
    "dataset.eval_batch_size=64",
    "dataset.num_workers=0",
    "backbone.widths=[8,16]",
    "backbone.blocks=[1,1]",
    "model.queue_size=64",
    "model.bn_splits=2",
    "head.out_dim=8",
    "logger=csv",
    "lr_scaling.reference_batch_size=16",
    "callbacks.knn.k=5",
]


def _script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"mocoq_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"mocoq_{name}", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def baselines(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return _script("baselines", monkeypatch)


def test_random_crops_are_padded_shifts_and_flips(baselines: ModuleType) -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    padded = F.pad(images, (2, 2, 2, 2))
    crops = baselines.random_crops(images, 2, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape
    seen_flip = seen_plain = False
    for n in range(200):
        crops = baselines.random_crops(images, 2, torch.Generator().manual_seed(n))
        for i in range(2):
            windows = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
            plain = any(torch.equal(crops[i], w) for w in windows)
            flipped = any(torch.equal(crops[i], w.flip(-1)) for w in windows)
            assert plain or flipped  # every crop is a window of the padded image, maybe mirrored
            seen_plain |= plain
            seen_flip |= flipped and not plain
        if seen_flip and seen_plain:
            break
    assert seen_flip and seen_plain


def test_baselines_report_the_protocols_numbers_and_the_supervised_ceiling(
    baselines: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "baselines.json"
    overrides = [arg for o in TINY for arg in ("--override", o)]
    baselines.main([*overrides, "--k", "5", "20", "--epochs", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["command"].endswith(f"--out {out}") and report["machine"]["torch"]
    assert report["bank_size"] == report["num_queries"] == 256

    # The raw-pixel rows are the protocol's kNN on the flattened clean images.
    cfg = baselines.compose_recipe(None, TINY)
    datamodule = baselines.clean_datamodule(cfg)
    bank = baselines.load_split(datamodule, "train")
    queries = baselines.load_split(datamodule, "test")
    for row, k in zip(report["raw_pixels"], (5, 20), strict=True):
        expected = knn_evaluate(
            flatten_pixels(bank[0]), bank[1], flatten_pixels(queries[0]), queries[1], k, 0.1
        )
        assert row["top1"] == pytest.approx(expected.top1) and row["k"] == k

    supervised = report["supervised"]
    assert supervised["epochs"] == 8 and supervised["steps"] == 8 * (256 // 16)
    # Smooth class prototypes plus noise: labels make the backbone far better than chance (0.1).
    assert supervised["test_top1"] > 0.6
    assert [r["k"] for r in supervised["knn"]] == [5, 20]
    assert all(0.0 <= r["top1"] <= 1.0 for r in report["random_init"])


def test_baselines_refuse_bad_arguments(baselines: ModuleType, tmp_path: Path) -> None:
    overrides = [arg for o in TINY for arg in ("--override", o)]
    with pytest.raises(SystemExit, match="--k and --epochs must be positive"):
        baselines.main([*overrides, "--k", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_peer_transform_and_schedule_are_the_configs(
    baselines: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lightly", reason="lightly is in the dev extra (pip install -e .[dev])")
    peer = _script("peer_lightly", monkeypatch)
    cfg = baselines.compose_recipe(
        None, [*TINY, "augment.crop_scale=[0.3,1.0]", "augment.blur_prob=0.0"]
    )
    transform = peer.lightly_transform(cfg).transforms[0].transform.transforms
    names = [type(t).__name__ for t in transform]
    crop = transform[names.index("RandomResizedCrop")]
    assert crop.size == (16, 16) and crop.scale == (0.3, 1.0)
    jitter = transform[names.index("RandomApply")]
    assert jitter.p == cfg.augment.jitter_prob
    assert jitter.transforms[0].brightness == (0.6, 1.4)  # 0.4 around 1, as mocoq's
    blur = transform[names.index("GaussianBlur")]
    assert blur.prob == 0.0
    normalize = transform[names.index("Normalize")]
    assert list(normalize.mean) == list(cfg.dataset.mean)
    # the recipe's view size, aspect range and solarize, on both views
    overrides = [
        "augment.view_size=12",
        "augment.crop_ratio=[0.9,1.1]",
        "augment.solarize_prob=0.2",
    ]
    cfg = baselines.compose_recipe(None, [*TINY, *overrides])
    for view in peer.lightly_transform(cfg).transforms:
        steps = view.transform.transforms
        names = [type(t).__name__ for t in steps]
        assert names.count("RandomResizedCrop") == 1 and names.count("RandomSolarization") == 1
        crop = steps[names.index("RandomResizedCrop")]
        assert crop.size == (12, 12) and crop.ratio == (0.9, 1.1)
        solarize = steps[names.index("RandomSolarization")]
        assert names.index("RandomSolarization") == names.index("GaussianBlur") + 1
        assert (solarize.prob, solarize.threshold) == (0.2, 128)
    # erasing, which lightly has no op for, is refused, naming the key
    cfg = baselines.compose_recipe(None, [*TINY, "augment.erase_prob=0.5"])
    with pytest.raises(SystemExit, match=r"augment\.erase_prob=0"):
        peer.lightly_transform(cfg)


def test_peer_runs_both_arms_and_evaluates_them_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lightly", reason="lightly is in the dev extra (pip install -e .[dev])")
    peer = _script("peer_lightly", monkeypatch)
    overrides = [arg for o in TINY for arg in ("--override", o)]
    peer.main(
        [
            *overrides,
            "--override",
            "trainer.limit_train_batches=4",
            "--epochs",
            "2",
            "--seeds",
            "0",
            "--k",
            "5",
            "--equal-time",
            "--out-dir",
            str(tmp_path),
        ]
    )
    (report_file,) = tmp_path.glob("*/peer.json")
    report = json.loads(report_file.read_text())
    arms = {row["arm"]: row for row in report["runs"]}
    printed = capsys.readouterr().out
    # At equal wall time lightly trains the steps that fit in mocoq's fit time, fewer than its
    # equal-epoch run took, unless it was the faster of the two.
    if "lightly_equal_time" in arms:
        timed = arms.pop("lightly_equal_time")
        assert 0 < timed["steps"] < arms["lightly"]["steps"]
        assert timed["epochs"] == pytest.approx(timed["steps"] / (256 // 16), abs=0.01)
    else:
        assert "lightly is not slower" in printed
    assert set(arms) == {"mocoq", "lightly"}
    assert arms["mocoq"]["epochs"] == 2 and arms["mocoq"]["steps"] == 8
    assert arms["lightly"]["epochs"] == 2 and arms["lightly"]["steps"] == 2 * (256 // 16)
    for row in arms.values():
        (result,) = row["knn"]
        assert result["k"] == 5 and result["bank_size"] == 256 and 0 <= result["top1"] <= 1
    # The mocoq arm's backbone is the checkpoint's: evaluating the checkpoint again agrees.
    run_dir = Path(arms["mocoq"]["run_dir"])
    backbone, _, run_cfg = peer.load_mocoq_backbone(run_dir)
    (again,) = peer.evaluate(backbone, run_cfg, peer.evaluation_data(run_cfg), [5], 0.1)
    assert again.top1 == arms["mocoq"]["knn"][0]["top1"]
    assert "| 0 | mocoq | 2 |" in printed and "| 0 | lightly | 2 |" in printed


def test_peer_of_a_budgeted_recipe_gives_lightly_the_steps_the_budget_bought(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("lightly", reason="lightly is in the dev extra (pip install -e .[dev])")
    peer = _script("peer_lightly", monkeypatch)
    tests = Path(__file__).resolve().parent  # faults.FakeClock, for mocoq-train's process
    monkeypatch.setenv("PYTHONPATH", f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # 0.2 min at 0.5 s a step on the fake clock: 24 steps, 1.5 epochs of 16.
    budget = [
        "budget.minutes=0.2",
        "budget.skip_steps=2",
        "budget.timed_steps=4",
        "budget.reserve=0",
        "+callbacks.clock._target_=faults.FakeClock",
        "+callbacks.clock.seconds_per_step=0.5",
    ]
    overrides = [arg for o in [*TINY, *budget] for arg in ("--override", o)]
    peer.main([*overrides, "--seeds", "0", "--k", "5", "--out-dir", str(tmp_path)])
    (report_file,) = tmp_path.glob("*/peer.json")
    arms = {row["arm"]: row for row in json.loads(report_file.read_text())["runs"]}
    assert arms["mocoq"]["budget"]["total_steps"] == arms["mocoq"]["steps"] == 24
    assert arms["mocoq"]["epochs"] == 1.5
    assert arms["lightly"]["steps"] == 24 and arms["lightly"]["epochs"] == 1.5


def test_probe_and_recipe_speed_run_real_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = _script("probe", monkeypatch)
    monkeypatch.setitem(sys.modules, "probe", probe)  # recipe_speed imports it by name
    speed = _script("recipe_speed", monkeypatch)
    out = tmp_path / "probes.jsonl"
    args = ["--steps", "3", "--out", str(out), "--probe", "tiny", " ".join(TINY)]
    probe.main(args)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["steps"] == 3 and row["budget"] is None
    assert set(row["knn"]) == {"5", "20"}  # the monitor's k and its extra k
    assert "trainer.max_steps=3" in row["command"] and "budget.minutes=null" in row["command"]
    probe.main(args)  # a probe already in the file is not run again
    assert len(out.read_text().splitlines()) == 1
    assert "already in" in capsys.readouterr().out

    rate = speed.pairs_per_second(TINY, 4, tmp_path / "speed")
    summary = json.loads((tmp_path / "speed" / "summary.json").read_text())
    assert summary["steps"] == 4 and "knn" not in summary  # trained without the monitor
    assert rate == pytest.approx(4 * 16 / summary["fit_seconds"])
