"""Shared fixtures: tiny models and the real config composed and shrunk for CPU tests."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mocoq.backbones import SmallResNet
from mocoq.data.datasets import fashion_mnist_root
from mocoq.heads import ProjectionHead
from mocoq.module import MoCoModule
from mocoq.train import CONFIG_DIR

# Under pytest-xdist (make test: one worker per core) each worker, and every run it starts,
# gets its share of the cores, so that the workers' thread pools do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# Overrides that shrink any config to a few seconds on a CPU.
TINY = [
    "dataset=synthetic",
    "dataset.image_size=16",
    "dataset.batch_size=16",
    "dataset.loader.num_samples=128",
    "backbone=small_resnet",
    "backbone.widths=[8,16,16,32]",
    "model.queue_size=64",
    "model.bn_splits=2",
    "head.out_dim=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "report.raw_pixel_baseline=false",
    "lr_scaling.reference_batch_size=16",  # optim.lr is the lr of the tiny batch on one process
]


def tiny_module(widths: tuple[int, ...] = (4, 8), **kwargs: object) -> MoCoModule:
    """A MoCoModule small enough for unit tests: 1-channel images, 8-d embeddings.

    The default widths have a strided 1x1 convolution from 4 channels, which keeps a CPU module
    NCHW and uncompiled (:func:`mocoq.module.channels_last_unsafe_convs`); layout and compile
    tests pass ``widths=(8, 16)``."""
    options: dict[str, object] = {
        "queue_size": 32,
        "temperature": 0.2,
        "ema_momentum": 0.9,
        "key_bn": "none",
    }
    options.update(kwargs)
    return MoCoModule(
        backbone=SmallResNet(1, widths=widths, blocks=(1, 1)),
        head=functools.partial(ProjectionHead, out_dim=8, num_layers=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides, writing the run under ``tmp_path``."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            # An explicit group choice drops the tiny overrides of that group.
            chosen = {o.split("=")[0] for o in overrides if "." not in o.split("=")[0]}
            extra = [o for o in TINY if o.split("=")[0].split(".")[0] not in chosen] if tiny else []
            return compose(
                config_name="train", overrides=[*extra, f"run_dir={tmp_path}", *overrides]
            )

    return _make


def fashion_mnist_available() -> bool:
    root = fashion_mnist_root(None)
    return (root / "train-images-idx3-ubyte.gz").is_file() or (root / "raw").is_dir()


requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available() and os.environ.get("MOCOQ_REQUIRE_REAL_DATA") != "1",
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
