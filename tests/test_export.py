"""mocoq-export and the checkpoint loader: round trips into torchvision and mocoq, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mocoq.backbones import SmallResNet, torchvision_resnet
from mocoq.eval.checkpoint import fit_problems, load_encoder
from mocoq.export import export_backbone, run_export, torchvision_resnet_for
from mocoq.module import MoCoModule
from mocoq.norm import SplitBatchNorm2d
from mocoq.train import CONFIG_DIR, ConfigError, build


def save_run(
    make_cfg: Callable[..., DictConfig], run_dir: Path, *overrides: str, step: int = 7
) -> tuple[Path, MoCoModule, DictConfig]:
    """A mocoq checkpoint in Lightning's layout, with non-trivial BatchNorm statistics and a key
    encoder that differs from the query one, and the run's ``.hydra/config.yaml`` beside it."""
    cfg = make_cfg("model.key_bn=split", *overrides)
    _, module, _ = build(cfg)
    module.configure_speed()  # channels-last weights, as in a run
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.copy_(torch.rand(layer.num_features, generator=generator) - 0.5)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
                layer.weight.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
        for parameter in module.key_backbone.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "global_step": step, "epoch": 1}, checkpoint)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return checkpoint, module.eval(), cfg


def export_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=list(overrides))


def images(channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_resnet18_export_loads_strictly_into_torchvision_with_the_small_stem(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, module, cfg = save_run(make_cfg, tmp_path / "run", "backbone=resnet18")
    assert any(isinstance(m, SplitBatchNorm2d) for m in module.backbone.modules())
    sidecar = run_export(export_cfg(f"checkpoint={tmp_path / 'run'}"))
    weights = checkpoint.with_name("last_backbone.pt")
    printed = capsys.readouterr().out
    assert "model.maxpool = nn.Identity()" in printed and str(weights) in printed

    # The documented recipe: torchvision's ResNet-18, the small-image stem, no classifier.
    model = torchvision.models.resnet18()
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    model.load_state_dict(torch.load(weights, weights_only=True))  # strict
    model.eval()
    batch = images()
    with torch.no_grad():
        expected = module.backbone(batch.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(model(batch), expected, atol=1e-5)
        assert torch.allclose(load_encoder(weights).backbone(batch), expected, atol=1e-5)

    written = json.loads(weights.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(sidecar))
    arch = written["architecture"]
    assert arch["family"] == "torchvision_resnet" and arch["feature_dim"] == 512
    assert (arch["image_size"], arch["channels"]) == (16, 3)
    assert arch["mean"] == list(cfg.dataset.mean) and arch["std"] == list(cfg.dataset.std)
    assert arch["torchvision"]["model"] == "resnet18"
    assert "model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in arch["torchvision"]["code"]
    assert written["source"] == {
        "checkpoint": str(checkpoint.resolve()),
        "global_step": 7,
        "epoch": 1,
        "config": str(tmp_path / "run" / ".hydra" / "config.yaml"),
    }
    assert written["encoder"] == "query"
    assert written["config"]["model"]["queue_size"] == 64
    assert written["config"]["backbone"]["in_channels"] == 3  # resolved
    assert not list(weights.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_key_encoder_export_holds_the_ema_weights(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    checkpoint, module, _ = save_run(make_cfg, tmp_path / "run")
    loaded = load_encoder(checkpoint, key_encoder=True)
    weights, sidecar = export_backbone(loaded, tmp_path / "key.pt", which="key")
    assert sidecar["encoder"] == "key"
    exported = load_encoder(weights)
    assert exported.kind == "export" and exported.encoder == "key" and exported.step == 7
    batch = images(channels=3)
    with torch.no_grad():
        key_features = module.key_backbone(batch)
        assert torch.allclose(exported.backbone(batch), key_features, atol=1e-5)
        assert not torch.allclose(module.backbone(batch), key_features, atol=1e-3)
    with pytest.raises(ConfigError, match="encoder=key applies to checkpoints"):
        exported.extractor(encoder="key")


def test_small_resnet_exports_its_own_state_dict(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    checkpoint, module, _ = save_run(
        make_cfg, tmp_path / "run", "dataset.channels=1", "dataset.mean=[0.5]", "dataset.std=[0.25]"
    )
    weights, sidecar = export_backbone(load_encoder(checkpoint), tmp_path / "small.pt")
    arguments = {k: v for k, v in sidecar["architecture"]["backbone"].items() if k != "_target_"}
    backbone = SmallResNet(**arguments)
    backbone.load_state_dict(torch.load(weights, weights_only=True))  # strict
    backbone.eval()
    assert sidecar["architecture"]["family"] == "small_resnet"
    assert "torchvision" not in sidecar["architecture"]
    batch = images(channels=1)
    with torch.no_grad():
        assert torch.allclose(backbone(batch), module.backbone(batch), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("channels,small_stem", [(3, True), (3, False), (1, False)])
def test_resnet_keys_are_torchvisions(name: str, channels: int, small_stem: bool) -> None:
    with torch.device("meta"):
        ours = torchvision_resnet(name, in_channels=channels, small_image_stem=small_stem)
    config = {"name": name, "in_channels": channels, "small_image_stem": small_stem}
    reference = torchvision_resnet_for(config, device="meta")
    assert fit_problems(reference, ours.state_dict()) is None


def test_loader_errors_name_what_to_fix(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    checkpoint, _, cfg = save_run(make_cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"checkpoint=.*nope.ckpt does not exist"):
        load_encoder(tmp_path / "nope.ckpt")
    with pytest.raises(ConfigError, match=r"folder without checkpoints/last\.ckpt"):
        load_encoder(tmp_path)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        load_encoder(truncated)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ConfigError, match="holds no 'state_dict'"):
        load_encoder(other)

    alone = tmp_path / "alone" / "last.ckpt"
    alone.parent.mkdir()
    alone.write_bytes(checkpoint.read_bytes())
    with pytest.raises(ConfigError, match=r"\.hydra/config\.yaml is missing.*config=") as error:
        load_encoder(alone)
    assert "\n" not in str(error.value)
    assert load_encoder(alone, config=tmp_path / "run" / ".hydra" / "config.yaml").step == 7

    narrow = OmegaConf.merge(cfg, {"backbone": {"widths": [4, 8, 8, 16]}})
    OmegaConf.save(narrow, tmp_path / "narrow.yaml")
    with pytest.raises(ConfigError, match=r"do not fit the backbone.*other shapes.*config="):
        load_encoder(checkpoint, config=tmp_path / "narrow.yaml")

    weights, _ = export_backbone(load_encoder(checkpoint), tmp_path / "b.pt")
    weights.with_suffix(".json").unlink()
    with pytest.raises(ConfigError, match=r"holds no 'state_dict'.*b\.json"):
        load_encoder(weights)


def test_cli_exports_and_reports_errors_in_one_line(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    save_run(make_cfg, tmp_path / "run")
    command = [sys.executable, "-m", "mocoq.export", f"checkpoint={tmp_path / 'run'}"]
    done = subprocess.run(
        [*command, f"output={tmp_path / 'out.pt'}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.pt").is_file() and (tmp_path / "out.json").is_file()
    assert "mocoq.eval.checkpoint.load_encoder" in done.stdout
    assert not (tmp_path / ".hydra").exists()  # the export writes no run folder

    failed = subprocess.run(
        [*command, "output=out.json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert failed.returncode == 2
    assert "mocoq-export: error: output=out.json ends in .json" in failed.stderr
    assert "Traceback" not in failed.stderr
