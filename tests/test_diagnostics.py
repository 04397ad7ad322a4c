"""Diagnostics: the pure metrics against hand-computed values, the queue's key ages, the
callbacks' outputs in the TensorBoard event files and projector files of a tiny fit."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from mocoq.backbones import SmallResNet
from mocoq.callbacks import TimeBreakdown, TrainingDiagnostics
from mocoq.diagnostics import (
    COLLAPSE_FRACTION,
    StepOutputs,
    alignment,
    collapse_threshold,
    collapsed,
    feature_std,
    mean_key_age,
    negative_logit,
    positive_logit,
    positive_top1,
    queue_fill,
    uniformity,
    weight_distance,
)
from mocoq.heads import ProjectionHead
from mocoq.module import MoCoModule
from mocoq.queue import MemoryQueue
from mocoq.train import run

from conftest import tiny_module

# --- pure metrics --------------------------------------------------------------------------


def test_alignment_by_hand() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    z2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    # Squared distances: |(1, -1)|^2 = 2, 0, 0.
    assert alignment(z1, z2).item() == pytest.approx(2 / 3)
    assert alignment(z1, z2, alpha=1).item() == pytest.approx(math.sqrt(2) / 3)
    # Rows are normalised first: scaling a row changes nothing.
    assert alignment(z1 * 3, z2 * 0.5).item() == pytest.approx(2 / 3)


def test_uniformity_by_hand_and_by_double_loop() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Pairs (0, 1), (0, 2), (1, 2): squared distances 2, 4, 2.
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert uniformity(z).item() == pytest.approx(expected, rel=1e-5)
    assert uniformity(z, t=1).item() == pytest.approx(
        math.log((math.exp(-2) + math.exp(-4) + math.exp(-2)) / 3), rel=1e-5
    )

    points = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    total, pairs = 0.0, 0
    for i in range(7):
        for j in range(i + 1, 7):
            total += math.exp(-2 * float(((points[i] - points[j]) ** 2).sum()))
            pairs += 1
    assert uniformity(points).item() == pytest.approx(math.log(total / pairs), rel=1e-5)
    assert uniformity(torch.ones(4, 3)).item() == pytest.approx(0.0, abs=1e-6)  # one point


def test_feature_std_by_hand() -> None:
    # Normalised rows (1, 0) and (0, 1): each column holds {1, 0}, population std 0.5.
    assert feature_std(torch.tensor([[2.0, 0.0], [0.0, 3.0]])).item() == pytest.approx(0.5)
    z = torch.tensor([[3.0, 4.0], [3.0, -4.0]])  # normalised: (0.6, 0.8), (0.6, -0.8)
    assert feature_std(z).item() == pytest.approx((0.0 + 0.8) / 2)
    assert feature_std(torch.ones(5, 4)).item() == 0.0


def test_collapse_flags_a_constant_encoder_and_not_a_healthy_one() -> None:
    torch.manual_seed(0)
    dim = 128
    constant = nn.Linear(10, dim)  # weights 0, a random bias: one output for every input
    nn.init.zeros_(constant.weight)
    inputs = torch.randn(64, 10)
    with torch.no_grad():
        flat = constant(inputs)
    assert feature_std(flat).item() < 1e-6
    assert collapsed(flat).item() == 1.0

    healthy = torch.randn(256, dim)  # spread: about 1 / sqrt(D)
    assert feature_std(healthy).item() == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    assert collapsed(healthy).item() == 0.0
    # A randomly initialised small ResNet and head on noise is not flagged either.
    module = MoCoModule(
        backbone=SmallResNet(3),
        head=functools.partial(ProjectionHead, out_dim=dim),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    with torch.no_grad():
        projections = module.project(torch.randn(32, 3, 16, 16))
    assert collapsed(projections).item() == 0.0
    assert collapse_threshold(dim) == pytest.approx(COLLAPSE_FRACTION / math.sqrt(dim))


def test_weight_distance_is_the_norm_of_the_flat_difference() -> None:
    torch.manual_seed(0)
    query, key = nn.Linear(3, 2), nn.Linear(3, 2)
    pairs = zip(query.parameters(), key.parameters(), strict=True)
    flat = torch.cat([(q - k).flatten() for q, k in pairs])
    assert weight_distance(query, key).item() == pytest.approx(flat.norm().item(), rel=1e-6)
    with torch.no_grad():
        key.weight.copy_(query.weight)
        key.bias.copy_(query.bias + torch.tensor([3.0, 4.0]))
    assert weight_distance(query, key).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="parameters"):
        weight_distance(query, nn.Linear(3, 2, bias=False))


def test_logit_statistics_by_hand() -> None:
    logits = torch.tensor(
        [
            [5.0, 1.0, 2.0],  # positive first: a hit
            [1.0, 3.0, 0.0],  # a negative above it: a miss
            [2.0, 2.0, -1.0],  # a tie: a miss
            [0.0, -2.0, -4.0],  # a hit
        ]
    )
    assert positive_logit(logits).item() == pytest.approx((5 + 1 + 2 + 0) / 4)
    assert negative_logit(logits).item() == pytest.approx((1 + 2 + 3 + 0 + 2 - 1 - 2 - 4) / 8)
    assert positive_top1(logits).item() == pytest.approx(0.5)


def test_queue_fill_and_key_ages() -> None:
    queue = MemoryQueue(size=6, dim=2)
    assert queue_fill(queue.num_filled, queue.size) == 0.0
    assert mean_key_age(queue.written_at, queue.num_writes).item() == 0.0  # nothing known
    keys = F.normalize(torch.ones(2, 2), dim=1)
    queue.enqueue(keys)
    queue.enqueue(keys)
    # Two calls of 2 keys: ages 1, 1 (first call) and 0, 0 (last call).
    assert queue.written_at.tolist() == [0, 0, 1, 1, -1, -1]
    assert mean_key_age(queue.written_at, queue.num_writes).item() == pytest.approx(0.5)
    assert queue_fill(queue.num_filled, queue.size) == pytest.approx(4 / 6)
    queue.enqueue(keys)
    # Full, K / B = 3 calls in it: (3 - 1) / 2 = 1.
    assert mean_key_age(queue.written_at, queue.num_writes).item() == pytest.approx(1.0)
    queue.enqueue(torch.cat([keys, keys]))  # 4 keys over the oldest slots, 0 to 3
    assert queue.written_at.tolist() == [3, 3, 3, 3, 2, 2]
    assert mean_key_age(queue.written_at, queue.num_writes).item() == pytest.approx(2 / 6)


def test_key_ages_survive_a_checkpoint_and_older_checkpoints_load() -> None:
    queue = MemoryQueue(size=5, dim=2)
    for _ in range(4):
        queue.enqueue(F.normalize(torch.randn(2, 2), dim=1))  # wraps
    restored = MemoryQueue(size=5, dim=2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.written_at, queue.written_at)
    assert restored.num_writes == queue.num_writes == 4

    old = {k: v for k, v in queue.state_dict().items() if k != "written_at"}  # before the buffer
    legacy = MemoryQueue(size=5, dim=2)
    legacy.load_state_dict(old)  # strict: the missing buffer is filled in
    assert legacy.written_at.tolist() == [-1] * 5 and legacy.num_writes == 0
    assert torch.equal(legacy.keys, queue.keys) and legacy.pointer == queue.pointer
    legacy.enqueue(F.normalize(torch.ones(2, 2), dim=1))
    assert mean_key_age(legacy.written_at, legacy.num_writes).item() == 0.0  # known ones only


# --- callbacks -----------------------------------------------------------------------------


class _Trainer:
    """The parts of a Trainer the diagnostics callback reads."""

    def __init__(self, step: int) -> None:
        self.global_step = step
        self.loggers: list[Any] = []


def test_diagnostics_capture_only_on_logging_steps_and_flag_collapse() -> None:
    torch.manual_seed(0)
    module = tiny_module()
    callback = TrainingDiagnostics(every_n_steps=5)
    for step, due in ((0, True), (3, False), (10, True)):
        callback.on_train_batch_start(_Trainer(step), module, None, 0)  # type: ignore[arg-type]
        assert module.capture_step_outputs is due

    dim = module.queue.dim
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    spread = StepOutputs(torch.eye(dim)[:4], torch.eye(dim)[:4], logits, torch.randn(4, 16))
    metrics = callback.compute(module, spread)
    assert metrics["diag/collapse"] == 0.0
    assert metrics["diag/alignment"] == 0.0 and metrics["diag/pos_top1"] == 0.5
    assert metrics["diag/queue_fill"] == 0.0 and metrics["diag/queue_age"] == 0.0
    assert metrics["diag/qk_weight_distance"] == 0.0  # the key encoder starts as a copy
    same = F.normalize(torch.ones(4, dim), dim=1)
    metrics = callback.compute(module, StepOutputs(same, same, logits, torch.ones(4, 16)))
    assert metrics["diag/collapse"] == 1.0 and metrics["diag/feature_std"] == 0.0
    assert metrics["diag/backbone_feature_std"] == 0.0


class _Event:
    """A stand-in for ``torch.cuda.Event``: completes ``lag`` queries after being recorded."""

    clock = 0.0

    def __init__(self, lag: int = 1) -> None:
        self.lag, self.time = lag, 0.0

    def record(self) -> None:
        _Event.clock += 0.25
        self.time = _Event.clock

    def query(self) -> bool:
        self.lag -= 1
        return self.lag < 0

    def elapsed_time(self, end: _Event) -> float:
        return (end.time - self.time) * 1000.0  # milliseconds


def test_time_breakdown_reads_device_timers_only_once_complete() -> None:
    callback = TimeBreakdown(window=4)
    callback.new_event = _Event
    callback._device_timed = lambda pl_module: True  # type: ignore[method-assign]
    logged: dict[str, list[float]] = {}
    module: Any = type(
        "Module", (), {"log": lambda self, k, v: logged.setdefault(k, []).append(v)}
    )()
    trainer: Any = _Trainer(0)
    for _ in range(3):
        callback.on_train_batch_start(trainer, module, None, 0)
        callback.on_train_batch_end(trainer, module, None, None, 0)
    # The first step's end event is not complete when first asked: no step time yet, then
    # every step's device time (0.25 s between its two records) once it is.
    assert logged["time/step_s"] == [pytest.approx(0.25)] * 2
    assert len(logged["time/data_s"]) == 2 and all(s >= 0 for s in logged["time/data_s"])


def scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_fit_writes_diagnostics_view_pairs_and_projector(
    make_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_cfg(
        "trainer.limit_train_batches=5",
        "callbacks.diagnostics.every_n_steps=2",
        "callbacks.projector.max_images=40",
        "callbacks.view_pairs.num_pairs=3",
        "callbacks.knn.k=20",
    )
    run(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = scalars(events)

    diag = ["queue_fill", "queue_age", "pos_logit", "neg_logit", "pos_top1", "alignment"]
    diag += ["uniformity", "feature_std", "collapse", "backbone_feature_std", "qk_weight_distance"]
    for name in diag:
        assert [step for step, _ in logged[f"diag/{name}"]] == [0, 2, 4], name
    fill = [value for _, value in logged["diag/queue_fill"]]
    # 16 keys a step into 64 slots: 1, 3 and 5 steps' keys, the queue full at the last.
    assert fill == [pytest.approx(16 / 64), pytest.approx(48 / 64), 1.0]
    # Full at step 4 with the keys of steps 1 to 4 (step 0's overwritten): ages 3, 2, 1, 0.
    assert logged["diag/queue_age"][-1][1] == pytest.approx(1.5)
    assert all(value == 0.0 for _, value in logged["diag/collapse"])
    assert logged["diag/qk_weight_distance"][0][1] > 0  # one optimizer step apart already
    for tag in ("time/data_s", "time/step_s", "time/monitor_s", "throughput/images_per_s"):
        assert logged.get(tag), f"{tag} missing"
    assert all(value > 0 for _, value in logged["time/step_s"])
    assert logged["time/monitor_s"][-1][1] == pytest.approx(logged["knn/seconds"][-1][1])
    assert "probe/aug_top1" not in logged  # the probe is off by default

    # The view pairs: once, at step 0, 3 pairs of 16 x 16 views in 2 rows (2-pixel padding).
    assert events.Tags()["images"] == ["images/view_pairs"]
    (image,) = events.Images("images/view_pairs")
    assert image.step == 0 and (image.width, image.height) == (2 + 3 * 18, 2 + 2 * 18)

    # The projector: config, tensors, labels and sprite of the 40 val images, at the last step.
    board = tmp_path / "tensorboard"
    config = (board / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "val_backbone:00005"' in config and "sprite.png" in config
    entry = board / "00005" / "val_backbone"
    rows = (entry / "tensors.tsv").read_text().strip().splitlines()
    assert len(rows) == 40 and len(rows[0].split("\t")) == 32  # the backbone's 32 features
    labels = (entry / "metadata.tsv").read_text().split()
    assert len(labels) == 40 and len(set(labels)) == 10  # class-stratified: all 10 classes
    assert (entry / "sprite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
