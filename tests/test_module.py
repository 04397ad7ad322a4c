"""MoCoModule: the training step's state changes, EMA placement and checkpointed queue."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from mocoq.loss import info_nce
from mocoq.module import MoCoModule
from mocoq.norm import SplitBatchNorm2d

from conftest import tiny_module


def views(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=generator), torch.randn(
        n, 1, 12, 12, generator=generator
    )


def silence_logging(module: MoCoModule) -> None:
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    module.current_ema_momentum = lambda: module.ema_momentum  # type: ignore[method-assign]


class PairData(TensorDataset):
    """Two fixed random views per item, shaped like the datamodule's output."""

    def __init__(self, n: int = 64) -> None:
        a, b = views(n, seed=1)
        super().__init__(a, b, torch.zeros(n, dtype=torch.long))

    def __getitem__(self, index: int) -> Any:
        a, b, y = super().__getitem__(index)
        return (a, b), y


def fit(module: MoCoModule, steps: int, tmp_path: Path, **trainer_kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(PairData(), batch_size=8, drop_last=True))
    return trainer


def test_step_enqueues_the_new_keys_after_the_loss() -> None:
    torch.manual_seed(0)
    module = tiny_module(queue_size=32)
    silence_logging(module)
    view_a, view_b = views()
    before = module.queue.keys.clone()
    loss = module.training_step(((view_a, view_b), torch.zeros(8)), 0)

    query = module.project(view_a)
    key = module.project_keys(view_b)
    expected, _ = info_nce(query, key, before, module.temperature)  # the queue before the step
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(module.queue.keys[:8], key, atol=1e-6)
    assert torch.equal(module.queue.keys[8:], before[8:])
    assert module.queue.pointer == 8


def test_symmetric_step_reads_one_queue_and_enqueues_once_after() -> None:
    torch.manual_seed(0)
    module = tiny_module(queue_size=32, symmetric=True)
    silence_logging(module)
    calls: list[torch.Tensor] = []
    original = module.queue.enqueue
    module.queue.enqueue = lambda keys: (calls.append(keys.clone()), original(keys))[1]  # type: ignore[method-assign]
    view_a, view_b = views()
    before = module.queue.keys.clone()
    loss = module.training_step(((view_a, view_b), torch.zeros(8)), 0)

    key_a, key_b = module.project_keys(view_a), module.project_keys(view_b)
    loss_ab, _ = info_nce(module.project(view_a), key_b, before, module.temperature)
    loss_ba, _ = info_nce(module.project(view_b), key_a, before, module.temperature)
    assert torch.allclose(loss, loss_ab + loss_ba, atol=1e-5)  # both halves saw `before`
    assert len(calls) == 1  # one enqueue, after both halves
    assert torch.allclose(calls[0], torch.cat([key_b, key_a]), atol=1e-6)
    assert module.queue.pointer == 16


def test_forward_and_projections_do_not_change_state() -> None:
    module = tiny_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    view_a, _ = views()
    module(view_a)
    module.project(view_a)
    module.project_keys(view_a)
    module.eval()
    after = module.state_dict()
    bn_statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(bn_statistics))
    assert torch.equal(before["queue.keys"], after["queue.keys"])


def test_key_backbone_and_head_follow_the_query_by_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(ema_momentum=0.75)
    key_before = {k: v.clone() for k, v in module.key_head.state_dict().items()}
    key_backbone_before = module.key_backbone.conv1.weight.clone()
    fit(module, steps=1, tmp_path=tmp_path)
    for name, value in module.key_head.state_dict().items():
        query_value = module.head.state_dict()[name]
        assert torch.allclose(value, 0.75 * key_before[name] + 0.25 * query_value, atol=1e-6)
        assert not torch.equal(value, key_before[name])  # the head moved
    expected = 0.75 * key_backbone_before + 0.25 * module.backbone.conv1.weight
    assert torch.allclose(module.key_backbone.conv1.weight, expected, atol=1e-6)


def test_ema_runs_once_per_optimizer_step_under_accumulation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(ema_momentum=0.5)
    calls: list[int] = []
    original = module.optimizer_step
    module.optimizer_step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]  # type: ignore[method-assign]
    trainer = fit(module, steps=2, tmp_path=tmp_path, accumulate_grad_batches=3)
    assert trainer.global_step == 2
    assert len(calls) == 2
    assert module.queue.pointer == (6 * 8) % module.queue.size  # every batch enqueued


