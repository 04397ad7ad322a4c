"""The online linear probe: learns from the clean view (or, without one, from the detached
augmented features), never moves the encoder, skips unlabelled rows, lives in the checkpoint
and resumes; old checkpoints still load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from mocoq.module import MoCoModule
from mocoq.train import run

from conftest import tiny_module


class SeparablePairs(Dataset[Any]):
    """Two noisy views of images whose class sets the sign of their mean brightness: linearly
    separable in the features of even a random encoder. Fixed, so every run sees the same."""

    def __init__(self, n: int = 48, unlabelled: bool = False) -> None:
        generator = torch.Generator().manual_seed(3)
        self.targets = torch.arange(n) % 2
        base = (2.0 * self.targets - 1.0).view(n, 1, 1, 1).expand(n, 1, 12, 12)
        self.view_a = base + 0.3 * torch.randn(n, 1, 12, 12, generator=generator)
        self.view_b = base + 0.3 * torch.randn(n, 1, 12, 12, generator=generator)
        self.unlabelled = unlabelled

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        target = -1 if self.unlabelled else int(self.targets[index])
        return (self.view_a[index], self.view_b[index]), target


class CleanTriples(Dataset[Any]):
    """Augmented views that are pure noise (no class in them) and a clean view whose mean
    brightness's sign is the class: only a probe on the clean view can learn the classes."""

    def __init__(self, n: int = 48) -> None:
        generator = torch.Generator().manual_seed(4)
        self.targets = torch.arange(n) % 2
        self.view_a = torch.randn(n, 1, 12, 12, generator=generator)
        self.view_b = torch.randn(n, 1, 12, 12, generator=generator)
        base = (2.0 * self.targets - 1.0).view(n, 1, 1, 1).expand(n, 1, 12, 12)
        self.clean = base + 0.3 * torch.randn(n, 1, 12, 12, generator=generator)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        views = (self.view_a[index], self.view_b[index], self.clean[index])
        return views, int(self.targets[index])


