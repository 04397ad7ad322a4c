"""Speed benchmarks of mocoq on the CPU, against a supervised step and against lightly.

Four numbers (docs/benchmarks.md says what each means):

1. step ratio: one mocoq MoCo training step / one supervised step of the same backbone (+ a
   linear classifier) on the same batch. The floor is about 1.32: the query forward and backward
   cost what the supervised step costs, and the key forward adds about a third of it. The
   floor is also measured (the ``floor`` arm: the supervised step plus a gradient-free forward
   of a second copy of the backbone in training mode), since the forward's share of a step
   differs between machines.
2. mocoq step / lightly step: lightly's MoCo written as its own example does, on an identical
   backbone, batch, queue, temperature, head, EMA momentum and precision.
3. end to end / step only: images/s of a real Lightning ``fit`` on Fashion-MNIST (data loading,
   augmentation, logging and callbacks included) over the images/s of the step alone; for mocoq
   (kNN monitor off and on) and for a lightly pipeline written as lightly's examples write it.
4. kNN monitor / epoch: one ``KNNMonitor.evaluate`` with the default callbacks config against
   the time of one training epoch.

Steps 1 and 2 drive every MoCo step through ``pytorch_lightning.Trainer.fit`` on a loader that
repeats one batch, so the step is exactly what a run executes (``training_step``, logging, the
closure with backward, ``optimizer_step`` with the EMA update); the supervised step is a bare
PyTorch loop, the ideal the ratio is measured against. The arms alternate (A B C, C B A, ...) and
each repetition times ``--steps`` steps after one step of warm-up; the table gives medians.

Usage::

    make bench                                   # lightly comes with the dev extra
    python scripts/bench.py --precision fp32 bf16 bf16+channels_last --out bench.json
    python scripts/bench.py --quick              # a smoke run: 2 x 2 steps, short fits, no kNN
    python scripts/bench.py --override model.key_bn=none   # any mocoq config override
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_fabric.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mocoq.callbacks import KNNMonitor
from mocoq.module import channels_last_unsafe_convs
from mocoq.train import CONFIG_DIR, build, cpu_precision

REPO = Path(__file__).resolve().parent.parent
# --precision name -> (Lightning precision, channels_last memory format)
PRECISIONS = {
    "fp32": ("32-true", False),
    "fp32+channels_last": ("32-true", True),
    "bf16": ("bf16-mixed", False),
    "bf16+channels_last": ("bf16-mixed", True),
}
STEP_FLOOR = 1.32  # (query fwd + bwd + key fwd) / (fwd + bwd): 1 + 1/3, minus the head's share


# --- the knobs -----------------------------------------------------------------------------


@dataclass
class Options:
    """What one benchmark run measures; the defaults are the full run (a few minutes)."""

    precisions: list[str] = field(default_factory=lambda: ["auto"])
    overrides: list[str] = field(default_factory=list)  # mocoq config overrides, everywhere
    steps: int = 6  # timed steps per repetition (parts 1-2)
    repeats: int = 5  # repetitions per arm (parts 1-2)
    fit_warmup: int = 6  # untimed steps at the start of each fit (part 3)
    fit_steps: int = 30  # timed steps of each fit (part 3)
    knn: bool = True  # parts 3 (kNN on) and 4
    lightly_workers: int = 2
    run_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "mocoq-bench")


def resolve_precision(name: str) -> str:
    """``auto`` is what ``mocoq-train`` uses on this CPU: bf16 where it has bf16, else fp32,
    with the memory layout of the config's ``model.channels_last`` default."""
    if name == "auto":
        base = "bf16" if cpu_precision() == "bf16-mixed" else "fp32"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            channels_last = bool(compose(config_name="train").model.channels_last)
        return f"{base}+channels_last" if channels_last else base
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be auto or one of {', '.join(PRECISIONS)}, got {name}")
    return name


