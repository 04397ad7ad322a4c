"""scripts/bench.py on a tiny config: every part runs, and lightly's rows are skipped, and said
to be skipped, when lightly cannot be imported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

# The synthetic dataset and a narrow backbone: each fit takes well under a second.
TINY = [
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.batch_size=16",
    "dataset.loader.num_samples=64",
    "dataset.eval_batch_size=64",
    "backbone.widths=[8,16]",  # from 8 channels: channels-last applies (see test_speed_options)
    "backbone.blocks=[1,1]",
    "model.queue_size=64",
    "model.bn_splits=2",
    "head.out_dim=8",
    "logger=csv",
]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module, with lightly made unimportable."""
    monkeypatch.setitem(sys.modules, "lightly", None)  # `import lightly` raises ImportError
    spec = importlib.util.spec_from_file_location("mocoq_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "mocoq_bench", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_tiny_run_skips_lightly(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = bench.Options(
        precisions=["auto"],  # the mocoq-train default: no separate "defaults" fit
        overrides=TINY,
        steps=1,
        repeats=2,
        fit_warmup=1,
        fit_steps=2,
        knn=True,
        run_dir=tmp_path,
    )
    results = bench.run_benchmark(options)
    printed = capsys.readouterr().out
    assert "skipped: lightly is not installed" in printed

    (step,) = results["steps"]
    assert set(step["seconds_per_step"]) == {"supervised", "floor", "mocoq"}  # no lightly arm
    assert [len(v) for v in step["seconds_per_step_all"].values()] == [2, 2, 2]
    assert step["step_ratio"] > 0 and step["batch_size"] == 16 and step["image"] == [3, 16]
    assert step["measured_floor"] > 0 and step["mocoq_over_floor"] > 0
    assert "mocoq_over_lightly" not in step

    fits = results["end_to_end"]
    assert not any(name.startswith("lightly") for name in fits)
    assert "lightly" not in results["defaults"]
    assert "mocoq kNN on" in fits and fits["mocoq kNN on"]["knn_seconds"] > 0
    for fit in fits.values():
        assert fit["images_per_s"] > 0 and fit["end_to_end_over_step"] > 0
    knn = results["knn"]
    assert knn["steps_per_epoch"] == 64 // 16
    assert 0 < knn["share_of_epoch_with_knn"] < 1

    table = bench.format_table({**results, "command": "bench.py --tiny"})
    assert "command : bench.py --tiny" in table
    assert "skipped: lightly is not installed" in table
    assert results["machine"]["lightly"] is None
    json.dumps(results)  # what --out writes


def test_bench_parse_args_and_precision(bench: ModuleType) -> None:
    options, out = bench.parse_args(["--quick", "--precision", "fp32", "bf16", "--out", "x.json"])
    assert options.precisions == ["fp32", "bf16"] and out == Path("x.json")
    assert (options.steps, options.repeats, options.knn) == (2, 2, False)
    assert bench.resolve_precision("auto") in bench.PRECISIONS
    assert bench.precision_overrides("fp32+channels_last") == [
        "trainer.precision=32-true",
        "model.channels_last=true",
    ]
    with pytest.raises(ValueError, match="--precision"):
        bench.resolve_precision("fp8")
