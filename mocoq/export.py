"""``mocoq-export``: hand a trained backbone to other code as a plain state dict.

Usage::

    mocoq-export checkpoint=outputs/2026-01-05/10-00-00          # the run's checkpoints/last.ckpt
    mocoq-export checkpoint=run/checkpoints/epoch199.ckpt output=r18_cifar.pt
    mocoq-export checkpoint=run encoder=key                        # the EMA (key) encoder

Two files are written, each atomically:

* the weights: ``torch.save`` of the backbone's own state dict (a dict of tensors, no prefix,
  no classifier), readable with ``torch.load(path, weights_only=True)``. A mocoq ResNet
  (``backbone=resnet18/34/50``) is torchvision's ResNet with ``fc`` removed, so the keys are
  torchvision's: the weights load with ``load_state_dict(strict=True)`` into
  ``torchvision.models.resnet18()`` once ``model.fc = nn.Identity()`` (and, for the small-image
  stem, ``model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity()``).
  A :class:`~mocoq.backbones.SmallResNet` loads into ``SmallResNet(**arguments)``, any other
  backbone into what its config builds;
* the JSON sidecar (same stem, ``.json``): the architecture (backbone config, feature dimension,
  image size, channels, normalisation; for ResNets the torchvision code that takes the weights),
  the source checkpoint and step, and the full training config.

``mocoq.eval.checkpoint.load_encoder(<weights>)`` loads the pair back; ``mocoq-knn`` and
``mocoq-linear`` take it as ``checkpoint=<weights>``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import hydra
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mocoq.backbones import TORCHVISION_RESNETS
from mocoq.eval.checkpoint import (
    ENCODERS,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    LoadedEncoder,
    fit_problems,
    load_encoder,
    one_line_errors,
    plain_config,
    require_checkpoint,
    sidecar_path,
    write_atomically,
    write_json,
)
from mocoq.train import CONFIG_DIR, ConfigError

_FAMILIES = {
    "mocoq.backbones.torchvision_resnet": "torchvision_resnet",
    "mocoq.backbones.SmallResNet": "small_resnet",
    "mocoq.backbones.torchvision_backbone": "torchvision",
}


def _resolved(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def architecture(encoder: LoadedEncoder) -> dict[str, Any]:
    """What a user needs to rebuild the backbone and feed it: its config (resolved), family,
    feature dimension F, and the images it was trained on (side, channels, mean, std)."""
    cfg = encoder.config
    backbone = _resolved(cfg.backbone)
    dataset = cfg.get("dataset")
    data = _resolved(dataset) if isinstance(dataset, DictConfig) else {}
    described: dict[str, Any] = {
        "backbone": backbone,
        "family": _FAMILIES.get(str(backbone.get("_target_")), "other"),
        "feature_dim": encoder.feature_dim,
        "image_size": data.get("image_size"),
        "channels": data.get("channels"),
        "mean": data.get("mean"),
        "std": data.get("std"),
        "eval_resize": data.get("eval_resize"),
    }
    recipe = torchvision_recipe(backbone)
    if recipe is not None:
        described["torchvision"] = recipe
    return described


def _resnet_stem(backbone: dict[str, Any]) -> tuple[str, int, bool]:
    return (
        str(backbone.get("name", "resnet18")),
        int(backbone.get("in_channels", 3)),
        bool(backbone.get("small_image_stem", False)),
    )


def torchvision_recipe(backbone: dict[str, Any]) -> dict[str, Any] | None:
    """For a ``mocoq.backbones.torchvision_resnet`` config: the torchvision model name and the
    lines that make ``torchvision.models.<name>()`` take the exported weights strictly (the
    stem, when it is not torchvision's, and ``fc`` removed); None for other backbones."""
    if backbone.get("_target_") != "mocoq.backbones.torchvision_resnet":
        return None
    name, in_channels, small_image_stem = _resnet_stem(backbone)
    if name not in TORCHVISION_RESNETS:
        return None
    lines = [f"model = torchvision.models.{name}()"]
    if small_image_stem:
        lines.append(f"model.conv1 = nn.Conv2d({in_channels}, 64, 3, 1, 1, bias=False)")
        lines.append("model.maxpool = nn.Identity()")
    elif in_channels != 3:
        lines.append(f"model.conv1 = nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)")
    lines.append("model.fc = nn.Identity()  # features (N, F) out; or your own head")
    lines.append("model.load_state_dict(torch.load(path, weights_only=True))")
    return {"model": name, "code": lines}


def torchvision_resnet_for(backbone: dict[str, Any], device: str = "cpu") -> nn.Module:
    """``torchvision.models.<name>()`` changed as :func:`torchvision_recipe` says (on
    ``device``; ``meta`` builds it without memory, to compare state-dict keys and shapes)."""
    name, in_channels, small_image_stem = _resnet_stem(backbone)
    with torch.device(device):
        model = getattr(torchvision.models, name)()
        if small_image_stem:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        model.fc = nn.Identity()
    return model


def backbone_weights(encoder: LoadedEncoder, which: str = "query") -> dict[str, Tensor]:
    """The state dict of the ``query`` or ``key`` backbone: contiguous (NCHW) copies."""
    if which not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {which!r}")
    module = encoder.backbone if which == "query" else encoder.key_backbone
    if module is None:
        raise ConfigError("the key encoder was not loaded: load_encoder(key_encoder=True)")
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def default_output(source: Path, which: str) -> Path:
    """``<checkpoint folder>/<checkpoint stem>_backbone.pt`` (``_key_backbone.pt``)."""
    return source.with_name(f"{source.stem}_{'key_' if which == 'key' else ''}backbone.pt")


def export_backbone(
    encoder: LoadedEncoder, output: str | Path | None = None, which: str = "query"
) -> tuple[Path, dict[str, Any]]:
    """Write the ``which`` backbone of a loaded checkpoint and its sidecar.

    Args:
        encoder: from :func:`~mocoq.eval.checkpoint.load_encoder` (with ``key_encoder=True``
            for ``which="key"``).
        output: the weights file; None: :func:`default_output`. The sidecar goes beside it.
        which: ``query`` (the trained encoder, the one MoCo evaluates) or ``key`` (its EMA).

    Returns:
        The weights file written and the sidecar's content.
    """
    if encoder.kind != "checkpoint":
        raise ConfigError(f"{encoder.source} is already an exported backbone: nothing to export")
    file = Path(output).expanduser() if output else default_output(encoder.source, which)
    if file.suffix in (".json", ".ckpt"):
        raise ConfigError(
            f"output={file} ends in {file.suffix}: name the weights file .pt (the sidecar is "
            "the .json beside it; .ckpt is for training checkpoints)"
        )
    if file.resolve() == encoder.source.resolve():
        raise ConfigError(f"output={file} is the checkpoint itself: choose another file")
    weights = backbone_weights(encoder, which)
    described = architecture(encoder)
    if "torchvision" in described:
        reference = torchvision_resnet_for(described["backbone"], device="meta")
        problems = fit_problems(reference, weights)
        if problems is not None:  # the recipe would not load these weights: a mocoq bug
            raise RuntimeError(f"the exported keys are not torchvision's: {problems}")
    sidecar = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "weights": file.name,
        "encoder": which,
        "architecture": described,
        "source": {
            "checkpoint": str(encoder.source.resolve()),
            "global_step": encoder.step,
            "epoch": encoder.epoch,
            "config": str(encoder.config_path) if encoder.config_path else None,
        },
        "mocoq_version": _version(),
        "config": plain_config(encoder.config),
    }
    write_atomically(file, lambda temporary: torch.save(weights, temporary))
    write_json(sidecar_path(file), sidecar)
    return file, sidecar


