"""End-to-end training speed of whole recipes: pairs/s of real ``mocoq-train`` runs, arms
interleaved, medians over repeats, each arm's ratio to the first.

Each repetition trains every arm for ``--steps`` optimizer steps (budget off, so the run is the
same on any machine), with the run's data loading, augmentation, logging, checkpoints and
throughput callbacks, but without the kNN monitor and the raw-pixel report (their cost is
reported by the runs themselves as ``knn_monitor_share``) and, as in the probes, without the
embedding projector and the view-pair images (``probe.QUIET``, less its kNN setting). A pair
is one image's two views; pairs/s is ``steps x dataset.batch_size / fit_seconds``. The arms
alternate (A B, B A, ...) so a machine that slows down over the session slows every arm alike.
Run it alone: two jobs on a small machine slow each other.

Usage::

    python scripts/recipe_speed.py --steps 100 --repeats 3 \\
        --arm default "" --arm fmnist_cpu_10min "experiment=fmnist_cpu_10min"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import machine_info
from omegaconf import OmegaConf
from probe import QUIET, REPO, probe_command

NO_MONITOR = ["~callbacks.knn", "report.raw_pixel_baseline=false"]


def pairs_per_second(overrides: Sequence[str], steps: int, run_dir: Path) -> float:
    """One run of ``steps`` steps of the config ``overrides``: its pairs per second of fit."""
    quiet = [q for q in QUIET if not q.startswith("callbacks.knn.")]  # the monitor is off
    command = probe_command([*overrides, *NO_MONITOR], steps, run_dir, quiet=quiet)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return float(summary["steps"]) * int(config.dataset.batch_size) / summary["fit_seconds"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", nargs=2, action="append", required=True, metavar=("NAME", "ARGS"))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    arms = [(name, shlex.split(overrides)) for name, overrides in args.arm]
    rates: dict[str, list[float]] = {name: [] for name, _ in arms}
    with tempfile.TemporaryDirectory(prefix="mocoq-speed-") as root:
        for repeat in range(args.repeats):
            order = arms if repeat % 2 == 0 else arms[::-1]
            for name, overrides in order:
                rate = pairs_per_second(overrides, args.steps, Path(root) / f"{name}-{repeat}")
                rates[name].append(rate)
                print(f"{name} (repeat {repeat}): {rate:.1f} pairs/s", flush=True)
    first = statistics.median(rates[arms[0][0]])
    machine = machine_info()
    print(
        f"\n{machine['cpu']}, {machine['cores_usable']} cores, bf16 native: "
        f"{machine['bf16_native']}, torch {machine['torch']}, commit {machine['commit']}, "
        f"{args.steps} steps a run"
    )
    print("| Arm | Overrides | pairs/s (median) | runs | ratio to the first |")
    print("| --- | --- | --- | --- | --- |")
    for name, overrides in arms:
        median = statistics.median(rates[name])
        runs = ", ".join(f"{r:.0f}" for r in rates[name])
        print(
            f"| {name} | `{' '.join(overrides)}` | {median:.1f} | {runs} | {median / first:.2f} |"
        )
    if args.out is not None:
        results = {"machine": machine, "steps": args.steps, "pairs_per_second": rates}
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
