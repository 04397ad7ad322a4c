"""Feature extraction and the kNN evaluation protocol shared by the monitor and baselines."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mocoq.knn import knn_predict, topk_accuracy


@torch.no_grad()
def embed(
    encoder: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Run ``encoder`` over ``(images (N, C, H, W), targets (N,))`` batches.

    Modules are put in eval mode for the pass and restored after. Returns features (M, F) and
    targets (M,), both on ``device``.
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
    return torch.cat(features), torch.cat(targets)


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


def knn_evaluate(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
) -> KNNResult:
    """Weighted kNN top-1 / top-5 of ``queries`` (M, D) against ``bank`` (B, D), cosine metric."""
    labelled = bank_labels >= 0
    if not bool(labelled.any()):
        raise ValueError("the kNN bank has no labels: choose a labelled split as the bank")
    bank, bank_labels = bank[labelled], bank_labels[labelled]
    classes = num_classes or int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    scores = knn_predict(queries, bank, bank_labels, classes, k, temperature)
    top1, top5 = topk_accuracy(scores, query_labels, (1, 5))
    return KNNResult(
        top1, top5, min(k, bank.shape[0]), temperature, bank.shape[0], queries.shape[0]
    )
