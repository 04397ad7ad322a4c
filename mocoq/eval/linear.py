"""``mocoq-linear``: linear evaluation of a frozen pre-trained backbone (MoCo's protocol).

Usage::

    mocoq-linear checkpoint=outputs/2026-01-05/10-00-00     # small defaults (Fashion-MNIST size)
    mocoq-linear checkpoint=backbone.pt dataset=cifar10 dataset.root=~/data/cifar10
    # MoCo's ImageNet protocol (He et al. 2020, Chen et al. 2020):
    mocoq-linear checkpoint=run augmentation=true epochs=100 lr=30 lr_schedule=step \\
        milestones=[60,80]

A linear classifier (weights N(0, 0.01), zero bias) is trained on the backbone's features of the
labelled training split (``dataset.bank_split`` unless ``train_split`` is given) with SGD,
momentum 0.9 and no weight decay, under a cosine or step schedule of the learning rate (set once
per epoch), and scored (top-1 / top-5) on the clean validation split after every epoch. The
backbone is frozen and stays in eval mode: its BatchNorm uses the running statistics of
pre-training, as in MoCo's ``main_lincls.py``.

Two paths:

* ``augmentation=false`` (default): the train and val sets are embedded once, un-augmented,
  and the classifier trains on the cached features: each epoch costs a few milliseconds, so
  the embedding pass is nearly all of the time (the usable path on a CPU);
* ``augmentation=true``: the protocol's augmentation (RandomResizedCrop + horizontal flip)
  draws new training views every epoch, each embedded by the frozen backbone (the val set is
  still embedded once).

Writes ``<output_dir>/linear.json`` (final top-1 / top-5, the protocol, the per-epoch history),
TensorBoard scalars under ``<output_dir>/tensorboard`` (``linear/val_top1``, ``linear/val_top5``,
``linear/train_loss``, ``linear/train_top1``, ``linear/lr``) and the classifier's state dict
``<output_dir>/linear_classifier.pt``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2

from mocoq.callbacks.knn_monitor import dataset_targets
from mocoq.data.datamodule import (
    ImageDataset,
    MoCoDataModule,
    TransformedDataset,
    ignore_job_signals,
)
from mocoq.eval.checkpoint import (
    ENCODERS,
    FeatureExtractor,
    LoadedEncoder,
    autocast,
    evaluation_config,
    evaluation_datamodule,
    load_encoder,
    one_line_errors,
    require_checkpoint,
    resolve_device,
    write_atomically,
    write_json,
)
from mocoq.eval.features import embed
from mocoq.knn import topk_accuracy
from mocoq.train import CONFIG_DIR, ConfigError

SCHEDULES = ("cosine", "step")
Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]


@dataclass(frozen=True)
class LinearProtocol:
    """The classifier's training recipe.

    Args:
        epochs: passes over the training split.
        batch_size: images (features) per SGD step.
        lr: base learning rate (MoCo: 30 for ResNet-50 on ImageNet, batch 256).
        momentum: SGD momentum (0.9 in the protocol).
        weight_decay: 0 in the protocol.
        lr_schedule: ``cosine`` (to 0 over the epochs) or ``step`` (x ``gamma`` at each
            milestone).
        milestones: epochs of the step decays; None: 60% and 80% of ``epochs`` (MoCo's 60 and 80
            of 100).
        gamma: the step decay factor.
        seed: seed of the classifier's initialisation and of the training order.
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError(
                f"momentum must be in [0, 1) and weight_decay >= 0, got {self.momentum} and "
                f"{self.weight_decay}"
            )
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.lr_schedule == "step":
            if not 0 < self.gamma <= 1:
                raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
            late = [m for m in self.milestone_epochs() if not 0 < m < self.epochs]
            if late:
                raise ConfigError(
                    f"milestones {list(self.milestone_epochs())} must lie between 0 and "
                    f"epochs={self.epochs} (exclusive): change milestones or epochs"
                )

    def milestone_epochs(self) -> tuple[int, ...]:
        """The epochs at which the step schedule multiplies the learning rate by ``gamma``."""
        if self.milestones is not None:
            return tuple(sorted(self.milestones))
        return tuple(sorted({max(1, round(0.6 * self.epochs)), max(1, round(0.8 * self.epochs))}))

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based)."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        decays = sum(epoch >= milestone for milestone in self.milestone_epochs())
        return self.lr * self.gamma**decays