def fit(
    module: MoCoModule,
    tmp_path: Path,
    epochs: int,
    ckpt_path: str | None = None,
    data: Dataset[Any] | None = None,
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    loader = DataLoader(data or SeparablePairs(), batch_size=8, drop_last=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def probe_module(**kwargs: Any) -> MoCoModule:
    torch.manual_seed(0)
    return tiny_module(online_probe=True, probe_num_classes=2, probe_lr=0.5, **kwargs)


def test_probe_learns_separable_data_on_clean_features(tmp_path: Path) -> None:
    module = probe_module()
    data = SeparablePairs()
    assert module.probe is not None
    fit(module, tmp_path, epochs=5)
    module.eval()
    with torch.no_grad():
        logits = module.probe(module(data.view_a))
    accuracy = (logits.argmax(dim=1) == data.targets).float().mean().item()
    assert accuracy > 0.95
    assert module._probe_sums is not None  # logged from the decayed sums
    assert float(module._probe_sums[1] / module._probe_sums[2]) > 0.9


def test_probe_learns_from_the_clean_view_when_the_batch_has_one(tmp_path: Path) -> None:
    module = probe_module()
    data = CleanTriples()
    logged: dict[str, list[float]] = {}
    original = module.log
    module.log = lambda name, value, **kw: (  # type: ignore[method-assign]
        logged.setdefault(name, []).append(float(value)),
        original(name, value, **kw),
    )[1]
    fit(module, tmp_path, epochs=6, data=data)
    assert module.probe is not None
    with torch.no_grad():
        clean_logits = module.probe(module.clean_features(data.clean))
        noise_logits = module.probe(module.clean_features(data.view_a))
    accuracy = (clean_logits.argmax(dim=1) == data.targets).float().mean().item()
    assert accuracy > 0.95  # the augmented views hold no class: it learnt from the clean ones
    assert (noise_logits.argmax(dim=1) == data.targets).float().mean().item() < 0.8
    assert "probe/top1" in logged and "probe/loss" in logged
    assert not any(name.startswith("probe/aug_") for name in logged)
    assert logged["probe/top1"][-1] > 0.9


def test_clean_features_are_eval_mode_features_and_leave_batchnorm_alone() -> None:
    module = probe_module(key_bn="split", bn_splits=2)
    module.train()
    images = torch.randn(8, 1, 12, 12) * 3 + 1  # far from the running statistics (0, 1)
    buffers = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    features = module.clean_features(images)
    assert module.backbone.training  # the mode is restored
    for name, value in module.backbone.state_dict().items():  # running stats untouched
        assert torch.equal(value, buffers[name]), name
    module.backbone.eval()
    with torch.no_grad():
        assert torch.allclose(features, module.backbone(images))
    module.backbone.train()
    with torch.no_grad():
        assert not torch.allclose(features, module.backbone(images), atol=1e-3)  # batch stats
    assert not features.requires_grad


def test_probe_gradients_never_reach_the_encoder(tmp_path: Path) -> None:
    with_probe = probe_module()
    torch.manual_seed(0)
    without = tiny_module()
    fit(with_probe, tmp_path, epochs=1)
    fit(without, tmp_path, epochs=1)
    # Same initial encoders (the probe is created after everything else), same data: the probe
    # changes nothing in the encoders, bit for bit.
    for name, value in without.state_dict().items():
        assert torch.equal(with_probe.state_dict()[name], value), name


def test_probe_optimizer_group_has_its_lr_and_no_weight_decay(tmp_path: Path) -> None:
    module = probe_module()
    trainer = fit(module, tmp_path, epochs=1)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2
    assert module.probe is not None
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in module.probe.parameters()]
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.5
    assert groups[0]["lr"] == 0.1  # the encoder's, from the optimizer factory


def test_unlabelled_rows_add_no_probe_loss() -> None:
    module = probe_module()
    assert module.probe is not None
    features = torch.randn(4, module.feature_dim)
    loss, sums = module._probe_step(features, torch.full((4,), -1))
    assert loss.item() == 0.0 and sums.tolist() == [0.0, 0.0, 0.0]
    loss.backward()
    assert module.probe.weight.grad is not None and not module.probe.weight.grad.any()
    # Mixed: only the labelled rows count.
    targets = torch.tensor([0, -1, 1, -1])
    loss, sums = module._probe_step(features, targets)
    logits = module.probe(features[[0, 2]])
    expected = torch.nn.functional.cross_entropy(logits, targets[[0, 2]])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and sums[2].item() == 2.0


def test_a_run_without_labels_trains_and_logs_zero(tmp_path: Path) -> None:
    module = probe_module()
    before = module.probe.weight.clone() if module.probe is not None else None
    fit(module, tmp_path, epochs=1, data=SeparablePairs(unlabelled=True))
    assert module.probe is not None and torch.equal(module.probe.weight, before)
    assert module._probe_sums is not None and module._probe_sums.tolist() == [0.0, 0.0, 0.0]


def test_labels_beyond_the_classes_are_a_clear_error() -> None:
    module = probe_module()
    with pytest.raises(ValueError, match="probe_num_classes"):
        module._probe_step(torch.randn(2, module.feature_dim), torch.tensor([0, 5]))


def test_probe_is_checkpointed_and_resumes_exactly(tmp_path: Path) -> None:
    straight = probe_module()
    fit(straight, tmp_path / "a", epochs=4)

    first = probe_module()
    trainer = fit(first, tmp_path / "b", epochs=2)
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    assert {"probe.weight", "probe.bias"} <= saved["state_dict"].keys()
    groups = saved["optimizer_states"][0]["param_groups"]
    assert len(groups) == 2
    assert all(
        "momentum_buffer" in saved["optimizer_states"][0]["state"][i] for i in groups[1]["params"]
    )

    resumed = probe_module()
    assert resumed.probe is not None
    with torch.no_grad():
        resumed.probe.weight.add_(1.0)  # overwritten by the checkpoint's
    steps: list[int] = []
    original = resumed.training_step
    resumed.training_step = lambda *a: (steps.append(1), original(*a))[1]  # type: ignore[method-assign]
    fit(resumed, tmp_path / "b", epochs=4, ckpt_path=str(checkpoint))
    assert len(steps) == 12  # epochs 3 and 4 only: it continued from the checkpoint
    assert straight.probe is not None and resumed.probe is not None
    assert torch.equal(resumed.probe.weight, straight.probe.weight)
    assert torch.equal(resumed.probe.bias, straight.probe.bias)


def test_checkpoints_load_with_the_probe_switched_either_way(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = tiny_module()
    plain_state = plain.state_dict()
    # A checkpoint from before the probe (and before the queue's key ages) loads strictly into
    # a module without the probe ...
    old = {k: v for k, v in plain_state.items() if k != "queue.written_at"}
    tiny_module().load_state_dict(old)
    # ... and into one with it (the probe keeps its fresh initialisation): init_weights.
    probed = probe_module()
    assert probed.probe is not None
    fresh = probed.probe.weight.clone()
    probed.load_state_dict(old)
    assert torch.equal(probed.probe.weight, fresh)
    assert torch.equal(probed.backbone.conv1.weight, plain.backbone.conv1.weight)
    # A probed state loads into a module without the probe (the probe is dropped).
    tiny_module().load_state_dict(probed.state_dict())

    # Resuming a run with the probe switched is refused with the fix named.
    trainer = fit(tiny_module(), tmp_path, epochs=1)
    checkpoint = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"model\.online_probe=false"):
        fit(probe_module(), tmp_path, epochs=2, ckpt_path=str(checkpoint))


def test_fit_from_the_config_logs_the_probe_and_resumes(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    overrides = ("model.online_probe=true", "~callbacks.knn", "callbacks.projector.max_images=64")
    first = run(make_cfg(*overrides))
    assert first["steps"] == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["state_dict"]["probe.weight"].shape == (10, 32)  # synthetic: 10 classes
    assert state["hyper_parameters"]["online_probe"] is True

    resumed = run(make_cfg(*overrides, "trainer.max_epochs=2", "ckpt_path=last"))
    assert resumed["steps"] == 8
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    # The data module adds the clean view: the probe learns from it and logs probe/*.
    assert len(logged["probe/loss"]) == 8 and len(logged["probe/top1"]) == 8
    assert "probe/aug_top1" not in logged
    assert [e.step for e in logged["probe/val_top1"]] == [4, 8]  # at the end of each fit
    # The resumed fit's projector entry is listed beside the first fit's.
    config = (tmp_path / "tensorboard" / "projector_config.pbtxt").read_text()
    assert config.count("tensor_name:") == 2
    assert '"val_backbone:00004"' in config and '"val_backbone:00008"' in config
    assert all(0.0 <= e.value <= 1.0 for e in logged["probe/top1"])