def _version() -> str | None:
    try:
        return importlib.metadata.version("mocoq")
    except importlib.metadata.PackageNotFoundError:
        return None


def format_report(sidecar: dict[str, Any], weights: Path) -> str:
    """What was written and how to load it."""
    arch = sidecar["architecture"]
    source = sidecar["source"]
    name = arch["backbone"].get("name") or str(arch["backbone"].get("_target_", "")).split(".")[-1]
    lines = [
        f"Exported the {sidecar['encoder']} backbone of {source['checkpoint']} "
        f"(step {source['global_step']}): {name}, {arch['feature_dim']}-d features, "
        f"{arch['channels']}-channel {arch['image_size']} px images",
        f"  weights : {weights}",
        f"  sidecar : {sidecar_path(weights)}",
    ]
    recipe = arch.get("torchvision")
    if recipe is not None:
        lines.append("In torchvision (import torch, torchvision; from torch import nn):")
        lines += [f"  {line}".replace("(path,", f"({str(weights)!r},") for line in recipe["code"]]
    lines.append(f"In mocoq: mocoq.eval.checkpoint.load_encoder({str(weights)!r}).backbone")
    return "\n".join(lines)


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Export with a composed ``conf/export.yaml``; prints the report, returns the sidecar."""
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {cfg.encoder!r}")
    source = require_checkpoint(cfg, "mocoq-export")
    encoder = load_encoder(source, cfg.get("config"), key_encoder=cfg.encoder == "key")
    weights, sidecar = export_backbone(encoder, cfg.get("output"), cfg.encoder)
    print(format_report(sidecar, weights))
    return sidecar


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def _main(cfg: DictConfig) -> None:
    with one_line_errors("mocoq-export"):
        run_export(cfg)


def main() -> None:
    """Entry point of ``mocoq-export``."""
    _main()


if __name__ == "__main__":
    main()
