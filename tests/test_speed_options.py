"""Speed options: the kNN monitor's fixed subsets and cost log, channels-last and compiled
backbones, and the InfoNCE logits' dtype under autocast."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from multiprocess import run_distributed
from omegaconf import DictConfig
from pytorch_lightning.plugins.precision import Precision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from mocoq.backbones import SmallResNet
from mocoq.callbacks import KNNMonitor
from mocoq.callbacks.knn_monitor import stratified_subset
from mocoq.eval.features import embed, knn_evaluate
from mocoq.loss import info_nce
from mocoq.module import MoCoModule, channels_last_unsafe_convs
from mocoq.train import run

from conftest import tiny_module
from test_module import fit, views

WIDE = (8, 16)  # no strided 1x1 convolution from fewer than 8 channels: layout and compile apply

# ------------------------------------------------------------------------- the subset draw


def test_stratified_subset_gives_each_label_its_share_by_largest_remainder() -> None:
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]  # (100,)
    picked = stratified_subset(100, 10, seed=3, targets=targets)
    assert torch.equal(torch.bincount(targets[picked]), torch.tensor([5, 3, 2]))
    assert torch.equal(picked, picked.unique())  # distinct and sorted
    # Shares 4 * (3, 2, 2) / 7 = (1.71, 1.14, 1.14): floors (1, 1, 1), the spare one goes to
    # the largest remainder, label 0.
    small = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert torch.bincount(small[stratified_subset(7, 4, 0, small)]).tolist() == [2, 1, 1]


def test_stratified_subset_depends_on_its_seed_only() -> None:
    targets = torch.arange(1000) % 7
    torch.manual_seed(1)
    first = stratified_subset(1000, 100, seed=5, targets=targets)
    torch.manual_seed(2)  # the global generator plays no part: every rank draws alike
    assert torch.equal(stratified_subset(1000, 100, seed=5, targets=targets), first)
    assert not torch.equal(stratified_subset(1000, 100, seed=6, targets=targets), first)
    unlabelled = stratified_subset(1000, 100, seed=5)
    assert unlabelled.shape == (100,) and torch.equal(unlabelled, unlabelled.unique())
    assert torch.equal(stratified_subset(10, 50, seed=0), torch.arange(10))  # all of it
    with pytest.raises(ValueError, match="size=0"):
        stratified_subset(10, 0, seed=0)


# ------------------------------------------------------------------- the monitor's subsets

NUM_CLASSES = 4


def knn_datasets(channels: int = 1) -> tuple[TensorDataset, TensorDataset]:
    """A bank of 120 images (C, 8, 8) with 30 per class, items 0 and 5 unlabelled, and 50
    queries: class prototype plus noise, so kNN accuracy is well above chance."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(NUM_CLASSES, channels, 8, 8, generator=generator)

    def dataset(labels: Tensor) -> TensorDataset:
        noise = torch.randn(labels.shape[0], channels, 8, 8, generator=generator)
        return TensorDataset(prototypes[labels] + noise, labels.clone())

    bank = dataset(torch.arange(120) % NUM_CLASSES)
    bank.tensors[1][[0, 5]] = -1
    return bank, dataset(torch.arange(50) % NUM_CLASSES)


