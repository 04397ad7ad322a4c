"""The recipes in conf/experiment/ carry exactly the published hyper-parameters, as built.

Each published recipe is written out below from its source (the argument defaults and transforms
of the official code), and the test compares it with what ``mocoq.train.build`` constructs from
the composed config: the optimizer's parameter group after learning-rate scaling, the schedule,
the module's queue, momentum, temperature and BatchNorm mode, the head's layers, the backbone's
stem, the data module's augmentation and normalisation, and the kNN monitor. A recipe file may
only change keys that exist (a misplaced key would silently do nothing), and every value in it
says why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mocoq.callbacks import KNNMonitor
from mocoq.data.batched import BatchedMoCoAugmentation
from mocoq.data.datamodule import MoCoDataModule
from mocoq.module import MoCoModule
from mocoq.train import CONFIG_DIR, build

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
ON_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]

# facebookresearch/moco, colab/moco_cifar10_demo.ipynb: its argparse defaults and transforms.
CIFAR10_DEMO: dict[str, Any] = {
    "global_batch": 512,
    "lr": 0.06,
    "weight_decay": 5e-4,
    "momentum": 0.9,
    "epochs": 200,
    "queue_size": 4096,
    "ema_momentum": 0.99,
    "temperature": 0.1,
    "symmetric": False,
    "key_bn": "split",
    "bn_splits": 8,
    "head": [(512, 128)],  # ModelBase: resnet18 with fc = Linear(512, 128)
    "stem": (3, 1, False),  # conv1 3x3 stride 1, max-pool removed
    "feature_dim": 512,
    "crop_scale": (0.08, 1.0),  # RandomResizedCrop(32): torchvision's default scale
    "jitter": (0.4, 0.4, 0.4, 0.1),
    "jitter_prob": 0.8,
    "grayscale_prob": 0.2,
    "blur_prob": 0.0,
    "flip_prob": 0.5,
    "image_size": 32,
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2023, 0.1994, 0.2010],
    "knn": (200, 0.1),
}
# facebookresearch/moco main_moco.py with --mlp --aug-plus --cos, 8 GPUs x 32 (MoCo v2, 200 ep).
IMAGENET_MOCOV2: dict[str, Any] = {
    "global_batch": 256,
    "lr": 0.03,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "epochs": 200,
    "queue_size": 65536,
    "ema_momentum": 0.999,
    "temperature": 0.2,
    "symmetric": False,
    "key_bn": "shuffle",
    "bn_splits": None,
    "head": [(2048, 2048), (2048, 128)],  # the fc replaced by Linear, ReLU, Linear
    "stem": (7, 2, True),  # the standard ImageNet stem with max-pool
    "feature_dim": 2048,
    "crop_scale": (0.2, 1.0),
    "jitter": (0.4, 0.4, 0.4, 0.1),
    "jitter_prob": 0.8,
    "grayscale_prob": 0.2,
    "blur_prob": 0.5,
    "blur_sigma": (0.1, 2.0),
    "flip_prob": 0.5,
    "image_size": 224,
    "eval_resize": 256,  # val: Resize(256), CenterCrop(224)
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# main_lincls.py: the linear protocol of the 67.5 result.
IMAGENET_LINEAR: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 30.0,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "lr_schedule": "step",
    "milestones": [60, 80],
    "gamma": 0.1,
    "augmentation": True,
    "crop_scale": [0.08, 1.0],
}


def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _built(experiment: str, tmp_path: Path, *extra: str) -> tuple[DictConfig, Any, Any, Any]:
    cfg = _compose(
        f"experiment={experiment}",
        f"run_dir={tmp_path}",
        f"dataset.root={tmp_path}",
        *ON_CPU,
        *extra,
    )
    datamodule, model, trainer = build(cfg)
    return cfg, datamodule, model, trainer


def check_recipe(
    published: dict[str, Any],
    cfg: DictConfig,
    datamodule: MoCoDataModule,
    model: MoCoModule,
    trainer: Any,
) -> None:
    """Compare what ``build`` made with the published recipe, value by value."""
    p = published
    devices = int(trainer.num_devices) * int(trainer.num_nodes)
    assert datamodule.batch_size * devices == p["global_batch"]
    group = model.optimizer_factory(model.parameters()).param_groups[0]
    assert group["lr"] == pytest.approx(p["lr"])  # after scaling by the global batch
    assert group["weight_decay"] == pytest.approx(p["weight_decay"])
    assert group["momentum"] == pytest.approx(p["momentum"])
    assert trainer.max_epochs == p["epochs"]
    schedule = model.lr_schedule
    assert schedule is not None
    total = 1000
    assert schedule(0, total, 10) == pytest.approx(1.0)  # no warmup
    assert schedule(total // 2, total, 10) == pytest.approx(0.5, abs=1e-3)  # cosine
    assert schedule(total, total, 10) == pytest.approx(0.0, abs=1e-6)  # to 0

    assert model.queue.keys.shape[0] == p["queue_size"]
    assert model.ema_momentum == p["ema_momentum"] and model.ema_momentum_schedule == "constant"
    assert model.temperature == p["temperature"] and model.symmetric is p["symmetric"]
    assert model.key_bn == p["key_bn"]
    if p["bn_splits"] is not None:
        assert model.bn_splits == p["bn_splits"]
    linears = [
        (m.in_features, m.out_features) for m in model.head.modules() if isinstance(m, nn.Linear)
    ]
    assert linears == p["head"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.head.modules())

    conv1 = model.backbone.conv1
    kernel, stride, max_pool = p["stem"]
    assert conv1.kernel_size == (kernel, kernel) and conv1.stride == (stride, stride)
    assert isinstance(model.backbone.maxpool, nn.MaxPool2d) is max_pool
    assert model.feature_dim == p["feature_dim"]

    augment = BatchedMoCoAugmentation.from_transform(datamodule.augment)
    assert augment.image_size == p["image_size"] == datamodule.image_size
    assert augment.crop_scale == pytest.approx(p["crop_scale"])
    assert augment.jitter == pytest.approx(p["jitter"])
    assert augment.jitter_prob == p["jitter_prob"]
    assert augment.grayscale_prob == p["grayscale_prob"]
    assert augment.blur_prob == p["blur_prob"]
    if p["blur_prob"]:
        assert augment.blur_sigma == pytest.approx(p["blur_sigma"])
    assert augment.flip_prob == p["flip_prob"]
    assert augment.mean == pytest.approx(p["mean"]) and augment.std == pytest.approx(p["std"])
    if "eval_resize" in p:
        assert datamodule.eval_transform.resize == p["eval_resize"]
    if "knn" in p:
        monitor = next(c for c in trainer.callbacks if isinstance(c, KNNMonitor))
        assert (monitor.k, monitor.temperature) == p["knn"]


def test_cifar10_demo_asymmetric(tmp_path: Path) -> None:
    cfg, datamodule, model, trainer = _built("mocov2_r18_cifar10_200ep", tmp_path)
    check_recipe(CIFAR10_DEMO, cfg, datamodule, model, trainer)


@pytest.mark.parametrize("epochs", [200, 400, 800])
def test_cifar10_demo_symmetric_at_every_published_length(epochs: int, tmp_path: Path) -> None:
    cfg, datamodule, model, trainer = _built(
        "mocov2plus_r18_cifar10_800ep", tmp_path, f"trainer.max_epochs={epochs}"
    )
    check_recipe(
        {**CIFAR10_DEMO, "symmetric": True, "epochs": epochs}, cfg, datamodule, model, trainer
    )


def test_imagenet_mocov2(tmp_path: Path) -> None:
    cfg, datamodule, model, trainer = _built("mocov2_r50_imagenet_200ep", tmp_path)
    assert trainer.num_devices == 8
    check_recipe(IMAGENET_MOCOV2, cfg, datamodule, model, trainer)


def test_imagenet_linear_protocol() -> None:
    cfg = _compose("linear_protocol=moco_imagenet", "checkpoint=x", config_name="linear")
    assert {key: cfg[key] for key in IMAGENET_LINEAR} == IMAGENET_LINEAR
    assert cfg.baseline is None and cfg.encoder == "query"


def test_a_checker_that_would_pass_anything_is_not_what_runs(tmp_path: Path) -> None:
    """The checker fails on one changed value (it compares, it does not just run)."""
    cfg, datamodule, model, trainer = _built("mocov2_r18_cifar10_200ep", tmp_path)
    for key, wrong in (("crop_scale", (0.2, 1.0)), ("std", [0.247, 0.2435, 0.2616]), ("lr", 0.03)):
        with pytest.raises(AssertionError):
            check_recipe({**CIFAR10_DEMO, key: wrong}, cfg, datamodule, model, trainer)


def _leaves(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_recipe_changes_only_keys_that_exist(experiment: str) -> None:
    """Every key an experiment sets is one the config has without it (same group choices): a key
    under the wrong parent would be added silently and change nothing."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        full = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        choices = {
            group: choice
            for group, choice in full.hydra.runtime.choices.items()
            if "/" not in group and group != "experiment" and choice is not None
        }
        base = compose(
            "train", overrides=[f"{group}={choice}" for group, choice in choices.items()]
        )
    missing = keys_missing_from(base, Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml")
    assert not missing, f"{experiment} sets keys the config does not have: {missing}"


def keys_missing_from(base: DictConfig, recipe: Path) -> list[str]:
    """The leaf keys ``recipe`` sets (its defaults list aside) that ``base`` does not have."""
    raw = OmegaConf.to_container(OmegaConf.load(recipe))
    assert isinstance(raw, dict)
    raw.pop("defaults", None)
    return [
        key for key in _leaves(raw) if OmegaConf.select(base, key, default="<none>") == "<none>"
    ]


def test_the_key_check_finds_a_key_under_the_wrong_parent(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    recipe = tmp_path / "misplaced.yaml"
    recipe.write_text(
        "# @package _global_\nlr_scaling:\n  reference_batch_size: 512\n  weight_decay: 1.0\n"
    )
    assert keys_missing_from(make_cfg(tiny=False), recipe) == ["lr_scaling.weight_decay"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_value_of_a_recipe_says_why(experiment: str) -> None:
    text = (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    value_lines = [
        line
        for line in text.splitlines()
        if re.match(r"^\s+[\w]+:\s*[^\s#]", line) and "override" not in line
    ]
    assert value_lines
    bare = [line.strip() for line in value_lines if "#" not in line]
    assert not bare, f"values without a reason in {experiment}: {bare}"
