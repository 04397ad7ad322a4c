"""Baselines for a mocoq run, on its split and with its kNN protocol.

Three references a pre-trained encoder's kNN accuracy is read against:

- **raw pixels**: kNN on the flattened, normalised clean images;
- **random init**: kNN on the features of the run's backbone with fresh weights (the run's seed);
- **supervised**: the same backbone trained with labels for the same number of epochs, with the
  same batch, precision and memory layout (SGD with momentum, cosine schedule, random crop with
  4-pixel padding and flips): the test top-1 of its classifier, and kNN on its features with
  the same protocol. It is the ceiling of what the backbone can do on the data in the budget.

Every kNN is the run's protocol: the bank is ``dataset.bank_split`` (clean images), the queries
``dataset.val_split``, cosine similarity, votes weighted by ``exp(cos / T)`` (``mocoq.knn``),
for each ``--k`` with ``--temperature`` (default: the run's kNN monitor's k and T).

Usage::

    .venv/bin/python scripts/baselines.py --run outputs/2026-12-03/16-00-00   # a run's config
    .venv/bin/python scripts/baselines.py --experiment fmnist_cpu_30min       # a recipe's
    .venv/bin/python scripts/baselines.py --run <dir> --k 200 20 --skip-supervised

The report is printed and written as JSON (``--out``; with ``--run`` the default is
``<run dir>/baselines.json``), with the machine and the exact command.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from mocoq.data.datamodule import MoCoDataModule
from mocoq.data.transforms import EvalTransform
from mocoq.eval.checkpoint import load_run_config
from mocoq.eval.features import KNNResult, embed, flatten_pixels, knn_evaluate
from mocoq.module import channels_last_unsafe_convs
from mocoq.schedules import cosine
from mocoq.train import scaled_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compose_config, machine_info  # scripts/ is not a package

# Above this many bytes of float32 training images the supervised baseline refuses to hold the
# split in memory (it is written for the datasets a kNN bank can hold: Fashion-MNIST, CIFAR).
MAX_IN_MEMORY_BYTES = 8 * 1024**3


def compose_recipe(experiment: str | None, overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` with ``experiment=`` and overrides, as ``mocoq-train`` composes it."""
    choice = [f"experiment={experiment}"] if experiment else []
    return compose_config(Path("."), [*choice, *overrides])


def clean_datamodule(cfg: DictConfig) -> MoCoDataModule:
    """The run's data module with clean (evaluation) transforms only."""
    datamodule: MoCoDataModule = instantiate(cfg.dataset, _partial_=True)(
        augment=functools.partial(EvalTransform), seed=int(cfg.seed)
    )
    return datamodule


def load_split(datamodule: MoCoDataModule, split: str) -> tuple[Tensor, Tensor]:
    """All clean images (N, C, S, S) float32 and targets (N,) of ``split``, in memory."""
    dataset = datamodule.split(split)
    pixels = datamodule.channels * datamodule.image_size**2
    size = len(dataset) * pixels * 4  # type: ignore[arg-type]
    if size > MAX_IN_MEMORY_BYTES:
        raise SystemExit(
            f"error: the {split} split is {size / 1024**3:.1f} GiB as float32 images: the "
            "baselines and the peer comparison hold the bank and query splits in memory, for "
            "datasets of Fashion-MNIST's and CIFAR's size; use mocoq-knn baseline=... for it"
        )
    images, targets = [], []
    for batch_images, batch_targets in datamodule.clean_dataloader(split):
        images.append(batch_images)
        targets.append(batch_targets)
    return torch.cat(images), torch.cat(targets)


