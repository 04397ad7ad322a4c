"""Plot a mocoq run's TensorBoard scalars into one PNG.

    .venv/bin/python scripts/plot_run.py <run_dir> [--out PNG] [--title T] [--smooth 0.6]
                                         [--tags loss,knn,...] [--dpi 120]

``<run_dir>`` is a run directory (its event files are under ``<run_dir>/tensorboard/``, as
conf/logger/tensorboard.yaml writes them) or that log directory itself. Scalars are read with
TensorBoard's own ``EventAccumulator``, keeping every point. One panel per group of known tags
(``--help`` names them); a panel whose tags were never logged is skipped, so older runs, which
log fewer of them, plot too. The PNG goes to ``<run_dir>/run.png`` unless ``--out`` says
otherwise, written to a temporary file first and moved into place.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

LOG_SUBDIR = "tensorboard"  # conf/logger/tensorboard.yaml: save_dir=${run_dir}, name=tensorboard
EVENT_GLOB = "events.out.tfevents.*"
DEFAULT_SMOOTH = 0.6  # TensorBoard's default
DEFAULT_DPI = 120

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step


@dataclass(frozen=True)
class Panel:
    """One subplot: the tags drawn in it and how.

    ``tags`` are plotted (the panel exists when any of them was logged); ``extra`` are read
    for the title only. ``smooth`` draws an EMA over a faint raw line.
    """

    name: str
    title: str
    tags: tuple[str, ...]
    ylabel: str = ""
    smooth: bool = False
    extra: tuple[str, ...] = field(default_factory=tuple)


PANELS: tuple[Panel, ...] = (
    Panel("loss", "Training loss", ("train/loss",), "InfoNCE", smooth=True),
    Panel(
        "knn",
        "kNN accuracy",
        ("knn/top1", "knn/top5"),
        "accuracy",
        extra=("knn/k", "knn/temperature"),
    ),
    Panel(
        "instance",
        "Instance accuracy and logits",
        ("train/acc1", "train/pos_logit", "train/neg_logit"),
        "acc1 / cosine",
        smooth=True,
    ),
    Panel("probe", "Online linear probe", ("probe/top1", "probe/val_top1"), "top-1"),
    Panel("alignment", "Alignment", ("diag/alignment",), "E||q - k||²"),
    Panel("uniformity", "Uniformity", ("diag/uniformity",), "log E exp(-2||x - y||²)"),
    Panel("collapse", "Feature std (collapse)", ("diag/feature_std",), "std"),
    Panel("pos_top1", "Positive ranked first", ("diag/pos_top1",), "fraction"),
    Panel("queue_fill", "Queue fill", ("diag/queue_fill",), "fraction"),
    Panel("queue_age", "Queue age", ("diag/queue_age",), "steps"),
    Panel("qk_distance", "Query-key weight distance", ("diag/qk_weight_distance",), "distance"),
    Panel("throughput", "Throughput", ("throughput/images_per_s",), "images/s", smooth=True),
    Panel("time", "Time per step", ("time/data_s", "time/step_s", "time/monitor_s"), "s"),
    Panel("lr", "Learning rate", ("train/lr",), "lr"),
    Panel("ema", "EMA momentum", ("train/ema_momentum",), "momentum"),
)
PANEL_BY_NAME = {panel.name: panel for panel in PANELS}
KNOWN_TAGS = frozenset(tag for panel in PANELS for tag in panel.tags)


class PlotError(Exception):
    """A problem with the input worth one line on stderr and exit code 2."""


def panels_for(tags: Iterable[str]) -> list[str]:
    """Names of the panels, in layout order, that have at least one of ``tags`` to plot."""
    present = set(tags)
    return [panel.name for panel in PANELS if present.intersection(panel.tags)]


def find_log_dir(path: Path) -> tuple[Path, Path]:
    """``(log_dir, run_dir)`` for a run directory or its TensorBoard log directory.

    Raises PlotError when ``path`` does not exist or holds no event files.
    """
    if not path.exists():
        raise PlotError(f"no such file or directory: {path}")
    if not path.is_dir():
        raise PlotError(f"not a directory: {path} (pass the run directory or its log directory)")
    nested = path / LOG_SUBDIR
    if nested.is_dir() and any(nested.glob(EVENT_GLOB)):
        return nested, path
    if any(path.glob(EVENT_GLOB)):
        return path, path.parent if path.name == LOG_SUBDIR else path
    deeper = sorted({str(f.parent) for f in path.rglob(EVENT_GLOB)})
    hint = ""
    if deeper:
        shown = ", ".join(deeper[:3]) + (", ..." if len(deeper) > 3 else "")
        hint = f"; found some below it, pass one run: {shown}"
    raise PlotError(f"no TensorBoard event files in {path} or {nested}{hint}")


def read_scalars(log_dir: Path) -> dict[str, Series]:
    """Every scalar in ``log_dir``'s event files, by tag, as (steps, values) sorted by step.

    When a step was logged more than once (a resumed run), the last value read wins.
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep all
    accumulator.Reload()
    scalars: dict[str, Series] = {}
    for tag in accumulator.Tags().get(SCALARS, []):
        by_step = {int(event.step): float(event.value) for event in accumulator.Scalars(tag)}
        steps = sorted(by_step)
        scalars[tag] = (steps, [by_step[step] for step in steps])
    return scalars


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); ``weight`` in [0, 1).

    Non-finite values are passed through and do not enter the average.
    """
    if weight <= 0.0:
        return list(values)
    smoothed: list[float] = []
    last, count = 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1.0 - weight) * value
        count += 1
        smoothed.append(last / (1.0 - weight**count))
    return smoothed


def select_panels(requested: Sequence[str] | None, scalars: dict[str, Series]) -> list[Panel]:
    """The panels to draw: every known panel with data, or those ``requested``.

    A request is a panel name (see ``PANELS``), a tag of a known panel (selects that panel) or any
    other logged scalar tag (drawn in a panel of its own). Requested panels without data are
    skipped with a note on stderr. Raises PlotError when nothing is left to draw.
    """
    present = set(scalars)
    if requested is None:
        names = panels_for(present)
        if not names:
            found = ", ".join(sorted(present)) or "none"
            raise PlotError(
                f"none of the known scalar tags were logged (scalar tags found: {found})"
            )
        return [PANEL_BY_NAME[name] for name in names]
    chosen: list[Panel] = []
    skipped: list[str] = []
    for item in requested:
        panel = PANEL_BY_NAME.get(item)
        if panel is None:
            panel = next((p for p in PANELS if item in p.tags), None)
        if panel is None and item in present:
            panel = Panel(item, item, (item,))
        if panel is None:
            raise PlotError(
                f"unknown panel or tag {item!r} (panels: {', '.join(PANEL_BY_NAME)}; "
                f"or any logged tag)"
            )
        if not present.intersection(panel.tags):
            skipped.append(panel.name)
        elif panel not in chosen:
            chosen.append(panel)
    if not chosen:
        raise PlotError(f"none of the requested panels was logged: {', '.join(skipped)}")
    for name in skipped:
        print(f"plot_run.py: note: skipping panel {name!r}: not logged", file=sys.stderr)
    return chosen


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) for ``count`` panels: 1, 2 or 3 columns, as few rows as fit."""
    columns = 1 if count == 1 else 2 if count <= 4 else 3
    return math.ceil(count / columns), columns