class Encoder(pl.LightningModule):
    """A fixed, seeded SmallResNet: images (N, C, 8, 8) -> features (N, 8); it records whether
    its inputs came channels-last."""

    def __init__(self, channels_last: bool = False, channels: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = SmallResNet(channels, widths=(4, 8), blocks=(1, 1))
        self.channels_last = channels_last
        self.layouts: list[bool] = []

    def forward(self, images: Tensor) -> Tensor:
        self.layouts.append(images.is_contiguous(memory_format=torch.channels_last))
        return self.backbone(images)


def monitor(channels: int = 1, **kwargs: Any) -> KNNMonitor:
    bank, queries = knn_datasets(channels)
    options: dict[str, Any] = {"k": 10, "temperature": 0.1}
    options.update(kwargs)
    return KNNMonitor(
        bank_loader=DataLoader(bank, batch_size=16),
        val_loader=DataLoader(queries, batch_size=16),
        **options,
    )


def evaluate(knn: KNNMonitor, encoder: pl.LightningModule, full: bool = False) -> Any:
    """``knn.evaluate`` without a Trainer: a stub with what evaluate reads."""
    trainer = SimpleNamespace(datamodule=None, precision_plugin=Precision())
    return knn.evaluate(cast(pl.Trainer, trainer), encoder, full=full)


def test_monitor_scores_its_fixed_stratified_subsets_and_everything_when_full() -> None:
    knn = monitor(bank_size=40, max_queries=20)
    encoder = Encoder()
    result = evaluate(knn, encoder)
    bank, queries = knn_datasets()
    bank_indices = knn.subset_indices("bank", bank, 40)
    query_indices = knn.subset_indices("queries", queries, 20)
    assert bank_indices is not None and query_indices is not None
    bank_labels, query_labels = bank.tensors[1], queries.tensors[1]
    assert bool((bank_labels[bank_indices] >= 0).all())  # drawn among the labelled only
    assert torch.bincount(bank_labels[bank_indices]).tolist() == [10] * NUM_CLASSES
    assert torch.bincount(query_labels[query_indices]).tolist() == [5] * NUM_CLASSES

    # The result is plain kNN on exactly those items, k scaled to the bank's share: 10 x 40/118.
    features, labels = embed(encoder, DataLoader(Subset(bank, bank_indices.tolist())))
    query_features, targets = embed(encoder, DataLoader(Subset(queries, query_indices.tolist())))
    expected = knn_evaluate(features, labels, query_features, targets, 3, 0.1)
    assert (result.bank_size, result.num_queries, result.k) == (40, 20, 3)
    unscaled = evaluate(monitor(bank_size=40, max_queries=20, scale_k=False), encoder)
    assert unscaled.k == 10
    assert (result.top1, result.top5) == pytest.approx((expected.top1, expected.top5), abs=1e-6)

    # The same subsets on every call, and from a fresh monitor (another rank) too.
    assert evaluate(knn, encoder) == result
    assert evaluate(monitor(bank_size=40, max_queries=20), encoder) == result
    assert torch.equal(monitor().subset_indices("bank", bank, 40), bank_indices)  # type: ignore[arg-type]

    full = evaluate(knn, encoder, full=True)
    assert (full.bank_size, full.num_queries) == (118, 50)  # all labelled bank items, all queries
    assert evaluate(monitor(), encoder) == full  # no sizes: the full protocol
    assert knn.last_call_seconds > 0 and knn.seconds > knn.last_call_seconds


def test_monitor_hands_channels_last_images_to_a_channels_last_module() -> None:
    for channels_last in (True, False):  # 3 channels: the two layouts differ in memory
        encoder = Encoder(channels_last=channels_last, channels=3)
        evaluate(monitor(3, bank_size=40, max_queries=20), encoder)
        evaluate(monitor(3), encoder, full=True)
        assert encoder.layouts and set(encoder.layouts) == {channels_last}


def test_monitor_sizes_are_validated_and_its_clock_is_checkpointed() -> None:
    with pytest.raises(ValueError, match="bank_size must be positive"):
        KNNMonitor(bank_size=0)
    with pytest.raises(ValueError, match="max_queries must be positive"):
        KNNMonitor(max_queries=-1)
    knn = KNNMonitor()
    knn.load_state_dict({"seconds": 3.0, "full_seconds": 1.2, "train_seconds": 60.0})
    assert knn.state_dict() == {"seconds": 3.0, "full_seconds": 1.2, "train_seconds": 60.0}
    assert knn.share == pytest.approx(0.03)  # the monitoring calls: 3.0 - 1.2 s
    assert knn.share_total == pytest.approx(0.05)
    knn.load_state_dict({"seconds": 2.0})  # a checkpoint from before the training clock
    assert knn.share == 0.0 and knn.share_total == 0.0


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_logs_the_monitor_cost_and_ends_with_the_full_protocol(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
        "callbacks.knn.bank_size=40",
        "callbacks.knn.max_queries=30",
        "callbacks.knn.full_at_end=true",
        "callbacks.knn.at_start=true",
        "callbacks.knn.k=20",
    )
    summary = run(cfg)

    logged = scalars(tmp_path)
    # At start (full: the baseline reported beside the final number), after epochs 1 and 2
    # (subsets), after epoch 3 (full).
    assert logged["knn/bank_size"] == [128, 40, 40, 128]
    assert logged["knn/num_queries"] == [128, 30, 30, 128]
    assert logged["knn/k"] == [20, 6, 6, 20]  # 20 x 40/128 neighbours on the bank subset
    assert len(logged["knn/seconds"]) == 4 and min(logged["knn/seconds"]) > 0
    share, share_total = logged["knn/share"], logged["knn/share_total"]
    assert len(share) == 3 and all(s > 0 for s in share)
    assert summary["knn"]["bank_size"] == 128 and summary["knn"]["num_queries"] == 128
    assert summary["knn"]["top1"] == logged["knn/top1"][-1]
    # share_total is all evaluation seconds so far over the training seconds so far: the
    # implied training clock grows from epoch to epoch, and the total is the summary's.
    seconds = torch.tensor(logged["knn/seconds"])  # (4,): start (full), 2 subsets, end (full)
    all_so_far = seconds.cumsum(0)[1:]  # after epochs 1-3
    training_so_far = all_so_far / torch.tensor(share_total)  # (3,)
    assert bool((training_so_far.diff() > 0).all()), training_so_far
    assert summary["knn_monitor_seconds"] == pytest.approx(float(all_so_far[-1]), abs=0.06)
    # share counts only the monitoring (subset) calls, over the same clock.
    monitoring = torch.tensor([seconds[1], seconds[1] + seconds[2], seconds[1] + seconds[2]])
    assert torch.allclose(torch.tensor(share) * training_so_far, monitoring, rtol=1e-3, atol=1e-3)
    full = float(seconds[0] + seconds[3])
    assert summary["knn_full_protocol_seconds"] == pytest.approx(full, abs=0.06)


# ------------------------------------------------------------------- DDP: two gloo ranks


def _subset_monitor_on_each_rank(rank: int, world: int) -> dict[str, Any]:
    knn = monitor(bank_size=40, max_queries=21)  # 21 queries: shards of 11 and 10
    return {"result": evaluate(knn, Encoder()), "full": evaluate(knn, Encoder(), full=True)}


@pytest.mark.slow
def test_sharded_subset_monitor_matches_one_process() -> None:
    results = run_distributed(_subset_monitor_on_each_rank, world_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned ranks run, so features match bit for bit
    try:
        knn = monitor(bank_size=40, max_queries=21)
        expected, full = evaluate(knn, Encoder()), evaluate(knn, Encoder(), full=True)
    finally:
        torch.set_num_threads(threads)
    assert (expected.bank_size, expected.num_queries) == (40, 21)
    for out in results:
        assert out["result"] == expected and out["full"] == full


# ---------------------------------------------------------------- channels-last backbones


def is_channels_last(module: nn.Module) -> bool:
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Conv2d)]
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def train_and_save(module: MoCoModule, tmp_path: Path) -> dict[str, Tensor]:
    trainer = fit(module, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=False)
    return cast(dict[str, Tensor], checkpoint["state_dict"])


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_checkpoints_load_across_memory_layouts_with_equal_outputs(
    saved_channels_last: bool, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    saved = tiny_module(WIDE, channels_last=saved_channels_last, key_bn="split", bn_splits=2)
    before = {k: v.clone() for k, v in saved.state_dict().items()}
    state = train_and_save(saved, tmp_path)
    assert any(not torch.equal(state[k], before[k]) for k in before)  # it trained
    assert is_channels_last(saved.backbone) == saved_channels_last
    assert is_channels_last(saved.key_backbone) == saved_channels_last  # after EMA steps too

    loaded = tiny_module(WIDE, channels_last=not saved_channels_last, key_bn="split", bn_splits=2)
    loaded.setup("fit")
    assert is_channels_last(loaded.backbone) != saved_channels_last
    loaded.load_state_dict(state)
    assert is_channels_last(loaded.backbone) != saved_channels_last  # values in, layout kept
    saved.eval()
    loaded.eval()
    images, _ = views(8, seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(images), saved(images), atol=1e-5)
        assert torch.allclose(loaded.project(images), saved.project(images), atol=1e-5)
        assert torch.allclose(loaded.project_keys(images), saved.project_keys(images), atol=1e-5)


def test_channels_last_views_reach_the_backbones_in_that_layout() -> None:
    module = tiny_module(WIDE, channels_last=True)
    module.setup("fit")
    seen: list[bool] = []

    def record(_: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last))

    module.backbone.register_forward_pre_hook(record)
    module.key_backbone.register_forward_pre_hook(record)
    images = torch.randn(4, 3, 8, 8)  # 3 channels: the layouts differ in memory
    module.backbone.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False).to(
        memory_format=torch.channels_last
    )
    module.key_backbone.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    module(images)
    module.project(images)
    module.project_keys(images)
    module.project_keys(images, shuffle_seed=0)  # after the shuffle's gather, too
    assert seen == [True] * 4


