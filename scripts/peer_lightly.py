"""mocoq against lightly's MoCo on the same data, backbone, augmentation, queue, batch, epochs
and precision, both evaluated with mocoq's kNN protocol.

For each seed:

- **mocoq**: ``mocoq-train`` with the recipe (``--experiment``), ``--override``s, the seed and
  ``--epochs``; its kNN monitor is off (``~callbacks.knn``), so its fit time is training only.
  Without ``--epochs`` a recipe sized by a time budget (``budget.minutes``) runs its budget
  and lightly trains the steps it bought (equal epochs, a fraction where the budget ends
  mid-epoch); a recipe sized in epochs runs its epochs.
- **lightly**: lightly's MoCo (from PyPI) written as its example
  ``examples/pytorch_lightning/moco.py`` writes it (``MoCoProjectionHead``, ``NTXentLoss`` with a
  memory bank, ``update_momentum``, a momentum copy without gradients, plain BatchNorm, no batch
  shuffle), with lightly's ``MoCoV2Transform`` on PIL images in ``dataset.num_workers`` loader
  workers, ``pl.Trainer.fit``. Everything else is mocoq's config: the backbone (a fresh one of
  the same class and seed), head sizes, temperature, EMA momentum and its schedule, queue size,
  SGD and its learning rate (scaled to the batch), the per-step learning-rate schedule (warmup
  and cosine, ``mocoq.schedules``), batch, steps, precision and memory layout, and the
  transform's parameters (crop area, jitter strengths and probability, grayscale, blur
  probability and sigmas, flip, normalisation).

Both encoders are then evaluated by the same code (``scripts/baselines.py``'s ``knn_results``):
query backbone features of the clean bank split and the clean val split, cosine weighted kNN
for each ``--k`` at ``--temperature``. With ``--equal-time``, lightly is trained again for the
steps that fit in mocoq's fit time at its measured rate (its schedule sized for them) and
evaluated the same way: the comparison at equal wall time.

Usage::

    make peer ARGS="--experiment fmnist_cpu_30min --epochs 2 --seeds 0 1 --equal-time"
    .venv/bin/python scripts/peer_lightly.py --help

lightly is not a mocoq dependency; the dev extra (``make setup``) installs it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from mocoq.data.datasets import ArrayImageDataset
from mocoq.eval.checkpoint import load_run_config
from mocoq.eval.features import KNNResult
from mocoq.module import channels_last_unsafe_convs
from mocoq.schedules import LRSchedule, ema_momentum_at
from mocoq.train import scaled_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import clean_datamodule, compose_recipe, knn_results, load_split  # scripts/
from bench import (
    LightlyMoCo,
    PILImages,
    build_lightly,
    lightly_missing,
    machine_info,
    quiet_lightning,
)


class ScheduledLightlyMoCo(LightlyMoCo):
    """lightly's example module with the recipe's per-step learning-rate schedule and EMA
    momentum schedule (``mocoq.schedules``, set by :func:`train_lightly`), so that the two runs
    differ only in the framework."""

    lr_schedule: LRSchedule = LRSchedule(kind="cosine")
    momentum_schedule: str = "constant"
    base_momentum: float = 0.99

    def total_steps(self) -> int:
        return max(1, int(self.trainer.estimated_stepping_batches))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.momentum = ema_momentum_at(
            self.global_step, self.total_steps(), self.base_momentum, self.momentum_schedule
        )
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        total = self.total_steps()
        per_epoch = max(1, int(self.trainer.num_training_batches))
        schedule = self.lr_schedule
        scheduler = LambdaLR(optimizer, lambda step: schedule(step, total, per_epoch))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def lightly_transform(cfg: DictConfig) -> Any:
    """lightly's ``MoCoV2Transform`` with the parameters of the config's augmentation.

    Its crop is set to the recipe's (output size ``augment.view_size``, area ``crop_scale``,
    aspect range ``crop_ratio``) and, where the recipe solarizes, lightly's own
    ``RandomSolarization`` (the op of its BYOL transform) follows the blur as mocoq's does:
    ``MoCoV2Transform`` has no arguments for either. A recipe with random erasing, which
    lightly has no op for, is refused, since the two sides would not train on the same views.
    """
    from lightly.transforms.gaussian_blur import GaussianBlur
    from lightly.transforms.moco_transform import MoCoV2Transform
    from lightly.transforms.solarize import RandomSolarization
    from torchvision.transforms import v2 as T

    augment = cfg.augment
    if float(augment.get("erase_prob", 0.0)) > 0.0:
        raise SystemExit(
            "error: lightly's transforms have no random erasing; compare with augment.erase_prob=0"
        )
    brightness, contrast, saturation, hue = (float(x) for x in augment.jitter)
    view_size = augment.get("view_size") or cfg.dataset.image_size
    transform = MoCoV2Transform(
        input_size=int(view_size),
        cj_prob=float(augment.jitter_prob),
        cj_strength=1.0,
        cj_bright=brightness,
        cj_contrast=contrast,
        cj_sat=saturation,
        cj_hue=hue,
        min_scale=float(augment.crop_scale[0]),
        random_gray_scale=float(augment.grayscale_prob),
        gaussian_blur=float(augment.blur_prob),
        sigmas=(float(augment.blur_sigma[0]), float(augment.blur_sigma[1])),
        hf_prob=float(augment.flip_prob),
        vf_prob=0.0,
        rr_prob=0.0,
        normalize={"mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)},
    )
    ratio = tuple(float(x) for x in augment.get("crop_ratio", (3 / 4, 4 / 3)))
    scale = (float(augment.crop_scale[0]), float(augment.crop_scale[1]))
    solarize = float(augment.get("solarize_prob", 0.0))
    # The two views may be one object: each distinct pipeline is changed once.
    for view in {id(view): view for view in transform.transforms}.values():
        steps = view.transform.transforms
        for i, step in enumerate(steps):
            if isinstance(step, T.RandomResizedCrop):  # lightly builds torchvision's v2 crop
                steps[i] = T.RandomResizedCrop(int(view_size), scale=scale, ratio=ratio)
        if solarize > 0.0:  # on the PIL image, after the blur (mocoq's order)
            threshold = round(float(augment.solarize_threshold) * 255)
            blur = next(i for i, step in enumerate(steps) if isinstance(step, GaussianBlur))
            steps.insert(blur + 1, RandomSolarization(prob=solarize, threshold=threshold))
    return transform


def _layout(cfg: DictConfig, backbone: nn.Module) -> bool:
    """mocoq's channels-last decision for the backbone (not for layers oneDNN gets wrong)."""
    return bool(cfg.model.get("channels_last", False)) and not channels_last_unsafe_convs(backbone)