# --- where it runs -------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch and thread counts, versions and the checkout's commit."""
    model = platform.machine()  # replaced by /proc/cpuinfo's model name where there is one
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "unknown"
    # Bounded: a git that waits (a prompt, a lock, a background helper holding the pipe) must
    # not hold up the benchmark.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(affinity(0)) if affinity else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": cpu_precision() == "bf16-mixed",
        "pytorch_lightning": pl.__version__,
        "lightly": _lightly_version(),
        "python": platform.python_version(),
        "commit": commit,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def lightly_missing() -> str | None:
    """None when lightly imports, else why its rows are skipped."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        return "lightly is not installed (the dev extra has it: make setup): lightly rows skipped"
    return None


def _lightly_version() -> str | None:
    if lightly_missing():
        return None
    import lightly

    return str(lightly.__version__)


def quiet_lightning() -> None:
    """Keep Lightning's per-fit banners and hints out of the benchmark's output."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "mocoq"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


# --- mocoq's config ------------------------------------------------------------------------


def compose_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, its run written under ``run_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"run_dir={run_dir}", *overrides])


def precision_overrides(precision: str) -> list[str]:
    """mocoq config overrides for a ``--precision`` value: Lightning precision and layout."""
    lightning, channels_last = PRECISIONS[precision]
    return [f"trainer.precision={lightning}", f"model.channels_last={str(channels_last).lower()}"]


def channels_last_applies(cfg: DictConfig, precision: str) -> bool:
    """Whether ``precision``'s channels-last layout is used for the config's backbone: not where
    oneDNN computes a layer's gradient wrongly in that layout
    (:func:`mocoq.module.channels_last_unsafe_convs`, which mocoq's module also refuses)."""
    if not PRECISIONS[precision][1]:
        return False
    unsafe = channels_last_unsafe_convs(instantiate(cfg.backbone))
    if unsafe:
        print(
            f"note: {precision}: the backbone's {unsafe[0]} is a strided 1x1 convolution from "
            "fewer than 8 channels, whose channels-last gradient oneDNN gets wrong: every arm "
            "runs NCHW"
        )
    return not unsafe


# --- timing helpers ------------------------------------------------------------------------


