"""Weighted k-nearest-neighbour classification on embeddings (pure, chunked)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores by temperature-weighted voting of the k most cosine-similar bank items.

    Each neighbour j votes for its label with weight ``exp(cos(q, b_j) / temperature)`` (the
    protocol of Wu et al. 2018 used by the MoCo and InstDisc kNN monitors).

    Args:
        queries: (M, D) features to classify (normalised here).
        bank: (B, D) reference features (normalised here).
        bank_labels: (B,) int labels in ``[0, num_classes)``.
        num_classes: C.
        k: neighbours per query (clamped to B).
        temperature: voting temperature T > 0.
        chunk_size: queries per similarity block, bounding memory at chunk_size x B.

    Returns:
        (M, C) class scores; ``scores.argmax(1)`` is the prediction.
    """
    return knn_predict_many(queries, bank, bank_labels, num_classes, [k], temperature, chunk_size)[
        0
    ]


def knn_predict_many(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> list[Tensor]:
    """:func:`knn_predict` for several k from one similarity pass: the ``max(ks)`` nearest
    bank items of each query are found once and the vote with k neighbours uses the first k.

    Returns:
        one (M, C) score tensor per k, in the order of ``ks``.
    """
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be positive, got {temperature}")
    if not ks or min(ks) < 1:
        raise ValueError(f"kNN k must be positive, got {list(ks)}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} items but {bank_labels.shape[0]} labels")
    used = [min(k, bank.shape[0]) for k in ks]
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device).long()
    scores: list[list[Tensor]] = [[] for _ in used]
    for chunk in torch.split(F.normalize(queries.float(), dim=1), chunk_size):
        similarity = chunk.to(bank.device) @ bank.t()  # (m, D) @ (D, B) -> (m, B)
        top_sim, top_idx = similarity.topk(max(used), dim=1)  # (m, kmax), descending
        weights = (top_sim / temperature).exp()  # (m, kmax)
        top_labels = labels[top_idx]  # (m, kmax)
        for votes_of_k, k in zip(scores, used, strict=True):
            votes = torch.zeros(chunk.shape[0], num_classes, device=bank.device)  # (m, C)
            votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            votes_of_k.append(votes)
    if not scores[0]:  # no queries
        return [torch.zeros(0, num_classes, device=bank.device) for _ in used]
    return [torch.cat(votes) for votes in scores]  # (M, C) each


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows of ``scores`` (M, C) whose true label (M,) is among the top k."""
    labels = labels.to(scores.device)
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (M, kmax)
    hits = ranked == labels.unsqueeze(1)  # (M, kmax)
    return [hits[:, :k].any(dim=1).float().mean().item() for k in ks]