def test_queue_is_saved_in_and_restored_from_lightning_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = tiny_module(queue_size=40)
    trainer = fit(module, steps=3, tmp_path=tmp_path)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = tiny_module(queue_size=40)
    restored.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    assert torch.equal(restored.queue.keys, module.queue.keys)
    assert restored.queue.pointer == module.queue.pointer == 24
    assert restored.queue.num_filled == 24
    for ours, theirs in zip(
        restored.key_backbone.parameters(), module.key_backbone.parameters(), strict=True
    ):
        assert torch.equal(ours, theirs)


def test_queue_smaller_than_batch_is_a_clear_error() -> None:
    module = tiny_module(queue_size=4)
    silence_logging(module)
    view_a, view_b = views(8)
    try:
        module.training_step(((view_a, view_b), torch.zeros(8)), 0)
    except ValueError as error:
        assert "model.queue_size=4 is smaller than the 8 keys" in str(error)
    else:
        raise AssertionError("a queue smaller than the batch must be refused")


def test_bad_arguments_are_refused() -> None:
    for kwargs, message in (
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"ema_momentum": 1.2}, r"ema_momentum must be in \[0, 1\]"),
        ({"key_bn": "shuffled"}, "key_bn must be one of"),
        ({"ema_momentum_schedule": "linear"}, "'constant' or 'cosine'"),
    ):
        try:
            tiny_module(**kwargs)
        except ValueError as error:
            assert re.search(message, str(error)), str(error)
        else:
            raise AssertionError(f"{kwargs} must be refused")


def test_keys_are_unit_vectors() -> None:
    module = tiny_module()
    keys = module.project_keys(views()[0])
    assert keys.shape == (8, 8)  # N images, D = head.out_dim
    assert torch.allclose(keys.norm(dim=1), torch.ones(8), atol=1e-5)
    assert not keys.requires_grad


@pytest.mark.parametrize(("key_bn", "ranks"), [("auto", 1), ("split", 1), ("none", 1), ("auto", 2)])
def test_key_bn_modes_resolve_and_keep_the_key_encoder_frozen(key_bn: str, ranks: int) -> None:
    module = tiny_module(key_bn=key_bn, bn_splits=2)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    mode = module.configure_key_bn(ranks, on_gpu=False)
    assert mode == {"auto": "split" if ranks == 1 else "shuffle"}.get(key_bn, key_bn)
    split_layers = [m for m in module.key_backbone.modules() if isinstance(m, SplitBatchNorm2d)]
    assert bool(split_layers) == (mode == "split")
    # The same parameters train after the conversion: none of the key encoder's.
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    assert not any(n.startswith(("key_backbone.", "key_head.")) for n in trainable)


def test_split_bn_shuffles_the_key_batch_and_returns_keys_in_order() -> None:
    """Under ``split`` the key encoder sees the batch shuffled, so key i is normalised with a
    different group of samples than query i; the keys come back in the input's order."""
    module = tiny_module(key_bn="split", bn_splits=2)
    assert module.configure_key_bn(1, on_gpu=False) == "split"
    seen: list[torch.Tensor] = []
    module.key_backbone.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 12, 12).contiguous()
    seed = module._shuffle_seed(0)
    assert seed is not None
    module.project_keys(images, shuffle_seed=seed)
    order = seen[0][:, 0, 0, 0].long()  # which image the key encoder saw at each position
    assert sorted(order.tolist()) == list(range(8))
    assert set(order[:4].tolist()) != {0, 1, 2, 3}  # the first group is not the queries' group
    module.eval()  # per-sample BatchNorm: the shuffled forward must give the same keys
    assert torch.allclose(module.project_keys(images, seed), module.project_keys(images), atol=1e-6)
    assert tiny_module(key_bn="none")._shuffle_seed(0) is None


def test_sync_bn_on_cpu_ranks_is_refused_with_the_alternative() -> None:
    with pytest.raises(ValueError, match="key_bn=shuffle"):
        tiny_module(key_bn="sync").configure_key_bn(2, on_gpu=False)
    with pytest.raises(ValueError, match="key_bn must be one of"):
        tiny_module(key_bn="shufle")
