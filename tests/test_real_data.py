"""Fashion-MNIST, the default dataset: the reader, and a short real fit whose loss falls.

Skipped where the Debian package is missing, except when MOCOQ_REQUIRE_REAL_DATA=1 (set by
.ci/run, which installs it): there a missing dataset fails instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mocoq.data.datasets import fashion_mnist
from mocoq.train import run

from conftest import requires_fashion_mnist


@requires_fashion_mnist
def test_fashion_mnist_from_the_debian_package() -> None:
    train, test = fashion_mnist(None, "train"), fashion_mnist(None, "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.targets), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.targets), torch.full((10,), 1000))
    assert train.classes[9] == "Ankle boot"


@requires_fashion_mnist
def test_short_fit_on_fashion_mnist_lowers_the_loss(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "dataset=fashion_mnist",
        "dataset.batch_size=16",
        "dataset.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=150",
        "trainer.precision=32-true",
        "~callbacks.knn",
    )
    run(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) == 150
    # After the queue holds only real keys (step 4), the loss must clearly fall (by 0.14 to
    # 0.47 over seeds 0-3).
    early, late = sum(loss[4:24]) / 20, sum(loss[-20:]) / 20
    assert late < early - 0.1, (early, late)