class StepClock(pl.Callback):
    """Wall-clock start and end of every training batch (the end is after the optimizer step
    and, for mocoq, the EMA update)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.ends, strict=True)]

    def window_seconds(self, skip: int) -> float:
        """From the end of batch ``skip`` to the end of the last: everything a run spends on
        those batches, data loading included."""
        return self.ends[-1] - self.ends[skip - 1] if skip else self.ends[-1] - self.starts[0]


class RepeatedBatch(Dataset[Any]):
    """One pre-made batch, ``count`` times (with ``batch_size=None``: no collation)."""

    def __init__(self, batch: Any, count: int) -> None:
        self.batch = batch
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        return self.batch


def make_batch(cfg: DictConfig, channels_last: bool, seed: int = 0) -> Any:
    """A MoCo batch ``((view_a, view_b), targets)`` of the config's shape, random values."""
    generator = torch.Generator().manual_seed(seed)
    n, c, s = int(cfg.dataset.batch_size), int(cfg.dataset.channels), int(cfg.dataset.image_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    views = [
        torch.randn(n, c, s, s, generator=generator).contiguous(memory_format=memory_format)
        for _ in range(2)
    ]
    return (views[0], views[1]), torch.randint(0, 10, (n,), generator=generator)


def lightning_trainer(precision: str, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": PRECISIONS[precision][0],
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def fit_steps(module: pl.LightningModule, batch: Any, steps: int, precision: str) -> list[float]:
    """Seconds of each of ``steps`` training steps of ``module`` on ``batch`` under ``fit``."""
    clock = StepClock()
    trainer = lightning_trainer(precision, [clock], limit_train_batches=steps)
    loader = DataLoader(RepeatedBatch(batch, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return clock.step_seconds()


class SupervisedStep:
    """The reference: backbone + linear classifier, cross-entropy, the same optimizer, a bare
    PyTorch loop (autocast as Lightning's ``bf16-mixed`` sets it).

    With ``key_forward`` each step also runs a gradient-free forward of a second copy of the
    backbone in training mode on the other view: the compute a MoCo step cannot avoid (query
    forward and backward, key forward), without anything else a MoCo step does.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classes: int,
        optimizer: Callable[..., Any],
        precision: str,
        key_forward: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        import copy

        self.key = copy.deepcopy(backbone).train() if key_forward else None
        self.model = nn.Sequential(backbone, nn.Linear(int(backbone.out_dim), classes))  # type: ignore[arg-type]
        if PRECISIONS[precision][1] if channels_last is None else channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
            if self.key is not None:
                self.key = self.key.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        self.model.train()
        self.optimizer = optimizer(self.model.parameters())
        self.bf16 = PRECISIONS[precision][0] == "bf16-mixed"

    def __call__(self, images: Tensor, targets: Tensor, key_images: Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(images), targets)
            if self.key is not None:
                with torch.no_grad():
                    self.key(key_images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, batch: Any, steps: int) -> list[float]:
        (images, key_images), targets = batch
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            self(images, targets, key_images)
            seconds.append(time.perf_counter() - start)
        return seconds


# --- lightly, written as its examples/pytorch_lightning/moco.py is -------------------------


class LightlyMoCo(pl.LightningModule):
    """lightly's MoCo example (``examples/pytorch_lightning/moco.py``), parts passed in.

    As in the example: a momentum copy of backbone and head with ``deactivate_requires_grad``,
    ``update_momentum`` at the start of ``training_step``, the keys from the momentum encoder,
    ``NTXentLoss(memory_bank_size=(K, D))`` (which normalises, reads the bank and enqueues the
    keys), no batch shuffle, plain BatchNorm. Differences from the example, so that only the
    framework differs from mocoq: the backbone, head sizes, temperature, momentum (constant,
    where the example follows a cosine from 0.996) and optimizer are mocoq's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int,
        out_dim: int,
        queue_size: int,
        temperature: float,
        momentum: float,
        optimizer: Callable[..., Any],
    ) -> None:
        super().__init__()
        import copy

        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum

        self.update_momentum = update_momentum
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(int(backbone.out_dim), hidden_dim, out_dim)  # type: ignore[arg-type]
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, out_dim))
        self.momentum = momentum
        self.optimizer_factory = optimizer

    def forward(self, x: Tensor) -> Tensor:
        query = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(query)

    def forward_momentum(self, x: Tensor) -> Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.update_momentum(self.backbone, self.backbone_momentum, m=self.momentum)
        self.update_momentum(self.projection_head, self.projection_head_momentum, m=self.momentum)
        x_query, x_key = batch[0]
        query = self.forward(x_query)
        key = self.forward_momentum(x_key)
        return self.criterion(query, key)

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(self.parameters())


def build_lightly(
    cfg: DictConfig,
    precision: str,
    channels_last: bool | None = None,
    module_class: type[LightlyMoCo] = LightlyMoCo,
    lr: float | None = None,
) -> LightlyMoCo:
    """lightly's MoCo with a fresh backbone identical to mocoq's and mocoq's hyper-parameters
    (``lr``, when given, replaces ``optim.lr``: the scaled learning rate of a real run)."""
    backbone: nn.Module = instantiate(cfg.backbone)
    feature_dim = int(backbone.out_dim)  # type: ignore[arg-type]
    module = module_class(
        backbone=backbone,
        hidden_dim=int(cfg.head.hidden_dim or feature_dim),
        out_dim=int(cfg.head.out_dim),
        queue_size=int(cfg.model.queue_size),
        temperature=float(cfg.model.temperature),
        momentum=float(cfg.model.ema_momentum),
        optimizer=instantiate(cfg.optim) if lr is None else instantiate(cfg.optim, lr=lr),
    )
    if PRECISIONS[precision][1] if channels_last is None else channels_last:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return module


def build_mocoq(cfg: DictConfig) -> pl.LightningModule:
    """mocoq's module as ``mocoq-train`` builds it (``model.channels_last`` sets the layout of
    the backbones and their inputs in ``setup``)."""
    _, module, _ = build(cfg)
    return module


# --- parts 1 and 2: the step ---------------------------------------------------------------


def measure_steps(options: Options, precision: str, with_lightly: bool) -> dict[str, Any]:
    """Interleaved step timings of mocoq, the supervised reference and (optionally) lightly."""
    cfg = compose_config(
        options.run_dir / "steps", [*options.overrides, *precision_overrides(precision)]
    )
    if cfg.model.symmetric:
        print("note: model.symmetric=true: the floor of the step ratio is about 2.64, not 1.32")
    channels_last = channels_last_applies(cfg, precision)
    batch = make_batch(cfg, channels_last)
    torch.manual_seed(int(cfg.seed))
    supervised = SupervisedStep(
        instantiate(cfg.backbone), 10, instantiate(cfg.optim), precision, False, channels_last
    )
    floor = SupervisedStep(
        instantiate(cfg.backbone), 10, instantiate(cfg.optim), precision, True, channels_last
    )
    arms: dict[str, Callable[[int], list[float]]] = {
        "supervised": lambda n: supervised.run(batch, n),
        "floor": lambda n: floor.run(batch, n),
    }
    mocoq_module = build_mocoq(cfg)
    arms["mocoq"] = lambda n: fit_steps(mocoq_module, batch, n, precision)
    if with_lightly:
        lightly_module = build_lightly(cfg, precision, channels_last)
        arms["lightly"] = lambda n: fit_steps(lightly_module, batch, n, precision)
    for run in arms.values():  # warm-up: allocator, oneDNN kernels, first optimizer state
        run(2)
    per_repeat: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for repeat in range(options.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            seconds = arms[name](options.steps + 1)[1:]  # the first step of a fit is warm-up
            per_repeat[name].append(statistics.mean(seconds))
    result: dict[str, Any] = {
        "precision": precision,
        "batch_size": int(cfg.dataset.batch_size),
        "image": [int(cfg.dataset.channels), int(cfg.dataset.image_size)],
        "queue_size": int(cfg.model.queue_size),
        "key_bn": str(cfg.model.key_bn),
        "symmetric": bool(cfg.model.symmetric),
        "seconds_per_step": {n: statistics.median(v) for n, v in per_repeat.items()},
        "seconds_per_step_all": per_repeat,
        "step_ratio": _paired_median(per_repeat["mocoq"], per_repeat["supervised"]),
        "step_ratio_floor": STEP_FLOOR * (2 if cfg.model.symmetric else 1),
        "measured_floor": _paired_median(per_repeat["floor"], per_repeat["supervised"])
        * (2 if cfg.model.symmetric else 1),
        "mocoq_over_floor": _paired_median(per_repeat["mocoq"], per_repeat["floor"])
        / (2 if cfg.model.symmetric else 1),
    }
    if with_lightly:
        result["mocoq_over_lightly"] = _paired_median(per_repeat["mocoq"], per_repeat["lightly"])
        result["lightly_over_supervised"] = _paired_median(
            per_repeat["lightly"], per_repeat["supervised"]
        )
    return result


def _paired_median(numerators: list[float], denominators: list[float]) -> float:
    """Median of per-repetition ratios: each pair ran back to back, so load drifts cancel."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


# --- part 3: end to end --------------------------------------------------------------------


def fit_mocoq(options: Options, overrides: Sequence[str], name: str) -> dict[str, Any]:
    """A real ``mocoq.train.build`` + ``fit`` for ``fit_warmup + fit_steps`` batches, one epoch
    (so the kNN monitor, when configured, evaluates once at its end)."""
    total = options.fit_warmup + options.fit_steps
    cfg = compose_config(
        options.run_dir / name,
        [
            *overrides,
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={total}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
        ],
    )
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    clock = StepClock()
    trainer.callbacks.append(clock)  # type: ignore[attr-defined]
    datamodule.setup("fit")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    monitor = next((c for c in trainer.callbacks if isinstance(c, KNNMonitor)), None)  # type: ignore[attr-defined]
    window = clock.window_seconds(options.fit_warmup)
    batch = int(cfg.dataset.batch_size)
    result: dict[str, Any] = {
        "precision": _precision_of(cfg),
        "images_per_s": options.fit_steps * batch / window,
        "seconds_per_step": window / options.fit_steps,
        "fit_seconds": fit_seconds,
        "train_images": len(datamodule.split(datamodule.train_split)),  # type: ignore[arg-type]
        "batch_size": batch,
        "knn_seconds": monitor.seconds if monitor is not None and monitor.seconds else None,
    }
    return result


def _precision_of(cfg: DictConfig) -> str:
    """The ``--precision`` name of a composed config."""
    name = "fp32" if str(cfg.trainer.precision) in ("32-true", "32") else "bf16"
    return f"{name}+channels_last" if cfg.model.get("channels_last") else name


class PILImages(Dataset[tuple[Any, int]]):
    """In-memory images as torchvision's datasets serve them: a PIL image (mode L for one
    channel, as ``torchvision.datasets.FashionMNIST``; RGB for three, as ``CIFAR10``) through
    ``transform``, and the label. The files are read with mocoq's loader (the Debian package's
    layout is not torchvision's).

    Args:
        images: uint8 (N, C, H, W) with C = 1 or 3.
        targets: (N,).
    """

    def __init__(self, images: Tensor, targets: Tensor, transform: Callable[[Any], Any]) -> None:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"PIL images need 1 or 3 channels, got {images.shape[1]}")
        # (N, H, W) for mode L, (N, H, W, 3) for RGB
        self.images = (images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)).numpy()
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index])  # (H, W) -> mode "L", (H, W, 3) -> "RGB"
        return self.transform(image), int(self.targets[index])


def fit_lightly(options: Options, cfg: DictConfig, precision: str, name: str) -> dict[str, Any]:
    """lightly's example pipeline: ``MoCoV2Transform``, the default collate, a shuffled
    ``DataLoader`` with ``drop_last``, and ``pl.Trainer(...).fit`` with its default logger and
    checkpointing."""
    from lightly.transforms.moco_transform import MoCoV2Transform

    from mocoq.data.datasets import fashion_mnist

    train = fashion_mnist(cfg.dataset.root, "train")
    transform = MoCoV2Transform(
        input_size=int(cfg.dataset.image_size),
        normalize={"mean": list(cfg.dataset.mean), "std": list(cfg.dataset.std)},
    )
    loader = DataLoader(
        PILImages(train.images, train.targets, transform),
        batch_size=int(cfg.dataset.batch_size),
        shuffle=True,
        drop_last=True,
        num_workers=options.lightly_workers,
    )
    torch.manual_seed(int(cfg.seed))
    module = build_lightly(cfg, precision, channels_last_applies(cfg, precision))
    clock = StepClock()
    total = options.fit_warmup + options.fit_steps
    trainer = lightning_trainer(
        precision,
        [clock],
        limit_train_batches=total,
        logger=None,  # Lightning's default, as in the example
        enable_checkpointing=True,
        default_root_dir=str(options.run_dir / name),
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    window = clock.window_seconds(options.fit_warmup)
    batch = int(cfg.dataset.batch_size)
    return {
        "precision": precision,
        "images_per_s": options.fit_steps * batch / window,
        "seconds_per_step": window / options.fit_steps,
        "fit_seconds": time.perf_counter() - started,
        "batch_size": batch,
        "workers": options.lightly_workers,
    }


def fashion_mnist_missing(cfg: DictConfig) -> str | None:
    if str(cfg.dataset.loader._target_) != "mocoq.data.datasets.fashion_mnist":
        return None  # another dataset (e.g. synthetic in tests): mocoq's loader decides
    from mocoq.data.datasets import DatasetNotFoundError, fashion_mnist

    try:
        fashion_mnist(cfg.dataset.root, "test")
    except DatasetNotFoundError:
        return "Fashion-MNIST is not installed (make data): end-to-end rows skipped"
    return None


# --- the whole run -------------------------------------------------------------------------


def run_benchmark(
    options: Options,
    log: Callable[[str], None] = print,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Parts 1-4; returns everything the table and the JSON hold. ``save`` is called with the
    results so far after every part and fit, so an interrupted run keeps what it measured."""
    checkpoint = save or (lambda partial: None)
    quiet_lightning()
    precisions = [resolve_precision(p) for p in options.precisions]
    skipped_lightly = lightly_missing()
    results: dict[str, Any] = {"machine": machine_info(), "skipped": []}
    if skipped_lightly:
        results["skipped"].append(skipped_lightly)
        log(f"skipped: {skipped_lightly}")

    results["steps"] = []
    for precision in precisions:
        log(f"[1-2] step timings at {precision} ({options.repeats} x {options.steps} steps) ...")
        results["steps"].append(measure_steps(options, precision, skipped_lightly is None))
        checkpoint(results)

    precision = precisions[0]
    base = [*options.overrides, *precision_overrides(precision)]
    cfg = compose_config(options.run_dir / "probe", base)
    skipped_data = fashion_mnist_missing(cfg)
    if skipped_data or options.fit_steps < 1:
        reason = skipped_data or "--fit-steps 0: end-to-end rows skipped"
        results["skipped"].append(reason)
        log(f"skipped: {reason}")
        return results
    step = results["steps"][0]
    step_rate = {name: step["batch_size"] / s for name, s in step["seconds_per_step"].items()}

    fits: dict[str, Any] = {}
    results["end_to_end"] = fits  # filled in place, saved after every fit
    default_path = cfg.dataset.get("augment_on_device")  # None: the key does not exist
    if default_path is None:
        paths: list[bool | None] = [None]
        results["augment_paths"] = (
            "dataset.augment_on_device is not in the config: only the current loader path"
        )
    else:
        paths = [bool(default_path), not default_path]  # the configured path first
        results["augment_paths"] = (
            f"dataset.augment_on_device exists (default {str(default_path).lower()}): "
            "both paths measured"
        )
    results["end_to_end_dataset"] = str(cfg.dataset.loader._target_).rsplit(".", 1)[-1]
    log(f"[3] {results['augment_paths']}")
    for on_device in paths:
        label = "" if on_device is None else f" augment_on_device={str(on_device).lower()}"
        extra = [] if on_device is None else [f"dataset.augment_on_device={str(on_device).lower()}"]
        name = f"mocoq{label} kNN off"
        log(f"[3] fit: {name} ...")
        fits[name] = fit_mocoq(options, [*base, *extra, "~callbacks.knn"], f"fit{len(fits)}")
        fits[name]["augment_on_device"] = on_device
        checkpoint(results)
    if options.knn:
        name = "mocoq kNN on"
        log(f"[3] fit: {name} (the kNN monitor evaluates once, at the epoch's end) ...")
        fits[name] = fit_mocoq(options, base, f"fit{len(fits)}")
        fits[name]["augment_on_device"] = default_path
        checkpoint(results)
    if skipped_lightly is None:
        name = "lightly"
        log(f"[3] fit: {name} ...")
        fits[name] = fit_lightly(options, cfg, precision, f"fit{len(fits)}")
        checkpoint(results)
    for name, fit in fits.items():
        arm = "lightly" if name.startswith("lightly") else "mocoq"
        if arm in step_rate:
            fit["end_to_end_over_step"] = fit["images_per_s"] / step_rate[arm]

    # Each side with its own defaults: mocoq-train's precision and loader path, lightly's fp32.
    defaults: dict[str, Any] = {}
    mocoq_default = resolve_precision("auto")
    first = next(iter(fits.values()))  # the configured loader path, kNN off
    if mocoq_default == precision:
        defaults["mocoq"] = first
    else:
        log(f"[3] fit: mocoq defaults ({mocoq_default}) ...")
        defaults["mocoq"] = fit_mocoq(options, [*options.overrides, "~callbacks.knn"], "fit_dm")
    if skipped_lightly is None:
        if precision == "fp32":
            defaults["lightly"] = fits["lightly"]
        else:
            log("[3] fit: lightly defaults (fp32) ...")
            defaults["lightly"] = fit_lightly(options, cfg, "fp32", "fit_dl")
        defaults["mocoq_over_lightly_images_per_s"] = (
            defaults["mocoq"]["images_per_s"] / defaults["lightly"]["images_per_s"]
        )
    results["end_to_end"] = fits
    results["defaults"] = defaults

    knn_fit = fits.get("mocoq kNN on")
    if knn_fit is not None and knn_fit["knn_seconds"]:
        off = next(iter(fits.values()))  # the same loader path with the monitor off
        steps_per_epoch = off["train_images"] // off["batch_size"]
        epoch_end_to_end = steps_per_epoch * off["seconds_per_step"]
        epoch_step_only = steps_per_epoch * step["seconds_per_step"]["mocoq"]
        results["knn"] = {
            "evaluate_seconds": knn_fit["knn_seconds"],
            "steps_per_epoch": steps_per_epoch,
            "epoch_seconds_end_to_end": epoch_end_to_end,
            "epoch_seconds_step_only": epoch_step_only,
            "knn_over_epoch": knn_fit["knn_seconds"] / epoch_end_to_end,
            "share_of_epoch_with_knn": knn_fit["knn_seconds"]
            / (epoch_end_to_end + knn_fit["knn_seconds"]),
            "knn_over_epoch_step_only": knn_fit["knn_seconds"] / epoch_step_only,
        }
    return results


# --- output --------------------------------------------------------------------------------


def format_table(results: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_benchmark`'s results."""
    m = results["machine"]
    lines = [
        f"command : {results.get('command', '')}",
        f"machine : {m['cpu']}, {m['cores_usable']}/{m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), bf16 native: {m['bf16_native']}, lightning "
        f"{m['pytorch_lightning']}, lightly {m['lightly'] or '-'}, commit {m['commit']}, "
        f"load {m['load_average']}",
        "",
        "1-2. training step (median s/step; ratios: median of back-to-back pairs)",
        f"  {'precision':<20}{'supervised':>11}{'mocoq':>9}{'lightly':>9}"
        f"{'mocoq/sup':>11}{'floor':>7}{'measured':>10}{'mocoq/floor':>13}"
        f"{'lightly/sup':>13}{'mocoq/lightly':>15}",
    ]
    for row in results["steps"]:
        sec = row["seconds_per_step"]
        lightly = f"{sec['lightly']:9.3f}" if "lightly" in sec else f"{'skipped':>9}"
        lines.append(
            f"  {row['precision']:<20}{sec['supervised']:11.3f}{sec['mocoq']:9.3f}{lightly}"
            f"{row['step_ratio']:11.2f}{row['step_ratio_floor']:7.2f}"
            f"{row['measured_floor']:10.2f}{row['mocoq_over_floor']:13.2f}"
            f"{_ratio(row.get('lightly_over_supervised')):>13}"
            f"{_ratio(row.get('mocoq_over_lightly')):>15}"
        )
    if results["steps"]:
        row = results["steps"][0]
        lines.append(
            f"  (batch {row['batch_size']}, images {row['image'][0]}x{row['image'][1]}"
            f"x{row['image'][1]}, queue {row['queue_size']}, mocoq key_bn={row['key_bn']}, "
            "lightly plain BatchNorm as in its example)"
        )
    if "end_to_end" in results:
        lines += [
            "",
            f"3. end to end: real fit on {results.get('end_to_end_dataset')} "
            f"({results['augment_paths']})",
            f"  {'run':<50}{'images/s':>10}{'s/step':>9}{'e2e/step-only':>15}",
        ]
        for name, fit in results["end_to_end"].items():
            lines.append(
                f"  {name + ' (' + fit['precision'] + ')':<50}{fit['images_per_s']:10.1f}"
                f"{fit['seconds_per_step']:9.3f}{_ratio(fit.get('end_to_end_over_step')):>15}"
            )
    defaults = results.get("defaults", {})
    if "mocoq" in defaults:
        lines.append(
            f"  defaults: mocoq ({defaults['mocoq']['precision']}) "
            f"{defaults['mocoq']['images_per_s']:.1f} images/s"
        )
        if "lightly" in defaults:
            lines[-1] += (
                f", lightly ({defaults['lightly']['precision']}) "
                f"{defaults['lightly']['images_per_s']:.1f} images/s: mocoq/lightly "
                f"{defaults['mocoq_over_lightly_images_per_s']:.2f}"
            )
    if "knn" in results:
        k = results["knn"]
        lines += [
            "",
            "4. kNN monitor (default callbacks config) against one training epoch",
            f"  one evaluate: {k['evaluate_seconds']:.1f} s; epoch of {k['steps_per_epoch']} "
            f"steps: {k['epoch_seconds_end_to_end']:.1f} s end to end "
            f"({k['epoch_seconds_step_only']:.1f} s step only)",
            f"  kNN / epoch: {k['knn_over_epoch']:.2f} (step only: "
            f"{k['knn_over_epoch_step_only']:.2f}); share of an epoch with its kNN: "
            f"{100 * k['share_of_epoch_with_knn']:.0f}%",
        ]
    for reason in results["skipped"]:
        lines.append(f"skipped: {reason}")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: Sequence[str]) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["auto"],
        choices=["auto", *PRECISIONS],
        help="parts 1-2 run for each, parts 3-4 for the first; auto: mocoq-train's CPU default",
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each arm")
    parser.add_argument("--fit-steps", type=int, default=30, help="timed steps of each fit")
    parser.add_argument("--fit-warmup", type=int, default=6, help="untimed first steps of a fit")
    parser.add_argument("--no-knn", action="store_true", help="skip the kNN-on fit (part 4)")
    parser.add_argument(
        "--override", action="append", default=[], help="a mocoq config override (repeatable)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 x 2 steps, fits of 3 + 4 steps, no kNN"
    )
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results")
    parser.add_argument("--run-dir", type=Path, default=None, help="fits' run directories")
    args = parser.parse_args(argv)
    options = Options(
        precisions=args.precision,
        overrides=args.override,
        steps=2 if args.quick else args.steps,
        repeats=2 if args.quick else args.repeats,
        fit_warmup=3 if args.quick else args.fit_warmup,
        fit_steps=4 if args.quick else args.fit_steps,
        knn=not (args.no_knn or args.quick),
    )
    if args.run_dir is not None:
        options.run_dir = args.run_dir
    if min(options.steps, options.repeats, options.fit_warmup) < 1 or options.fit_steps < 0:
        parser.error("--steps, --repeats and --fit-warmup must be positive")
    return options, args.out


@contextlib.contextmanager
def _run_dir(options: Options) -> Iterator[None]:
    """A temporary run directory unless --run-dir was given."""
    if options.run_dir != Options().run_dir:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mocoq-bench-") as directory:
        options.run_dir = Path(directory)
        yield


def main(argv: Sequence[str] | None = None) -> None:
    import json

    arguments = sys.argv[1:] if argv is None else list(argv)
    options, out = parse_args(arguments)
    command = shlex.join([sys.executable, *sys.argv[:1], *arguments])
    header = {
        "command": command,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()},
    }

    def save(partial: dict[str, Any]) -> None:
        out.write_text(json.dumps({**header, **partial}, indent=2) + "\n")

    with _run_dir(options):
        results = {**header, **run_benchmark(options, save=save)}
    print()
    print(format_table(results))
    save(results)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
