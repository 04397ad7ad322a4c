"""Every file in conf/ composes and instantiates; presets carry the published hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from mocoq.backbones import SmallResNet
from mocoq.data.datamodule import MoCoDataModule
from mocoq.module import MoCoModule
from mocoq.train import CONFIG_DIR, build, scaled_lr

CONF = Path(CONFIG_DIR)
# conf/hydra/ holds options of Hydra's own groups, composed in their own tests.
# conf/linear_protocol/ belongs to mocoq-linear (tests/test_recipes.py).
GROUPS = sorted(
    p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "linear_protocol")
)
HYDRA_OPTIONS = {"hydra/launcher/slurm.yaml"}  # tests/test_slurm.py
LINEAR_OPTIONS = {"linear_protocol/moco_imagenet.yaml"}  # tests/test_recipes.py
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]
# What a CPU-only test machine must change to instantiate a GPU config (the rest is as written).
ON_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=1"]


def test_every_config_file_belongs_to_a_tested_group() -> None:
    files = {p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")}
    covered = {f"{group}/{option}.yaml" for group, option in OPTIONS} | {"train.yaml"}
    covered |= HYDRA_OPTIONS | LINEAR_OPTIONS
    covered |= {
        "knn.yaml",
        "linear.yaml",
        "export.yaml",
    }  # composed in test_knn_cli, test_linear, test_export
    assert files == covered
    assert {"dataset", "backbone", "method", "augment", "optim", "schedule", "trainer"} <= set(
        GROUPS
    )
    assert {"logger", "callbacks", "experiment", "debug"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_config_option_composes_and_instantiates(
    group: str, option: str, make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    overrides = [f"{group}={option}"]
    if group in ("dataset", "experiment"):
        overrides.append(f"dataset.root={tmp_path}")  # constructing does not read the data
    if group == "dataset":
        overrides.append("dataset.batch_size=16")
    if group == "backbone" and option != "small_resnet":
        overrides.append("dataset.image_size=32")
    cfg = make_cfg(*overrides, *ON_CPU, tiny=group != "experiment")
    datamodule, model, trainer = build(cfg)
    assert isinstance(datamodule, MoCoDataModule)
    assert isinstance(model, MoCoModule)
    assert trainer.max_epochs == cfg.trainer.get("max_epochs", trainer.max_epochs)
    assert model.queue.size == cfg.model.queue_size
    if group == "dataset":
        assert datamodule.channels == cfg.dataset.channels
        assert datamodule.root == str(tmp_path)


def test_the_default_config_is_moco_v2_on_fashion_mnist(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg(*ON_CPU, tiny=False)
    assert cfg.dataset.loader._target_ == "mocoq.data.datasets.fashion_mnist"
    assert cfg.head.num_layers == 2 and cfg.model.temperature == 0.2
    assert cfg.augment.blur_prob == 0.5
    _, model, _ = build(cfg)
    assert isinstance(model.backbone, SmallResNet)
    assert model.backbone.conv1.in_channels == 1


@pytest.mark.parametrize(
    "method,num_layers,temperature,symmetric,jitter_prob",
    [
        ("mocov1", 1, 0.07, False, 1.0),
        ("mocov2", 2, 0.2, False, 0.8),
        ("mocov2plus", 2, 0.2, True, 0.8),
    ],
)
def test_methods_set_head_temperature_symmetry_and_augmentation(
    make_cfg: Callable[..., DictConfig],
    method: str,
    num_layers: int,
    temperature: float,
    symmetric: bool,
    jitter_prob: float,
) -> None:
    cfg = make_cfg(f"method={method}", tiny=False)
    assert cfg.head.num_layers == num_layers
    assert cfg.model.temperature == temperature
    assert cfg.model.symmetric is symmetric
    assert cfg.augment.jitter_prob == jitter_prob


def test_command_line_augment_beats_the_method_default(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("method=mocov2", "augment=mocov1", tiny=False)
    assert cfg.augment.jitter_prob == 1.0


def test_typos_in_keys_fail(make_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigCompositionException, match="queue_sise"):
        make_cfg("model.queue_sise=10")


def test_struct_mode_blocks_reads_of_unknown_keys(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg()
    with pytest.raises((ConfigAttributeError, ConfigKeyError)):
        _ = cfg.model.queue_sise


def test_unknown_group_option_lists_the_choices() -> None:
    with (
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException) as error,
    ):
        compose(config_name="train", overrides=["dataset=imagenette"])
    assert "fashion_mnist" in str(error.value) and "cifar10" in str(error.value)


def test_queue_smaller_than_the_global_batch_is_refused_before_training(
    make_cfg: Callable[..., DictConfig],
) -> None:
    cfg = make_cfg("model.queue_size=8", "dataset.batch_size=16")
    with pytest.raises(ValueError, match=r"model.queue_size=8 is smaller than the 16 keys"):
        build(cfg)
    cfg = make_cfg("model.queue_size=24", "dataset.batch_size=16", "method=mocov2plus")
    with pytest.raises(ValueError, match=r"32 keys.*x 2 views"):
        build(cfg)


def test_built_module_gets_objects_not_configs(make_cfg: Callable[..., DictConfig]) -> None:
    _, model, _ = build(make_cfg())
    optimizer = model.optimizer_factory(model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)
    assert not any(isinstance(v, DictConfig) for v in vars(model).values())


def test_lr_scaling_rules() -> None:
    assert scaled_lr(0.03, 512, 256, "linear") == pytest.approx(0.06)
    assert scaled_lr(0.03, 1024, 256, "sqrt") == pytest.approx(0.06)
    assert scaled_lr(0.03, 1024, 256, "none") == 0.03
    with pytest.raises(ValueError, match=r"lr_scaling\.rule must be one of"):
        scaled_lr(0.03, 256, 256, "cubic")
    with pytest.raises(ValueError, match="reference_batch_size must be positive"):
        scaled_lr(0.03, 256, 0, "linear")


def test_lr_follows_the_global_batch(make_cfg: Callable[..., DictConfig]) -> None:
    def built_lr(*overrides: str) -> float:
        _, model, _ = build(make_cfg("optim.lr=0.1", *overrides))
        return float(model.optimizer_factory(model.parameters()).param_groups[0]["lr"])

    assert built_lr() == pytest.approx(0.1)  # tiny batch 16 = the tests' reference batch
    # Two DDP processes (the trainer is built, nothing is launched) double the global batch.
    two = ["trainer.strategy=ddp", "trainer.devices=2"]
    assert built_lr(*two) == pytest.approx(0.2)
    assert built_lr(*two, "trainer.accumulate_grad_batches=2") == pytest.approx(0.4)
    assert built_lr(*two, "lr_scaling.rule=none") == pytest.approx(0.1)


def test_presets_scale_from_their_published_batch(make_cfg: Callable[..., DictConfig]) -> None:
    imagenet = make_cfg("experiment=mocov2_r50_imagenet_200ep", tiny=False)
    assert imagenet.lr_scaling.rule == "linear" and imagenet.lr_scaling.reference_batch_size == 256
    assert imagenet.model.key_bn == "shuffle"  # the paper's shuffle BN across 8 GPUs
    for name in ("mocov2_r18_cifar10_200ep", "mocov2plus_r18_cifar10_800ep"):
        cifar = make_cfg(f"experiment={name}", tiny=False)
        assert cifar.lr_scaling.reference_batch_size == cifar.dataset.batch_size == 512
    default = make_cfg(tiny=False)
    assert default.model.key_bn == "auto" and default.lr_scaling.reference_batch_size == 256
    assert default.dataset.batch_size == 256  # so the default run uses optim.lr as written