def _last(scalars: dict[str, Series], tag: str) -> float | None:
    """The last logged value of ``tag``, or None."""
    series = scalars.get(tag)
    return series[1][-1] if series and series[1] else None


def panel_title(panel: Panel, scalars: dict[str, Series]) -> str:
    """The panel's title; the kNN panel names its k and temperature when they were logged."""
    if panel.name != "knn":
        return panel.title
    k, temperature = _last(scalars, "knn/k"), _last(scalars, "knn/temperature")
    details = []
    if k is not None:
        details.append(f"k={round(k)}")
    if temperature is not None:
        details.append(f"T={temperature:.3g}")
    return f"{panel.title} ({', '.join(details)})" if details else panel.title


def draw_panel(ax: Axes, panel: Panel, scalars: dict[str, Series], smooth: float) -> None:
    """Draw ``panel``'s logged tags on ``ax``."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = [tag for tag in panel.tags if tag in scalars]
    for index, tag in enumerate(drawn):
        steps, values = scalars[tag]
        color = colors[index % len(colors)]
        label = tag.split("/", 1)[-1] if len(drawn) > 1 else None
        marker = "o" if len(steps) <= 30 else None  # sparse series (evaluations): show points
        if panel.smooth and smooth > 0.0 and len(values) > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(values, smooth), color=color, linewidth=1.5, label=label)
        else:
            ax.plot(
                steps, values, color=color, linewidth=1.5, marker=marker, markersize=3, label=label
            )
        if panel.name in ("knn", "probe") and values:
            ax.annotate(
                f"{values[-1]:.3f}",
                (steps[-1], values[-1]),
                fontsize=7,
                color=color,
                textcoords="offset points",
                xytext=(-2, 4),
                ha="right",  # inside the axes, left of the last point
            )
    ax.set_title(panel_title(panel, scalars), fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if len(drawn) > 1:
        ax.legend(fontsize=7, loc="best")


def build_figure(
    panels: Sequence[Panel], scalars: dict[str, Series], title: str, smooth: float
) -> Figure:
    """A figure with one subplot per panel, laid out on a grid that fits their number."""
    rows, columns = grid_shape(len(panels))
    figure, grid = plt.subplots(
        rows, columns, figsize=(5.0 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )  # constrained, unlike tight_layout, leaves room for the suptitle
    axes = [ax for row in grid for ax in row]
    for ax, panel in zip(axes, panels, strict=False):
        draw_panel(ax, panel, scalars, smooth)
    for ax in axes[len(panels) :]:
        ax.remove()
    figure.suptitle(title, fontsize=12)
    return figure


def save_atomic(figure: Figure, out: Path, dpi: int) -> None:
    """Write ``figure`` as a PNG to ``out`` via a temporary file in the same directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png", dpi=dpi)
        os.replace(temp, out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def default_title(run_dir: Path) -> str:
    """The run directory's last two parts (Hydra's ``<date>/<time>``)."""
    return "/".join(run_dir.resolve().parts[-2:])


def _smoothing(text: str) -> float:
    """argparse type for --smooth: a float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _split_tags(values: Sequence[str] | None) -> list[str] | None:
    """--tags values, split on commas as well as spaces."""
    if values is None:
        return None
    return [item for value in values for item in value.split(",") if item]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="plot_run.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="panels: " + ", ".join(f"{p.name} ({', '.join(p.tags)})" for p in PANELS),
    )
    parser.add_argument("path", type=Path, help="run directory, or its tensorboard/ log dir")
    parser.add_argument("--out", type=Path, help="PNG to write (default: <run_dir>/run.png)")
    parser.add_argument("--title", help="figure title (default: the run directory)")
    parser.add_argument(
        "--smooth",
        type=_smoothing,
        default=DEFAULT_SMOOTH,
        help=f"EMA weight in [0, 1) for the noisy per-step panels; 0 = off "
        f"(default {DEFAULT_SMOOTH})",
    )
    parser.add_argument(
        "--tags",
        nargs="+",
        metavar="PANEL_OR_TAG",
        help="panels to draw, in order: panel names, their tags, or any logged scalar tag "
        "(comma- or space-separated; default: every panel with data)",
    )
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI, help="resolution (default 120)")
    args = parser.parse_args(argv)
    if args.dpi <= 0:
        parser.error(f"--dpi must be positive, got {args.dpi}")
    args.tags = _split_tags(args.tags)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Plot one run; 0 on success, 2 (with one line on stderr) for a bad input."""
    args = parse_args(argv)
    try:
        log_dir, run_dir = find_log_dir(args.path)
        scalars = read_scalars(log_dir)
        panels = select_panels(args.tags, scalars)
    except PlotError as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 2
    out: Path = args.out if args.out is not None else run_dir / "run.png"
    title = args.title if args.title is not None else default_title(run_dir)
    figure = build_figure(panels, scalars, title, args.smooth)
    try:
        save_atomic(figure, out, args.dpi)
    except OSError as error:
        print(f"plot_run.py: error: cannot write {out}: {error}", file=sys.stderr)
        return 2
    finally:
        plt.close(figure)
    print(f"wrote {out} ({len(panels)} panels: {', '.join(p.name for p in panels)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