# --------------------------------------------------------------------- compiled backbones


def compiled_pair(monkeypatch: pytest.MonkeyPatch, backend: str | None) -> tuple[MoCoModule, ...]:
    if backend is not None:  # a fast backend: the same tracing, no code generation
        compile_module = nn.Module.compile
        monkeypatch.setattr(
            nn.Module, "compile", lambda self: compile_module(self, backend=backend)
        )
    torch.manual_seed(0)
    eager = tiny_module(WIDE, key_bn="split", bn_splits=2)
    compiled = tiny_module(WIDE, compile=True, key_bn="split", bn_splits=2)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    eager.setup("fit")
    compiled.setup("fit")
    compiled.setup("fit")  # idempotent
    assert list(compiled.state_dict()) == keys == list(eager.state_dict())
    return eager, compiled


def check_compiled_matches_eager(eager: MoCoModule, compiled: MoCoModule) -> None:
    images, other = views(8, seed=4)
    eager_loss = info_nce(eager.project(images), eager.project_keys(other), eager.queue.keys, 0.2)[
        0
    ]
    compiled_loss = info_nce(
        compiled.project(images), compiled.project_keys(other), compiled.queue.keys, 0.2
    )[0]
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    eager_loss.backward()
    compiled_loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            assert q.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5), name
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(images), eager(images), atol=1e-5)
    # A compiled module's checkpoint is an eager module's checkpoint.
    fresh = tiny_module(WIDE, key_bn="split", bn_splits=2)
    fresh.load_state_dict(compiled.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(images), compiled(images), atol=1e-5)