def knn_results(
    encoder: Any,
    bank: tuple[Tensor, Tensor],
    queries: tuple[Tensor, Tensor],
    ks: Sequence[int],
    temperature: float,
    batch_size: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[KNNResult]:
    """Weighted kNN of ``encoder``'s features of the queries against the bank, for each k."""

    def batches(images: Tensor, targets: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].contiguous(memory_format=memory_format)
            yield chunk, targets[start : start + batch_size]

    bank_features, bank_labels = embed(encoder, batches(*bank))
    query_features, query_labels = embed(encoder, batches(*queries))
    return [
        knn_evaluate(bank_features, bank_labels, query_features, query_labels, k, temperature)
        for k in ks
    ]


def random_crops(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """A random ``S x S`` crop of each zero-padded image and a random horizontal flip.

    Args:
        images: (N, C, S, S).
    Returns:
        (N, C, S, S): image n is padded by ``padding`` on every side, cropped at its own offset
        and mirrored with probability 1/2.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)).to(images.device)  # (N, S)
    cols = (dx[:, None] + torch.arange(width)).to(images.device)  # (N, S)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, S, S, C)
    return crops.permute(0, 3, 1, 2).contiguous()


def train_supervised(
    cfg: DictConfig,
    train: tuple[Tensor, Tensor],
    epochs: int,
    lr: float,
    num_classes: int,
    log_every: int = 50,
) -> tuple[nn.Module, nn.Linear, dict[str, Any]]:
    """The run's backbone and a linear classifier trained with labels.

    SGD (momentum 0.9, weight decay 5e-4) with ``lr`` for ``lr_scaling.reference_batch_size``
    images scaled linearly to the batch (as ``mocoq-train`` scales), a per-step cosine schedule
    to 0, the run's batch size, precision and memory layout;
    the last incomplete batch of an epoch is dropped, as in pre-training.
    """
    torch.manual_seed(int(cfg.seed))
    backbone: nn.Module = instantiate(cfg.backbone)
    classifier = nn.Linear(int(backbone.out_dim), num_classes)  # type: ignore[arg-type]
    channels_last = bool(cfg.model.get("channels_last", False))
    if channels_last and channels_last_unsafe_convs(backbone):
        channels_last = False  # as mocoq-train: oneDNN gets such layers wrong in that layout
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=memory_format)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    batch_size = int(cfg.dataset.batch_size)
    scaling = cfg.get("lr_scaling") or {}
    reference = int(scaling.get("reference_batch_size", 256))
    scaled = scaled_lr(lr, batch_size, reference, str(scaling.get("rule", "linear")))
    parameters = [*backbone.parameters(), *classifier.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=scaled, momentum=0.9, weight_decay=5e-4)
    images, targets = train
    steps_per_epoch = images.shape[0] // batch_size
    total = max(1, steps_per_epoch * epochs)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    backbone.train()
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for index in range(steps_per_epoch):
            chosen = order[index * batch_size : (index + 1) * batch_size]
            batch = random_crops(images[chosen], 4, generator).contiguous(
                memory_format=memory_format
            )
            for group in optimizer.param_groups:
                group["lr"] = cosine(step, total, scaled, 0.0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(classifier(backbone(batch)), targets[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % log_every == 0:
                print(
                    f"  supervised epoch {epoch + 1}/{epochs} step {step}/{total} "
                    f"loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    info = {
        "epochs": epochs,
        "steps": step,
        "batch_size": batch_size,
        "lr": scaled,
        "seconds": round(time.perf_counter() - started, 1),
        "precision": "bf16-mixed" if bf16 else "32-true",
        "channels_last": channels_last,
    }
    return backbone, classifier, info


@torch.no_grad()
def classifier_top1(
    backbone: nn.Module, classifier: nn.Linear, data: tuple[Tensor, Tensor], batch_size: int
) -> float:
    """Top-1 of ``classifier(backbone(x))`` on clean images, eval mode."""
    backbone.eval()
    images, targets = data
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(backbone(images[start : start + batch_size]).float())
        correct += int((logits.argmax(1) == targets[start : start + batch_size]).sum())
    return correct / images.shape[0]


def run_baselines(
    cfg: DictConfig,
    ks: Sequence[int],
    temperature: float,
    epochs: int,
    supervised: bool,
    supervised_lr: float,
) -> dict[str, Any]:
    """Every baseline of the config's data and backbone; the report as a dict."""
    datamodule = clean_datamodule(cfg)
    bank_split, val_split = datamodule.bank_split, datamodule.val_split
    if bank_split is None or val_split is None:
        raise SystemExit("error: the config has no labelled bank_split and val_split for kNN")
    bank = load_split(datamodule, bank_split)
    queries = load_split(datamodule, val_split)
    batch = int(cfg.dataset.eval_batch_size)
    report: dict[str, Any] = {
        "dataset": {"name": str(cfg.dataset.loader._target_), "bank": bank_split},
        "queries": val_split,
        "bank_size": int(bank[0].shape[0]),
        "num_queries": int(queries[0].shape[0]),
    }
    started = time.perf_counter()
    report["raw_pixels"] = [
        asdict(r) for r in knn_results(flatten_pixels, bank, queries, ks, temperature, batch)
    ]
    print(f"raw pixels done ({time.perf_counter() - started:.0f} s)", flush=True)
    torch.manual_seed(int(cfg.seed))
    random_backbone: nn.Module = instantiate(cfg.backbone)
    report["random_init"] = [
        asdict(r) for r in knn_results(random_backbone, bank, queries, ks, temperature, batch)
    ]
    print(f"random init done ({time.perf_counter() - started:.0f} s)", flush=True)
    if supervised:
        num_classes = int(torch.cat([bank[1], queries[1]]).max()) + 1
        backbone, classifier, info = train_supervised(cfg, bank, epochs, supervised_lr, num_classes)
        info["test_top1"] = classifier_top1(backbone, classifier, queries, batch)
        info["knn"] = [
            asdict(r) for r in knn_results(backbone, bank, queries, ks, temperature, batch)
        ]
        report["supervised"] = info
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"Baselines on '{report['queries']}' ({report['num_queries']} queries), bank "
        f"'{report['dataset']['bank']}' ({report['bank_size']} images), cosine kNN:"
    ]
    for key, label in (("raw_pixels", "raw pixels"), ("random_init", "random init")):
        for result in report[key]:
            lines.append(
                f"  {label:<22} kNN top-1 {result['top1']:.4f} (k={result['k']}, "
                f"T={result['temperature']})"
            )
    if "supervised" in report:
        info = report["supervised"]
        for result in info["knn"]:
            lines.append(
                f"  {'supervised backbone':<22} kNN top-1 {result['top1']:.4f} "
                f"(k={result['k']}, T={result['temperature']})"
            )
        lines.append(
            f"  {'supervised classifier':<22} top-1 {info['test_top1']:.4f} "
            f"({info['epochs']} epochs, {info['seconds']:.0f} s, {info['precision']})"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", type=Path, help="a mocoq run directory (its .hydra/config.yaml)")
    source.add_argument("--experiment", help="a recipe of conf/experiment (default: none)")
    parser.add_argument(
        "--override", action="append", default=[], help="a config override (repeatable)"
    )
    parser.add_argument("--k", type=int, nargs="+", default=None, help="default: the monitor's")
    parser.add_argument("--temperature", type=float, default=None, help="default: the monitor's")
    parser.add_argument(
        "--epochs", type=int, default=None, help="supervised epochs (default: the run's)"
    )
    parser.add_argument(
        "--supervised-lr",
        type=float,
        default=0.1,
        help="for lr_scaling.reference_batch_size images (256 unless the config says otherwise)",
    )
    parser.add_argument("--skip-supervised", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    run_summary: dict[str, Any] = {}
    if args.run is not None:
        cfg = load_run_config(args.run / ".hydra" / "config.yaml", run_dir=args.run)
        summary_file = args.run / "summary.json"
        if summary_file.is_file():
            run_summary = json.loads(summary_file.read_text())
    else:
        cfg = compose_recipe(args.experiment, args.override)
    monitor = (cfg.get("callbacks") or {}).get("knn") or {}
    ks = args.k or [int(monitor.get("k", 200))]
    temperature = args.temperature or float(monitor.get("temperature", 0.1))
    epochs = args.epochs or int(run_summary.get("epochs") or cfg.trainer.max_epochs)
    if min(ks) < 1 or temperature <= 0 or epochs < 1:
        raise SystemExit("error: --k and --epochs must be positive and --temperature above 0")
    out = args.out or (args.run / "baselines.json" if args.run else Path("baselines.json"))
    report = {
        "command": shlex.join([sys.executable, *sys.argv[:1], *arguments]),
        "machine": machine_info(),
        "run": str(args.run) if args.run else None,
        "run_fit_seconds": run_summary.get("fit_seconds"),
        **run_baselines(cfg, ks, temperature, epochs, not args.skip_supervised, args.supervised_lr),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
