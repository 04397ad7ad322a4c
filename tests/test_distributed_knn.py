"""The kNN monitor split over ranks: shard sampler, uneven gather, and sharded == one process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytorch_lightning as pl
import torch
from multiprocess import run_distributed
from pytorch_lightning.plugins.precision import Precision
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from mocoq.backbones import SmallResNet
from mocoq.callbacks import KNNMonitor
from mocoq.distributed import (
    StridedShardSampler,
    all_reduce,
    gather_uneven,
    unshard_strided,
)
from mocoq.eval.features import (
    embed,
    embed_sharded,
    knn_evaluate,
    knn_evaluate_sharded,
    shard_loader,
)
from mocoq.knn import knn_predict, topk_accuracy

BANK_SIZE, NUM_QUERIES, NUM_CLASSES = 101, 37, 5  # odd on purpose: shards of unequal length
UNLABELLED_BANK_ITEMS = (7, 50)  # label -1: dropped from the bank on every rank
# Odd: only rank 1 of 2 holds this query of a class the bank lacks, so the class count (C = 6,
# as in one process) has to come from the query labels of all ranks.
UNSEEN_QUERY = 35
K, TEMPERATURE = 20, 0.1


def knn_data() -> tuple[TensorDataset, TensorDataset]:
    """Bank (101, 1, 8, 8) and queries (37, 1, 8, 8): a class prototype plus noise per image."""
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(NUM_CLASSES + 1, 1, 8, 8, generator=generator)

    def images_of(labels: Tensor) -> Tensor:
        noise = torch.randn(labels.shape[0], 1, 8, 8, generator=generator)
        return prototypes[labels.clamp(min=0)] + 1.5 * noise  # (N, 1, 8, 8)

    bank_labels = torch.arange(BANK_SIZE) % NUM_CLASSES
    query_labels = torch.arange(NUM_QUERIES) * 3 % NUM_CLASSES
    query_labels[UNSEEN_QUERY] = NUM_CLASSES
    bank = TensorDataset(images_of(bank_labels), bank_labels.clone())
    bank.tensors[1][list(UNLABELLED_BANK_ITEMS)] = -1
    return bank, TensorDataset(images_of(query_labels), query_labels)


class Encoder(pl.LightningModule):
    """A fixed, seeded SmallResNet: images (N, 1, 8, 8) -> features (N, 8)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = SmallResNet(1, widths=(4, 8), blocks=(1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)  # type: ignore[no-any-return]


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    bank, queries = knn_data()
    return DataLoader(bank, batch_size=16), DataLoader(queries, batch_size=16)


def tiny_loader() -> DataLoader[Any]:
    """One item, fewer than the ranks: (1, 1, 8, 8) image with label 3."""
    return DataLoader(TensorDataset(torch.ones(1, 1, 8, 8), torch.tensor([3])), batch_size=4)


def monitor_result(monitor: KNNMonitor, encoder: Encoder) -> Any:
    """``monitor.evaluate`` without a Trainer: a stub with what evaluate reads."""
    trainer = SimpleNamespace(datamodule=None, precision_plugin=Precision())
    return monitor.evaluate(cast(pl.Trainer, trainer), encoder)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run as the spawned ranks do (one intra-op thread), so features can match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------- one process, no spawn


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 7, 8, 12, 101])
def test_shard_sampler_covers_every_index_exactly_once(num_replicas: int, length: int) -> None:
    shards = [list(StridedShardSampler(length, r, num_replicas)) for r in range(num_replicas)]
    assert sorted(i for shard in shards for i in shard) == list(range(length))
    for r, shard in enumerate(shards):
        assert shard == list(range(r, length, num_replicas))  # strided, in dataset order
        assert len(StridedShardSampler(length, r, num_replicas)) == len(shard)
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_sampler_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 of 2"):
        StridedShardSampler(10, rank=2, num_replicas=2)
    with pytest.raises(ValueError, match="non-negative"):
        StridedShardSampler(-1, rank=0, num_replicas=1)
    assert list(StridedShardSampler(3)) == [0, 1, 2]  # not distributed: rank 0 of 1


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("length", [0, 1, 2, 7, 9])
def test_unshard_strided_restores_dataset_order(num_replicas: int, length: int) -> None:
    items = torch.arange(length) * 10  # (N,), item i is 10 * i
    rows = torch.stack([items, -items], dim=1)  # (N, 2)
    shards = [rows[r::num_replicas] for r in range(num_replicas)]
    assert torch.equal(unshard_strided(torch.cat(shards), num_replicas), rows)


def test_shard_loader_keeps_the_loader_options_over_this_rank_items() -> None:
    dataset = TensorDataset(torch.arange(11).float(), torch.arange(11))
    loader = DataLoader(dataset, batch_size=4, num_workers=0, collate_fn=lambda b: b)
    assert shard_loader(loader) is loader  # not distributed: unchanged
    shard = shard_loader(loader, rank=1, num_replicas=3)
    assert shard.dataset is dataset and shard.batch_size == 4
    assert shard.collate_fn is loader.collate_fn and shard.pin_memory == loader.pin_memory
    batches = [[int(target) for _, target in batch] for batch in shard]
    assert batches == [[1, 4, 7, 10]]
    assert [len(b) for b in shard_loader(DataLoader(dataset, batch_size=2), 0, 2)] == [2, 2, 2]


