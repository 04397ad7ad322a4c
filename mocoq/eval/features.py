"""Feature extraction and the kNN evaluation protocol shared by the monitor and baselines."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mocoq.distributed import (
    StridedShardSampler,
    all_reduce,
    gather_uneven,
    unshard_strided,
    world_size,
)
from mocoq.knn import knn_predict_many


@torch.no_grad()
def embed(
    encoder: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Run ``encoder`` over ``(images (N, C, H, W), targets (N,))`` batches.

    Modules are put in eval mode for the pass and restored after. Returns features (M, F) and
    targets (M,), both on ``device``; no batches at all give features (0, 0) and targets (0,).
    """
    was_training = isinstance(encoder, nn.Module) and encoder.training
    if isinstance(encoder, nn.Module):
        encoder.eval()
    features, targets = [], []
    try:
        for images, labels in batches:
            features.append(encoder(images.to(device, non_blocking=True)).float())
            targets.append(labels.to(device))
    finally:
        if was_training and isinstance(encoder, nn.Module):
            encoder.train()
    if not features:  # an empty shard of a dataset smaller than the world
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(targets)


def _length(loader: DataLoader[Any]) -> int:
    if not isinstance(loader.dataset, Sized):
        raise ValueError("sharded embedding needs a dataset with a length (a map-style dataset)")
    return len(loader.dataset)


def shard_loader(
    loader: DataLoader[Any], rank: int | None = None, num_replicas: int | None = None
) -> DataLoader[Any]:
    """A loader over one :class:`~mocoq.distributed.StridedShardSampler` shard of ``loader``.

    The shard of ``rank`` (default: this process's) out of ``num_replicas`` (default: the world
    size) holds the dataset items ``rank, rank + W, ...`` in order, batched with ``loader``'s
    batch size, workers, collate function and memory pinning. With one shard (W = 1) it is
    ``loader`` itself.
    """
    replicas = world_size() if num_replicas is None else num_replicas
    if replicas == 1 and not rank:
        return loader
    if loader.batch_size is None:
        raise ValueError("sharding needs a loader built with batch_size, not a batch_sampler")
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=StridedShardSampler(_length(loader), rank, replicas),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )


@torch.no_grad()
def embed_sharded(
    encoder: Callable[[Tensor], Tensor],
    loader: DataLoader[Any],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """:func:`embed` of all of ``loader``'s dataset, each rank embedding only its own shard.

    A collective: every rank must call it. Each rank embeds the items of its
    :func:`shard_loader`, then the shards are gathered (in their computed dtype, float32) and
    put back in dataset order, so every rank returns the same features (M, F) and targets (M,)
    on ``device``, in the order and with the values :func:`embed` gives in one process: in eval
    mode the encoder treats each sample on its own, so only kernels whose rounding depends on
    the batch size could tell the two apart. Exactly :func:`embed` when not distributed; a
    dataset with fewer items than ranks is embedded whole on every rank (some shards would be
    empty).
    """
    replicas = world_size()
    if replicas == 1 or _length(loader) < replicas:
        return embed(encoder, loader, device)
    features, targets = embed(encoder, shard_loader(loader), device)  # (M_r, F), (M_r,)
    # Rank-ordered shards (M, F) / (M,), then interleaved back into dataset order.
    return unshard_strided(gather_uneven(features)), unshard_strided(gather_uneven(targets))


def flatten_pixels(images: Tensor) -> Tensor:
    """The identity encoder of the raw-pixel baseline: (N, C, H, W) -> (N, C*H*W)."""
    return images.flatten(1)


@dataclass(frozen=True)
class KNNResult:
    """Weighted kNN accuracy with the protocol that produced it."""

    top1: float
    top5: float
    k: int
    temperature: float
    bank_size: int
    num_queries: int

    def describe(self) -> str:
        return (
            f"top-1 {self.top1:.4f}, top-5 {self.top5:.4f} "
            f"(k={self.k}, T={self.temperature}, bank {self.bank_size}, queries {self.num_queries})"
        )


def _labelled_bank(bank: Tensor, bank_labels: Tensor) -> tuple[Tensor, Tensor]:
    """The bank (B, D) and labels (B,) without unlabelled items (label < 0)."""
    labelled = bank_labels >= 0
    if not bool(labelled.any()):
        raise ValueError("the kNN bank has no labels: choose a labelled split as the bank")
    return bank[labelled], bank_labels[labelled]


@torch.no_grad()
def knn_correct(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> Tensor:
    """How many ``queries`` the weighted kNN vote classifies correctly, at top-1 and top-5.

    Args:
        bank: (B, D) labelled reference features.
        bank_labels: (B,) labels in ``[0, num_classes)``.
        queries: (M, D) features; M may be 0.
        query_labels: (M,) true labels (a negative label never counts as correct).
        num_classes: C.
        k, temperature: the voting protocol of :func:`mocoq.knn.knn_predict`.

    Returns:
        int64 (2,) on ``bank.device``: queries whose label is the top class, and among the top 5.
    """
    return knn_correct_many(
        bank, bank_labels, queries, query_labels, num_classes, [k], temperature
    )[0]


@torch.no_grad()
def knn_correct_many(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float = 0.1,
) -> Tensor:
    """:func:`knn_correct` for each k of ``ks`` from one similarity pass: int64 (len(ks), 2)."""
    if queries.shape[0] == 0:
        return torch.zeros(len(ks), 2, dtype=torch.long, device=bank.device)
    counts = []
    truth = query_labels.to(bank.device).unsqueeze(1)  # (M, 1)
    for scores in knn_predict_many(queries, bank, bank_labels, num_classes, ks, temperature):
        ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (M, min(5, C))
        hits = ranked == truth  # (M, min(5, C))
        counts.append(torch.stack([hits[:, :1].any(dim=1).sum(), hits.any(dim=1).sum()]))
    return torch.stack(counts)  # (len(ks), 2)


def _fraction(correct: int, total: int, device: torch.device) -> float:
    """``correct / total`` as the mean of a 0/1 float vector on ``device``.

    This is the reduction :func:`mocoq.knn.topk_accuracy` applies to its hits, so an accuracy
    summed from shards is bit-identical to the one-process value on any device (and, being a
    float32, it is exactly what a TensorBoard scalar stores).
    """
    return (torch.arange(total, device=device) < correct).float().mean().item()


def _result(
    correct: Tensor, num_queries: int, k: int, temperature: float, bank_size: int
) -> KNNResult:
    top1, top5 = (int(c) for c in correct.tolist())
    return KNNResult(
        top1=_fraction(top1, num_queries, correct.device),
        top5=_fraction(top5, num_queries, correct.device),
        k=min(k, bank_size),
        temperature=temperature,
        bank_size=bank_size,
        num_queries=num_queries,
    )


def knn_evaluate(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> KNNResult:
    """Weighted kNN top-1 / top-5 of ``queries`` (M, D) against ``bank`` (B, D), cosine metric.

    Unlabelled bank items (label < 0) are dropped; C is ``num_classes`` or one more than the
    largest bank or query label. Local: no collectives.
    """
    return knn_evaluate_many(
        bank, bank_labels, queries, query_labels, [k], temperature, num_classes
    )[0]


def knn_evaluate_many(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    ks: Sequence[int],
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> list[KNNResult]:
    """:func:`knn_evaluate` for each k of ``ks`` (one similarity pass), in their order."""
    bank, bank_labels = _labelled_bank(bank, bank_labels)
    classes = num_classes or int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    correct = knn_correct_many(bank, bank_labels, queries, query_labels, classes, ks, temperature)
    size, count = bank.shape[0], queries.shape[0]
    return [_result(c, count, k, temperature, size) for c, k in zip(correct, ks, strict=True)]


def knn_evaluate_sharded(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> KNNResult:
    """:func:`knn_evaluate` over queries split across ranks, the same result on every rank.

    A collective: every rank must call it, with the same full ``bank`` (B, D) and
    ``bank_labels`` (B,) (from :func:`embed_sharded`) and its own shard of the queries (M_r, D)
    with labels (M_r,); M_r may be 0. C comes from the bank and the largest query label over
    all ranks, and the correct counts are summed over ranks, so the result is the one
    :func:`knn_evaluate` gives for all queries in one process. Exactly it when not distributed.
    """
    return knn_evaluate_sharded_many(
        bank, bank_labels, queries, query_labels, [k], temperature, num_classes
    )[0]


def knn_evaluate_sharded_many(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    ks: Sequence[int],
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> list[KNNResult]:
    """:func:`knn_evaluate_sharded` for each k of ``ks`` (one similarity pass, one
    all-reduce), in their order."""
    bank, bank_labels = _labelled_bank(bank, bank_labels)
    classes = num_classes
    if not classes:
        no_label = torch.tensor(-1, device=query_labels.device)
        local = query_labels.max() if query_labels.numel() else no_label
        top_query_label = all_reduce(local.to(bank.device, torch.long), "max")
        classes = int(max(bank_labels.max().item(), top_query_label.item())) + 1
    correct = knn_correct_many(bank, bank_labels, queries, query_labels, classes, ks, temperature)
    # (len(ks) * 2 + 1,): the top-1 and top-5 counts of every k, then M_r
    counts = torch.cat([correct.flatten(), correct.new_tensor([queries.shape[0]])])
    totals = all_reduce(counts, "sum")
    pairs, count = totals[:-1].view(-1, 2), int(totals[-1])  # (len(ks), 2) over all ranks
    size = bank.shape[0]
    return [_result(c, count, k, temperature, size) for c, k in zip(pairs, ks, strict=True)]
