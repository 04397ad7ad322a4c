"""Weighted k-nearest-neighbour classification on embeddings (pure, chunked)."""

from __future__ import annotations

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
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be positive, got {temperature}")
    if k < 1:
        raise ValueError(f"kNN k must be positive, got {k}")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} items but {bank_labels.shape[0]} labels")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device).long()
    scores = []
    for chunk in torch.split(F.normalize(queries.float(), dim=1), chunk_size):
        similarity = chunk.to(bank.device) @ bank.t()  # (m, D) @ (D, B) -> (m, B)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (m, k)
        weights = (top_sim / temperature).exp()  # (m, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=bank.device)  # (m, C)
        votes.scatter_add_(1, labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)  # (M, C)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows of ``scores`` (M, C) whose true label (M,) is among the top k."""
    labels = labels.to(scores.device)
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (M, kmax)
    hits = ranked == labels.unsqueeze(1)  # (M, kmax)
    return [hits[:, :k].any(dim=1).float().mean().item() for k in ks]