def train_lightly(
    cfg: DictConfig, epochs: int, seed: int, root: Path, max_steps: int = -1
) -> tuple[nn.Module, dict[str, Any]]:
    """lightly's MoCo trained on the config's training split for ``epochs`` (or ``max_steps``
    steps, when fewer; the schedule is sized for what is trained); its query backbone and
    timings."""
    datamodule = clean_datamodule(cfg)
    train = datamodule.split(datamodule.train_split)
    if not isinstance(train, ArrayImageDataset):
        raise SystemExit(
            "error: the peer comparison needs an in-memory dataset (Fashion-MNIST, CIFAR)"
        )
    batch = int(cfg.dataset.batch_size)
    loader = DataLoader(
        PILImages(train.images, train.targets, lightly_transform(cfg)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=int(cfg.dataset.num_workers),
        persistent_workers=int(cfg.dataset.num_workers) > 0,
    )
    lr = scaled_lr(
        float(cfg.optim.lr),
        batch,
        int(cfg.lr_scaling.reference_batch_size),
        str(cfg.lr_scaling.rule),
    )
    channels_last = _layout(cfg, instantiate(cfg.backbone))
    pl.seed_everything(seed, workers=True)  # the backbone's initial weights: the seed's
    # (the precision name only chooses a layout when none is given; the trainer sets precision)
    module = build_lightly(cfg, "fp32", channels_last, ScheduledLightlyMoCo, lr)
    assert isinstance(module, ScheduledLightlyMoCo)
    module.lr_schedule = instantiate(cfg.schedule)
    module.momentum_schedule = str(cfg.model.ema_momentum_schedule)
    module.base_momentum = float(cfg.model.ema_momentum)
    trainer = pl.Trainer(
        accelerator="cpu" if not torch.cuda.is_available() else "auto",
        devices=1,
        precision=str(cfg.trainer.precision),  # type: ignore[arg-type]
        max_epochs=epochs,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - started
    steps = int(trainer.global_step)
    done = steps / len(loader)
    info = {
        "epochs": int(done) if done.is_integer() else round(done, 2),
        "steps": steps,
        "fit_seconds": round(seconds, 1),
        "images_per_s": round(steps * batch / seconds, 1),
        "lr": lr,
        "precision": str(cfg.trainer.precision),
        "channels_last": channels_last,
        "workers": int(cfg.dataset.num_workers),
    }
    return module.backbone, info


def run_mocoq(
    experiment: str | None,
    overrides: Sequence[str],
    epochs: int | None,
    seed: int,
    run_dir: Path,
) -> tuple[nn.Module, dict[str, Any], DictConfig]:
    """``mocoq-train`` as a user runs it (kNN monitor off), for ``epochs`` or, with None, as
    the recipe sizes it (its budget, or its epochs); its trained query backbone."""
    command = [
        str(Path(sys.executable).parent / "mocoq-train"),
        *([f"experiment={experiment}"] if experiment else []),
        *overrides,
        f"seed={seed}",
        *([f"trainer.max_epochs={epochs}"] if epochs is not None else []),
        "~callbacks.knn",
        "report.raw_pixel_baseline=false",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    backbone, summary, cfg = load_mocoq_backbone(run_dir)
    steps = int(summary["steps"])
    done = float(summary["epochs"])
    info = {
        "epochs": int(done) if done.is_integer() else round(done, 2),
        "steps": steps,
        "steps_per_epoch": int(summary["steps_per_epoch"]),
        "fit_seconds": float(summary["fit_seconds"]),
        "images_per_s": round(steps * int(cfg.dataset.batch_size) / summary["fit_seconds"], 1),
        "run_dir": str(run_dir),
        "precision": str(cfg.trainer.precision),
        "budget": summary.get("budget"),
    }
    return backbone, info, cfg


def load_mocoq_backbone(run_dir: Path) -> tuple[nn.Module, dict[str, Any], DictConfig]:
    """A finished run's query backbone (from its last checkpoint), summary and config."""
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = load_run_config(run_dir / ".hydra" / "config.yaml", run_dir=run_dir)
    checkpoint = torch.load(Path(summary["checkpoint"]), map_location="cpu", weights_only=False)
    backbone: nn.Module = instantiate(cfg.backbone)  # every weight is loaded below
    prefix = "backbone."
    weights = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    backbone.load_state_dict(weights)
    return backbone, summary, cfg


Labelled = tuple[Tensor, Tensor]  # clean images (N, C, S, S) and targets (N,)


def evaluation_data(cfg: DictConfig) -> tuple[Labelled, Labelled]:
    """The clean bank split and val split of the config's dataset, loaded once for every arm."""
    datamodule = clean_datamodule(cfg)
    if datamodule.bank_split is None or datamodule.val_split is None:
        raise SystemExit("error: the config has no labelled bank_split and val_split for kNN")
    return load_split(datamodule, datamodule.bank_split), load_split(
        datamodule, datamodule.val_split
    )


def evaluate(
    backbone: nn.Module,
    cfg: DictConfig,
    data: tuple[Labelled, Labelled],
    ks: Sequence[int],
    temperature: float,
) -> list[KNNResult]:
    """mocoq's kNN protocol on ``backbone``: ``data``'s clean bank vs. its clean queries."""
    bank, queries = data
    layout = torch.channels_last if _layout(cfg, backbone) else torch.contiguous_format
    batch = int(cfg.dataset.eval_batch_size)
    return knn_results(backbone, bank, queries, ks, temperature, batch, layout)


def _top1(results: list[dict[str, Any]], k: int) -> float:
    return next(r["top1"] for r in results if r["k"] == k)


def format_report(report: dict[str, Any]) -> str:
    ks = report["k"]
    header = "| seed | arm | epochs | fit s | images/s | " + " | ".join(
        f"kNN top-1 (k={k}, T={report['temperature']})" for k in ks
    )
    lines = [header + " |", "|" + " --- |" * (5 + len(ks))]
    for row in report["runs"]:
        cells = [
            str(row["seed"]),
            row["arm"],
            str(row["epochs"]),
            f"{row['fit_seconds']:.0f}",
            f"{row['images_per_s']:.0f}",
            *(f"{_top1(row['knn'], k):.4f}" for k in ks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for arm, summary in report["summary"].items():
        means = ", ".join(f"k={k}: {summary[f'mean_top1_k{k}']:.4f}" for k in ks)
        lines.append(
            f"{arm}: mean over seeds {means}; median fit {summary['median_fit_seconds']} s"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=None, help="a recipe of conf/experiment")
    parser.add_argument("--override", action="append", default=[], help="config override")
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: as the recipe sizes it (budget)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--k", type=int, nargs="+", default=[200, 20])
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument(
        "--equal-time", action="store_true", help="also lightly for mocoq's fit time"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/peer"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    missing = lightly_missing()
    if missing:
        raise SystemExit(f"error: {missing}; run `make peer` or pip install lightly")
    quiet_lightning()
    cfg = compose_recipe(args.experiment, args.override)
    budgeted = args.epochs is None and cfg.get("budget", {}).get("minutes") is not None
    epochs = None if budgeted else args.epochs or int(cfg.trainer.max_epochs)
    data = evaluation_data(cfg)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = args.out_dir / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv[:1], *arguments]),
        "machine": machine_info(),
        "experiment": args.experiment,
        "overrides": args.override,
        "epochs": epochs,  # None: as the budget bought, per seed
        "k": args.k,
        "temperature": args.temperature,
        "runs": [],
    }

    def save() -> None:
        (out_dir / "peer.json").write_text(json.dumps(report, indent=2) + "\n")

    for seed in args.seeds:
        backbone, info, run_cfg = run_mocoq(
            args.experiment, args.override, epochs, seed, out_dir / f"mocoq_seed{seed}"
        )
        knn = evaluate(backbone, run_cfg, data, args.k, args.temperature)
        report["runs"].append(
            {"seed": seed, "arm": "mocoq", **info, "knn": [asdict(r) for r in knn]}
        )
        save()
        print(f"mocoq seed {seed}: {[round(r.top1, 4) for r in knn]} in {info['fit_seconds']} s")
        seeded = compose_recipe(args.experiment, [*args.override, f"seed={seed}"])
        # Equal epochs: the same epochs, or the steps mocoq's budget bought.
        lightly_epochs, steps = epochs or 0, -1
        if epochs is None:
            steps = int(info["steps"])
            lightly_epochs = math.ceil(steps / info["steps_per_epoch"])
        backbone, lightly_info = train_lightly(
            seeded, lightly_epochs, seed, out_dir / f"lightly_seed{seed}", steps
        )
        knn = evaluate(backbone, seeded, data, args.k, args.temperature)
        report["runs"].append(
            {"seed": seed, "arm": "lightly", **lightly_info, "knn": [asdict(r) for r in knn]}
        )
        save()
        seconds = lightly_info["fit_seconds"]
        print(f"lightly seed {seed}: {[round(r.top1, 4) for r in knn]} in {seconds} s")
        if args.equal_time:
            # The steps lightly takes in mocoq's fit time, at its own measured rate, with its
            # cosine schedule sized for them.
            per_step = lightly_info["fit_seconds"] / lightly_info["steps"]
            fitting = int(info["fit_seconds"] / per_step)
            if fitting < lightly_info["steps"]:
                timed_dir = out_dir / f"lightly_equal_time_seed{seed}"
                backbone, timed = train_lightly(seeded, lightly_epochs, seed, timed_dir, fitting)
                knn = evaluate(backbone, seeded, data, args.k, args.temperature)
                report["runs"].append(
                    {
                        "seed": seed,
                        "arm": "lightly_equal_time",
                        **timed,
                        "knn": [asdict(r) for r in knn],
                    }
                )
            else:
                done = lightly_info["steps"]
                print(f"seed {seed}: lightly is not slower: its {done} steps fit mocoq's time")
            save()
    arms = sorted({row["arm"] for row in report["runs"]})
    report["summary"] = {}
    for arm in arms:
        rows = [row for row in report["runs"] if row["arm"] == arm]
        entry: dict[str, Any] = {
            "median_fit_seconds": statistics.median(row["fit_seconds"] for row in rows)
        }
        for k in args.k:
            entry[f"mean_top1_k{k}"] = statistics.mean(_top1(row["knn"], k) for row in rows)
        report["summary"][arm] = entry
    save()
    print(format_report(report))
    print(f"\nreport: {out_dir / 'peer.json'}")


if __name__ == "__main__":
    main()
