"""InfoNCE with a queue of negatives: the MoCo contrastive loss, as a pure function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(query: Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for ``query``'s device, else ``query``'s."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def info_nce(
    query: Tensor, key: Tensor, negatives: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of picking each query's own key among the queued negatives.

    ``loss = -mean_i log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.n_j / T)) )``

    Args:
        query: (N, D) L2-normalised query projections.
        key: (N, D) L2-normalised positive keys, one per query (no gradient expected).
        negatives: (K, D) L2-normalised negative keys (the queue).
        temperature: softmax temperature T > 0.

    Returns:
        ``(loss, logits)``: the scalar float32 mean loss and the logits (N, 1 + K) already
        divided by the temperature, with the positive in column 0.

    Precision: under autocast the (N, D) @ (D, K) queue product, and so the logits, are in the
    autocast dtype (bf16: half the memory and the fast matmul; the queue, stored in float32,
    is cast down, never the query up), on every device alike; without autocast, in the query's
    dtype. The cross entropy always runs in float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if query.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must match")
    dtype = _compute_dtype(query)
    positive = (query * key).sum(dim=1, keepdim=True)  # (N, 1)
    negative = query.to(dtype) @ negatives.to(dtype).t()  # (N, D) @ (D, K) -> (N, K)
    logits = torch.cat([positive.to(dtype), negative], dim=1) / temperature  # (N, 1 + K)
    targets = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    loss = F.cross_entropy(logits.float(), targets)
    return loss, logits