def test_compiled_backbones_keep_their_names_and_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    eager, compiled = compiled_pair(monkeypatch, backend="aot_eager")
    check_compiled_matches_eager(eager, compiled)


@pytest.mark.slow
def test_inductor_compiled_backbones_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real code generator: about a minute of C++ compilation on a 2-core CPU. The training
    gradients are the eager ones."""
    eager, compiled = compiled_pair(monkeypatch, backend=None)
    assert compiled._compiled
    check_compiled_matches_eager(eager, compiled)


def test_layers_onednn_gets_wrong_keep_a_cpu_module_nchw_and_uncompiled() -> None:
    # The tiny backbone's downsampling is a 1x1 stride-2 convolution from 4 channels: oneDNN's
    # channels-last weight gradient for it is wrong (or never returns) on the CPU.
    narrow = tiny_module(channels_last=True, compile=True)
    assert channels_last_unsafe_convs(narrow.backbone) == ["layers.1.0.downsample.0"]
    with pytest.warns(UserWarning, match=r"model.channels_last and model.compile ignored"):
        narrow.setup("fit")
    assert not narrow.channels_last and not narrow._compiled and not narrow.compile_backbones
    assert not is_channels_last(narrow.backbone) and not is_channels_last(narrow.key_backbone)
    # On a GPU the layout applies (no compile here: it would need the device).
    gpu = tiny_module(channels_last=True)
    gpu.configure_speed(device_type="cuda")
    assert gpu.channels_last and is_channels_last(gpu.backbone)
    # From 8 channels on there is nothing to refuse.
    wide = tiny_module(WIDE, channels_last=True)
    assert channels_last_unsafe_convs(wide.backbone) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide.setup("fit")
    assert is_channels_last(wide.backbone) and is_channels_last(wide.key_backbone)


# ------------------------------------------------------------------ InfoNCE under autocast


@pytest.fixture
def unit_vectors() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    query, key, queue = (
        F.normalize(torch.randn(n, 16, generator=generator), dim=1) for n in (8, 8, 64)
    )
    yield query.requires_grad_(), key, queue


def test_info_nce_logits_are_in_the_autocast_dtype_and_the_loss_in_float32(
    unit_vectors: tuple[Tensor, Tensor, Tensor],
) -> None:
    query, key, queue = unit_vectors
    reference, reference_logits = info_nce(query, key, queue, 0.2)
    assert reference_logits.dtype == torch.float32  # no autocast: the inputs' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce(query, key, queue, 0.2)  # a float32 query, as on GPUs
        bf16_loss, bf16_logits = info_nce(query.bfloat16(), key.bfloat16(), queue, 0.2)
    assert logits.dtype == bf16_logits.dtype == torch.bfloat16  # (N, 1 + K) queue product
    assert loss.dtype == bf16_loss.dtype == torch.float32
    assert queue.dtype == torch.float32  # the stored queue is not converted
    assert torch.allclose(logits.float(), reference_logits, atol=0.05)  # bf16 rounding of <= 5
    assert torch.allclose(loss, reference, atol=0.02)
    loss.backward()
    assert query.grad is not None and query.grad.dtype == torch.float32


def test_module_step_under_bf16_autocast_keeps_a_float32_queue() -> None:
    module = tiny_module()
    logged: dict[str, Tensor] = {}
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    module.log_dict = lambda d, **k: logged.update(d)  # type: ignore[method-assign]
    module.current_ema_momentum = lambda: 0.9  # type: ignore[method-assign]
    view_a, view_b = views()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(((view_a, view_b), torch.zeros(8)), 0)
    assert loss.dtype == torch.float32 and module.queue.keys.dtype == torch.float32
    assert torch.allclose(module.queue.keys[:8].norm(dim=1), torch.ones(8), atol=1e-2)
    assert all(value.dtype == torch.float32 for value in logged.values())