def test_knn_evaluate_gives_the_numbers_of_topk_accuracy() -> None:
    generator = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(60, 6, generator=generator), torch.randn(23, 6, generator=generator)
    bank_labels = torch.randint(-1, 7, (60,), generator=generator)
    query_labels = torch.randint(0, 7, (23,), generator=generator)
    labelled = bank_labels >= 0
    scores = knn_predict(queries, bank[labelled], bank_labels[labelled], 7, 10, 0.07)
    top1, top5 = topk_accuracy(scores, query_labels, (1, 5))
    result = knn_evaluate(bank, bank_labels, queries, query_labels, 10, 0.07)
    assert (result.top1, result.top5) == (top1, top5)  # float32 values, bit for bit
    assert result.bank_size == int(labelled.sum()) and result.num_queries == 23
    assert knn_evaluate_sharded(bank, bank_labels, queries, query_labels, 10, 0.07) == result
    with pytest.raises(ValueError, match="no labels"):
        knn_evaluate_sharded(bank, torch.full((60,), -1), queries, query_labels)


def test_monitor_in_one_process_gives_todays_result() -> None:
    bank_loader, val_loader = loaders()
    encoder = Encoder()
    bank, bank_labels = embed(encoder, bank_loader)
    queries, query_labels = embed(encoder, val_loader)
    expected = knn_evaluate(bank, bank_labels, queries, query_labels, K, TEMPERATURE)
    monitor = KNNMonitor(
        k=K, temperature=TEMPERATURE, bank_loader=bank_loader, val_loader=val_loader
    )
    assert monitor_result(monitor, encoder) == expected
    assert expected.bank_size == BANK_SIZE - len(UNLABELLED_BANK_ITEMS)
    assert 0.4 < expected.top1 < 1  # the data is learnable, so a wrong vote would show
    assert monitor.seconds > 0


# ------------------------------------------------------------------- two gloo processes, once


def _on_each_rank(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # Uneven rows (3 on rank 0, 2 on rank 1) of shape (n, 2, 3), and an empty shard on rank 1.
    rows = torch.arange(3 - rank)[:, None, None] + 100 * rank + torch.zeros(1, 2, 3)
    out["uneven"] = gather_uneven(rows)
    out["with_empty"] = gather_uneven(torch.arange(4 * (1 - rank)).long() + 7)
    out["sum"] = all_reduce(torch.tensor([rank + 1]), "sum")
    out["max"] = all_reduce(torch.tensor([rank + 1]), "max")
    # Sampler, gather and unshard together: every rank ends with the dataset in order.
    items = torch.arange(9) * 2
    shard = items[list(StridedShardSampler(9))]
    out["unsharded"] = unshard_strided(gather_uneven(shard))

    # The monitor: each rank embeds half of the bank and of the queries.
    bank_loader, val_loader = loaders()
    encoder = Encoder()
    monitor = KNNMonitor(
        k=K, temperature=TEMPERATURE, bank_loader=bank_loader, val_loader=val_loader
    )
    out["result"] = monitor_result(monitor, encoder)
    out["seconds"] = monitor.seconds
    out["bank"], out["bank_labels"] = embed_sharded(encoder, bank_loader)
    out["shard_queries"] = embed(encoder, shard_loader(val_loader))[1]
    # Fewer items than ranks: embedded whole on every rank, still in order.
    out["tiny"] = embed_sharded(encoder, tiny_loader())
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_distributed(_on_each_rank, world_size=2)


@pytest.mark.slow
def test_gather_uneven_concatenates_every_rank_in_rank_order(
    two_ranks: list[dict[str, Any]],
) -> None:
    expected = torch.cat([torch.arange(3), 100 + torch.arange(2)])[:, None, None] + torch.zeros(
        1, 2, 3
    )  # (5, 2, 3)
    for out in two_ranks:
        assert torch.equal(out["uneven"], expected)
        assert torch.equal(out["with_empty"], torch.arange(4) + 7)  # rank 1 sent 0 rows
        assert out["sum"].tolist() == [3] and out["max"].tolist() == [2]
        assert torch.equal(out["unsharded"], torch.arange(9) * 2)


@pytest.mark.slow
def test_sharded_monitor_matches_the_single_process_monitor(
    two_ranks: list[dict[str, Any]],
) -> None:
    bank_loader, val_loader = loaders()
    encoder = Encoder()
    with one_thread():
        bank, bank_labels = embed(encoder, bank_loader)
        tiny_features, _ = embed(encoder, tiny_loader())
        expected = monitor_result(
            KNNMonitor(
                k=K, temperature=TEMPERATURE, bank_loader=bank_loader, val_loader=val_loader
            ),
            encoder,
        )
    for rank, out in enumerate(two_ranks):
        assert out["result"] == expected, (rank, out["result"], expected)
        assert out["seconds"] > 0
        # The gathered bank is the one-process bank, in dataset order, bit for bit.
        assert torch.equal(out["bank"], bank) and torch.equal(out["bank_labels"], bank_labels)
        # Each rank embedded only its own strided share of the queries.
        assert torch.equal(out["shard_queries"], val_loader.dataset.tensors[1][rank::2])
        assert torch.equal(out["tiny"][0], tiny_features) and out["tiny"][1].tolist() == [3]
