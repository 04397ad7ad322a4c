"""Short training probes: one ``mocoq-train`` run per line of overrides, the kNN of each at the
monitor's k and extra k (k=200 and k=20 on Fashion-MNIST) collected into one table.

How the recipes in ``conf/experiment/`` were chosen (docs/results.md lists every probe). Each
probe is a real run of the given length, sized in steps (so that it is the same run on any
machine and under any load) or by a budget (``budget.minutes=...``: then it measures what the
machine at hand buys), with the monitor evaluating only once, after the last step, on the full
protocol. Runs go alone, one after the other: two at once on a small machine slow each other.

Usage::

    python scripts/probe.py --steps 1200 --out probes.jsonl \\
        --probe base "experiment=fmnist_cpu_10min" \\
        --probe t02 "experiment=fmnist_cpu_10min model.temperature=0.2"
    python scripts/probe.py --table probes.jsonl        # the markdown table of a results file

A probe whose name is already in ``--out`` is not run again (a queue can be restarted).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUIET = [  # the probe's number is the final full-protocol kNN; nothing else costs time
    "callbacks.knn.evaluations=1",
    "~callbacks.projector",
    "~callbacks.view_pairs",
    "trainer.enable_progress_bar=false",
]


def probe_command(
    overrides: Sequence[str], steps: int | None, run_dir: Path, quiet: Sequence[str] = QUIET
) -> list[str]:
    """The ``mocoq-train`` command of one probe: ``overrides``, sized by ``steps`` when given
    (else by the overrides' own budget or epochs), writing into ``run_dir``, with ``quiet``
    (by default :data:`QUIET`: one monitor evaluation, no projector, no view pairs, no
    progress bar)."""
    sizing = []
    if steps is not None:
        sizing = ["budget.minutes=null", "trainer.max_epochs=-1", f"trainer.max_steps={steps}"]
    return [
        sys.executable,
        "-m",
        "mocoq.train",
        *overrides,
        *sizing,
        *quiet,
        f"hydra.run.dir={run_dir}",
    ]


def run_probe(name: str, overrides: Sequence[str], steps: int | None, root: Path) -> dict[str, Any]:
    """Train one probe and return its row: kNN top-1 at every k the run reports, the steps,
    epochs and fit time, and the command."""
    run_dir = root / name
    command = probe_command(overrides, steps, run_dir)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"probe {name} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    knn = [summary["knn"], *summary.get("knn_extra", [])]
    return {
        "name": name,
        "overrides": " ".join(overrides),
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "fit_seconds": summary["fit_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "budget": summary.get("budget"),
        "knn": {str(row["k"]): row["top1"] for row in knn},
        "command": shlex.join(["mocoq-train", *command[3:-1]]),
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown rows: name, change, steps (epochs), fit seconds, kNN at k=200 and k=20."""
    lines = [
        "| Probe | Overrides | Steps (epochs) | Fit (s) | kNN k=200 | kNN k=20 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        knn = row["knn"]
        lines.append(
            f"| {row['name']} | `{row['overrides']}` | {row['steps']} ({row['epochs']:.2f}) | "
            f"{row['fit_seconds']:.0f} | {knn.get('200', float('nan')):.4f} | "
            f"{knn.get('20', float('nan')):.4f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"))
    parser.add_argument("--steps", type=int, default=None, help="steps per probe (else: budget)")
    parser.add_argument("--out", type=Path, default=Path("outputs/probes/probes.jsonl"))
    parser.add_argument("--table", type=Path, default=None, help="print the table of a file")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line]))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["name"] for line in args.out.read_text().splitlines() if line}
    for name, overrides in args.probe:
        if name in done:
            print(f"{name}: already in {args.out}", flush=True)
            continue
        row = run_probe(name, shlex.split(overrides), args.steps, args.out.parent / "runs")
        with args.out.open("a") as results:
            results.write(json.dumps(row) + "\n")
        print(table([row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
