"""scripts/plot_run.py on synthetic TensorBoard event files: panels follow the logged tags,
the PNG is a real PNG of the expected size, and bad inputs exit 2 with one clear line."""

from __future__ import annotations

import importlib.util
import math
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest
from torch.utils.tensorboard import SummaryWriter

pytest.importorskip("matplotlib")  # the dev extra installs it

PLOT_RUN = Path(__file__).resolve().parent.parent / "scripts" / "plot_run.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = range(0, 200, 10)

# A subset of the known tags (no probe/, queue or lr panels), plus tags no panel draws.
LOGGED: dict[str, float] = {
    "train/loss": 7.0,
    "train/acc1": 0.1,
    "knn/top1": 0.5,
    "knn/top5": 0.8,
    "knn/k": 200.0,
    "knn/temperature": 0.1,
    "diag/uniformity": -2.0,
    "time/step_s": 0.05,
    "epoch": 0.0,
}
EXPECTED_PANELS = ["loss", "knn", "instance", "uniformity", "time"]
CONSTANT = {"knn/k", "knn/temperature", "epoch"}  # logged without noise


@pytest.fixture(scope="module")
def plot_run() -> Iterator[ModuleType]:
    """The script as a module (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("mocoq_plot_run", PLOT_RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mocoq_plot_run"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("mocoq_plot_run", None)


def write_events(log_dir: Path, tags: Mapping[str, float], steps: Sequence[int] = STEPS) -> None:
    """One event file in ``log_dir`` with each tag logged at every step (noisy but for
    ``CONSTANT``)."""
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for step in steps:
            for tag, base in tags.items():
                noise = 0.0 if tag in CONSTANT else 0.1 * math.sin(step)
                writer.add_scalar(tag, base * (1.0 + noise), global_step=step)
    finally:
        writer.close()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; asserts the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory laid out as conf/logger/tensorboard.yaml writes it."""
    run = tmp_path / "2026-01-01" / "12-00-00"
    write_events(run / "tensorboard", LOGGED)
    return run


def test_panels_for_follows_tags(plot_run: ModuleType) -> None:
    assert plot_run.panels_for(LOGGED) == EXPECTED_PANELS
    assert plot_run.panels_for(["epoch", "knn/k", "knn/temperature"]) == []  # title-only tags
    every = [tag for panel in plot_run.PANELS for tag in panel.tags]
    assert plot_run.panels_for(every) == [panel.name for panel in plot_run.PANELS]
    assert plot_run.panels_for(["train/neg_logit", "probe/top1"]) == ["instance", "probe"]


def test_plot_run_dir_default_out(
    plot_run: ModuleType, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plot_run.main([str(run_dir), "--dpi", "40"]) == 0
    out = run_dir / "run.png"
    assert out.is_file() and out.stat().st_size > 5_000
    rows, columns = plot_run.grid_shape(len(EXPECTED_PANELS))
    assert (rows, columns) == (2, 3)
    assert png_size(out) == (round(5.0 * columns * 40), round(3.4 * rows * 40))
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.png", "tensorboard"]  # no temp
    printed = capsys.readouterr().out
    assert f"{len(EXPECTED_PANELS)} panels: {', '.join(EXPECTED_PANELS)}" in printed

    scalars = plot_run.read_scalars(run_dir / "tensorboard")
    assert set(scalars) == set(LOGGED)
    steps, values = scalars["train/loss"]
    assert steps == list(STEPS) and len(values) == len(STEPS)  # size_guidance 0: nothing dropped
    knn = plot_run.PANEL_BY_NAME["knn"]
    assert plot_run.panel_title(knn, scalars) == "kNN accuracy (k=200, T=0.1)"
    assert plot_run.default_title(run_dir) == "2026-01-01/12-00-00"


def test_plot_log_dir_with_options(
    plot_run: ModuleType, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figures" / "chosen.png"
    argv = [str(run_dir / "tensorboard"), "--out", str(out), "--dpi", "30", "--smooth", "0"]
    assert plot_run.main([*argv, "--title", "t", "--tags", "knn,train/loss", "epoch"]) == 0
    assert png_size(out) == (round(5.0 * 2 * 30), round(3.4 * 2 * 30))  # 3 panels: 2 x 2
    assert "3 panels: knn, loss, epoch" in capsys.readouterr().out  # `epoch`: a panel of its own

    # A requested panel that was never logged is skipped, with a note.
    assert plot_run.main([*argv, "--tags", "probe", "loss"]) == 0
    captured = capsys.readouterr()
    assert "skipping panel 'probe'" in captured.err
    assert "1 panels: loss" in captured.out
    assert png_size(out) == (round(5.0 * 30), round(3.4 * 30))


def test_older_run_without_new_tags(plot_run: ModuleType, tmp_path: Path) -> None:
    """A run that logged only the loss still plots: one panel."""
    write_events(tmp_path / "tensorboard", {"train/loss": 7.0}, steps=[0, 1])
    assert plot_run.main([str(tmp_path), "--dpi", "30"]) == 0
    assert png_size(tmp_path / "run.png") == (150, 102)


def test_errors_exit_2(
    plot_run: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def error(argv: list[str]) -> str:
        assert plot_run.main(argv) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("plot_run.py: error: ") and "\n" not in message
        return message

    assert "no such file or directory" in error([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "no TensorBoard event files" in error([str(tmp_path / "empty")])

    write_events(tmp_path / "other" / "tensorboard", {"epoch": 0.0, "custom/x": 1.0}, [0])
    message = error([str(tmp_path / "other")])
    assert "none of the known scalar tags" in message and "custom/x, epoch" in message
    other = str(tmp_path / "other")
    assert "unknown panel or tag 'nope'" in error([other, "--tags", "nope"])
    assert "none of the requested panels was logged: knn" in error([other, "--tags", "knn"])

    # Event files only further down (a multirun sweep): named in the message.
    assert "found some below it" in error([str(tmp_path)])
    assert not list(tmp_path.rglob("*.png"))

    with pytest.raises(SystemExit) as excinfo:  # argparse: bad --smooth
        plot_run.main([str(tmp_path / "other"), "--smooth", "1.5"])
    assert excinfo.value.code == 2


def test_ema(plot_run: ModuleType) -> None:
    assert plot_run.ema([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # debiased
    assert plot_run.ema([1.0, 2.0], 0.0) == [1.0, 2.0]
    smoothed = plot_run.ema([0.0, 10.0, float("nan"), 10.0], 0.5)
    assert smoothed[0] == 0.0 and 0.0 < smoothed[1] < 10.0
    assert math.isnan(smoothed[2]) and smoothed[1] < smoothed[3] < 10.0