def new_classifier(feature_dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """A linear layer F -> C with MoCo's initialisation: weights N(0, 0.01), zero bias."""
    classifier = nn.Linear(feature_dim, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * 0.01)
        classifier.bias.zero_()
    return classifier


@torch.no_grad()
def accuracy(
    classifier: nn.Module, features: Tensor, labels: Tensor, chunk_size: int = 8192
) -> tuple[float, float]:
    """Top-1 and top-5 of ``classifier`` on features (M, F) with labels (M,)."""
    logits = torch.cat([classifier(chunk) for chunk in features.split(chunk_size)])  # (M, C)
    top1, top5 = topk_accuracy(logits.float(), labels, (1, 5))
    return top1, top5


def cached_batches(features: Tensor, labels: Tensor, batch_size: int, seed: int = 0) -> Batches:
    """Epoch -> shuffled minibatches of cached features (N, F) and labels (N,)."""
    generator = torch.Generator().manual_seed(seed)

    def epoch(_: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(features.shape[0], generator=generator).to(features.device)
        for indices in order.split(batch_size):
            yield features[indices], labels[indices]

    return epoch


def augmented_batches(
    extractor: nn.Module, loader: DataLoader[Any], device: torch.device, precision: str
) -> Batches:
    """Epoch -> minibatches of the frozen ``extractor``'s features of freshly augmented images."""

    def epoch(_: int) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in loader:
            with torch.no_grad(), autocast(device, precision):
                features = extractor(images.to(device, non_blocking=True)).float()  # (n, F)
            yield features, labels.to(device)

    return epoch


def train_linear(
    batches: Batches,
    val_features: Tensor,
    val_labels: Tensor,
    feature_dim: int,
    num_classes: int,
    protocol: LinearProtocol,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Train a linear classifier on features and score it on the val features after each epoch.

    Args:
        batches: epoch -> iterable of (features (n, F), labels (n,)); labels < 0 are skipped.
        val_features: (M, F) features of the val split, on the training device.
        val_labels: (M,) labels.
        feature_dim: F.
        num_classes: C.
        protocol: the recipe.
        on_epoch: called with each epoch's record (see Returns).

    Returns:
        The classifier and one record per epoch: ``epoch`` (1-based), ``lr``, ``train_loss``,
        ``train_top1`` (on the batches as seen during the epoch), ``val_top1``, ``val_top5``.
    """
    device = val_features.device
    classifier = new_classifier(feature_dim, num_classes, protocol.seed).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(),
        lr=protocol.lr,
        momentum=protocol.momentum,
        weight_decay=protocol.weight_decay,
    )
    history: list[dict[str, float]] = []
    for epoch in range(protocol.epochs):
        lr = protocol.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for features, labels in batches(epoch):
            labelled = labels >= 0
            features, labels = features[labelled], labels[labelled]  # (n, F), (n,)
            if labels.numel() == 0:
                continue
            logits = classifier(features)  # (n, C)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * labels.numel()
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += labels.numel()
        if seen == 0:
            raise ConfigError("the training split has no labelled images: set train_split")
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise ConfigError(
                f"the linear classifier's loss is not finite in epoch {epoch + 1}: lower lr "
                f"(now {protocol.lr:g})"
            )
        val_top1, val_top5 = accuracy(classifier, val_features, val_labels)
        record = {
            "epoch": float(epoch + 1),
            "lr": lr,
            "train_loss": train_loss,
            "train_top1": correct.item() / seen,
            "val_top1": val_top1,
            "val_top5": val_top5,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    return classifier, history


def protocol_augmentation(
    image_size: int, mean: Sequence[float], std: Sequence[float], scale: Sequence[float]
) -> v2.Compose:
    """The linear protocol's training view of a uint8 image (C, H, W): RandomResizedCrop to
    (C, S, S) with area ``scale``, horizontal flip, then the run's normalisation (float)."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"crop_scale must be [low, high] with 0 < low <= high <= 1: {scale}")
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(scale[0], scale[1]), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def _known_classes(dataset: ImageDataset) -> int:
    """One more than the largest label a dataset exposes without loading images (0 if none)."""
    targets = dataset_targets(dataset)
    count = int(targets.max().item()) + 1 if targets is not None and targets.numel() else 0
    return max(count, len(getattr(dataset, "classes", ()) or ()))


def _labelled(features: Tensor, labels: Tensor, split: str, option: str) -> tuple[Tensor, Tensor]:
    keep = labels >= 0
    if not bool(keep.any()):
        raise ConfigError(f"the {split!r} split has no labels: set {option} to a labelled split")
    return features[keep], labels[keep]


def run_linear(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate with a composed ``conf/linear.yaml``: prints the result, writes ``linear.json``,
    TensorBoard scalars and the classifier; returns the report written to the JSON."""
    source = require_checkpoint(cfg, "mocoq-linear")
    milestones = cfg.get("milestones")
    protocol = LinearProtocol(
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        momentum=float(cfg.momentum),
        weight_decay=float(cfg.weight_decay),
        lr_schedule=str(cfg.lr_schedule),
        milestones=(
            tuple(int(m) for m in milestones) if isinstance(milestones, ListConfig) else None
        ),
        gamma=float(cfg.gamma),
        seed=int(cfg.seed),
    )
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {cfg.encoder!r}")
    precision = str(cfg.precision)
    device = resolve_device(str(cfg.device))
    autocast(device, precision)  # checks the name before any work
    encoder = load_encoder(source, cfg.get("config"), key_encoder=cfg.encoder == "key")
    baseline = cfg.get("baseline")
    if baseline:  # the same protocol on a reference instead of the trained encoder
        extractor = encoder.baseline(str(baseline), int(cfg.seed))
    else:
        extractor = encoder.extractor("backbone", cfg.encoder)
    datamodule = evaluation_datamodule(encoder, cfg.get("dataset"))
    train_split = cfg.get("train_split") or datamodule.bank_split
    val_split = cfg.get("val_split") or datamodule.val_split
    if train_split is None or val_split is None:
        raise ConfigError(
            "no labelled train or val split: set train_split=<split> and val_split=<split>"
        )
    train_split, val_split = str(train_split), str(val_split)
    encoder.to(device)
    extractor.to(device)
    extractor.eval()  # frozen: BatchNorm keeps the running statistics of pre-training
    extractor.requires_grad_(False)
    torch.manual_seed(protocol.seed)  # the augmentation's draws in this process

    start = time.perf_counter()
    with autocast(device, precision):
        val_features, val_labels = embed(extractor, datamodule.clean_dataloader(val_split), device)
    val_features, val_labels = _labelled(val_features, val_labels, val_split, "val_split")
    train_dataset = datamodule.split(train_split)
    num_classes = max(int(val_labels.max().item()) + 1, _known_classes(train_dataset))
    batches: Batches
    if cfg.augmentation:
        batches = _augmented(cfg, encoder, datamodule, extractor, train_dataset, protocol, device)
        num_train = len(train_dataset)  # type: ignore[arg-type]
    else:
        with autocast(device, precision):
            loader = datamodule.clean_dataloader(train_split)
            train_features, train_labels = embed(extractor, loader, device)
        train_features, train_labels = _labelled(
            train_features, train_labels, train_split, "train_split"
        )
        num_classes = max(num_classes, int(train_labels.max().item()) + 1)
        batches = cached_batches(train_features, train_labels, protocol.batch_size, protocol.seed)
        num_train = train_features.shape[0]
    embed_seconds = time.perf_counter() - start

    output_dir = Path(str(cfg.output_dir))
    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(record: dict[str, float]) -> None:
        epoch = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                writer.add_scalar(f"linear/{name}", value, epoch)

    try:
        classifier, history = train_linear(
            batches,
            val_features,
            val_labels,
            int(val_features.shape[1]),  # F: the backbone's, or C * H * W for raw pixels
            num_classes,
            protocol,
            on_epoch=log,
        )
    finally:
        writer.close()
    final = history[-1]
    report: dict[str, Any] = {
        "source": str(encoder.source),
        "kind": encoder.kind,
        "baseline": str(baseline) if baseline else None,
        "encoder": cfg.encoder if encoder.kind == "checkpoint" else encoder.encoder,
        "step": encoder.step,
        "epoch": encoder.epoch,
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "feature_dim": int(val_features.shape[1]),
        "dataset": {
            "train_split": train_split,
            "val_split": val_split,
            "num_train": num_train,
            "num_val": int(val_features.shape[0]),
            "num_classes": num_classes,
        },
        "augmentation": bool(cfg.augmentation),
        "protocol": {**asdict(protocol), "milestones": list(protocol.milestone_epochs())},
        "precision": precision,
        "history": history,
        "seconds": {
            "embed": round(embed_seconds, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    state = {key: value.detach().cpu() for key, value in classifier.state_dict().items()}
    write_atomically(output_dir / "linear_classifier.pt", lambda path: torch.save(state, path))
    write_json(output_dir / "linear.json", report)
    print(format_report(report, output_dir))
    return report


def _augmented(
    cfg: DictConfig,
    encoder: LoadedEncoder,
    datamodule: MoCoDataModule,
    extractor: FeatureExtractor,
    train_dataset: ImageDataset,
    protocol: LinearProtocol,
    device: torch.device,
) -> Batches:
    """Batches of protocol-augmented training views, embedded by the frozen extractor."""
    dataset = evaluation_config(encoder.config, cfg.get("dataset")).dataset
    transform = protocol_augmentation(
        datamodule.image_size, list(dataset.mean), list(dataset.std), list(cfg.crop_scale)
    )
    workers = int(datamodule.num_workers)
    loader = DataLoader(
        TransformedDataset(train_dataset, transform),
        batch_size=protocol.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(protocol.seed),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_job_signals,
    )
    return augmented_batches(extractor, loader, device, str(cfg.precision))


def format_report(report: dict[str, Any], output_dir: Path) -> str:
    """The end-of-run lines: protocol, accuracy, where the files are."""
    data, protocol = report["dataset"], report["protocol"]
    schedule = protocol["lr_schedule"]
    if schedule == "step":
        schedule += f" at {protocol['milestones']}"
    path = "augmented views" if report["augmentation"] else "cached features"
    return "\n".join(
        [
            "",
            f"Linear probe of the {report['encoder']} encoder of {report['source']} "
            f"(step {report['step']}): frozen {report['feature_dim']}-d backbone features",
            f"  train '{data['train_split']}' ({data['num_train']} images), val "
            f"'{data['val_split']}' ({data['num_val']}), {data['num_classes']} classes; "
            f"{protocol['epochs']} epochs, lr {protocol['lr']:g} {schedule}, batch "
            f"{protocol['batch_size']}, {path}",
            f"  val top-1 {report['top1']:.4f}, top-5 {report['top5']:.4f}",
            f"Results     : {output_dir / 'linear.json'}",
            f"TensorBoard : tensorboard --logdir {output_dir}",
        ]
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="linear")
def _main(cfg: DictConfig) -> None:
    with one_line_errors("mocoq-linear"):
        run_linear(cfg)


def main() -> None:
    """Entry point of ``mocoq-linear``."""
    _main()


if __name__ == "__main__":
    main()
