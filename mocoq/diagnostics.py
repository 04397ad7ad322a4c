"""Health metrics of a contrastive run, as pure functions of tensors a training step already has.

Wang & Isola (2020), "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere": :func:`alignment` (lower is better: positives close) and
:func:`uniformity` (lower is better: embeddings spread over the sphere). :func:`feature_std` and
:func:`collapsed` watch for the collapse of all embeddings to one point (the per-dimension
standard deviation of L2-normalised features, as in Chen & He 2021, SimSiam). The queue and
logit metrics read the (N, 1 + K) logits of :func:`mocoq.loss.info_nce`, positive in column 0.

Every function returns a tensor on its inputs' device and never synchronises with the host, so a
caller can stack several and move them to the host once. Imports only torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COLLAPSE_FRACTION = 0.02
""":func:`collapsed` flags features whose :func:`feature_std` is under this fraction of the
1/sqrt(D) of unit vectors spread uniformly over the sphere. Collapse (every output pointing one
way) gives 0. Randomly initialised encoders are spread little but measurably more (on Gaussian
noise: the small ResNet's 128-d projections 0.30 / sqrt(D) in training mode, 0.17 in eval
mode; a toy 4-and-8-channel net 0.03 to 0.18 over ten seeds), and training spreads them
towards 1 / sqrt(D); 0.02 flags only outputs 50 times less spread than uniform, so that the
flag means collapse, not an early or slow start."""


class StepOutputs(NamedTuple):
    """What one MoCo training step computed, detached: the diagnostics' input.

    Attributes:
        queries: L2-normalised query projections (N, D) (2N with the symmetric loss: both halves).
        keys: their positive keys (N, D), row i the positive of query i.
        logits: InfoNCE logits (N, 1 + K), already divided by the temperature, positive first.
        features: backbone features (N, F) of the query view(s).
    """

    queries: Tensor
    keys: Tensor
    logits: Tensor
    features: Tensor


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """``E_i ||z1_i - z2_i||^alpha``: how far apart positive pairs lie (0 = identical).

    Args:
        z1, z2: (N, D) embeddings of the two views, row i a positive pair; each row is
            L2-normalised first (a no-op for unit vectors).
        alpha: exponent of the distance (2 in the paper).

    Returns:
        A float32 scalar in [0, 2^alpha].
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be (N, D)")
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (z1 - z2).norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """``log E_{i<j} exp(-t ||z_i - z_j||^2)`` over all pairs of distinct rows.

    Lower is more uniform: all rows equal gives 0; for unit vectors spread evenly over the
    sphere the squared distances concentrate at 2 as D grows, and the value approaches -2t.

    Args:
        z: (N, D) embeddings, N >= 2; each row is L2-normalised first.
        t: the kernel's scale (2 in the paper).

    Returns:
        A float32 scalar <= 0, computed with a log-sum-exp over the N (N - 1) / 2 pairs.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"uniformity needs (N, D) embeddings with N >= 2, got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=1)
    squared = torch.pdist(z, p=2).pow(2)  # (N (N - 1) / 2,): pairs i < j
    return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())


def feature_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension standard deviation of L2-normalised rows.

    The population standard deviation (divided by N) of each of the D columns of
    ``normalize(z)``, averaged over the columns: 0 when every row is the same (collapse), about
    1 / sqrt(D) for rows spread uniformly over the unit sphere.

    Args:
        z: (N, D) features, N >= 1.

    Returns:
        A float32 scalar in [0, 1 / sqrt(D)] (at most sqrt(1 / D) by Jensen's inequality).
    """
    if z.dim() != 2:
        raise ValueError(f"feature_std needs (N, D) features, got {tuple(z.shape)}")
    return F.normalize(z.float(), dim=1).std(dim=0, correction=0).mean()


def collapse_threshold(dim: int, fraction: float = COLLAPSE_FRACTION) -> float:
    """The :func:`feature_std` under which D-dimensional features count as collapsed:
    ``fraction / sqrt(D)``."""
    if dim < 1:
        raise ValueError(f"the feature dimension must be positive, got {dim}")
    return fraction / math.sqrt(dim)


def collapsed(z: Tensor, fraction: float = COLLAPSE_FRACTION) -> Tensor:
    """1.0 if the (N, D) features ``z`` have collapsed (``feature_std(z)`` under
    ``fraction / sqrt(D)``, see :data:`COLLAPSE_FRACTION`), else 0.0: a float32 scalar."""
    return (feature_std(z) < collapse_threshold(z.shape[1], fraction)).float()


@torch.no_grad()
def weight_distance(query_module: nn.Module, key_module: nn.Module) -> Tensor:
    """L2 norm of the difference of two modules' parameters, all taken as one flat vector.

    ``sqrt(sum_p ||query_p - key_p||^2)`` over the parameters (not the buffers) in order, with
    fused foreach ops: how far the EMA key encoder trails the query encoder.

    Args:
        query_module, key_module: modules of the same structure (parameters pair up in order).

    Returns:
        A float32 scalar on the parameters' device (0.0 on the CPU for modules without any).
    """
    query = [p.detach() for p in query_module.parameters()]
    key = [p.detach() for p in key_module.parameters()]
    if len(query) != len(key):
        raise ValueError(f"the modules have {len(query)} and {len(key)} parameters")
    if not query:
        return torch.zeros(())
    norms = torch._foreach_norm(torch._foreach_sub(query, key))  # one norm per parameter
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def positive_logit(logits: Tensor) -> Tensor:
    """Mean logit of the positive, column 0 of (N, 1 + K) logits: a float32 scalar."""
    return logits[:, 0].float().mean()


def negative_logit(logits: Tensor) -> Tensor:
    """Mean logit of the negatives, columns 1.. of (N, 1 + K) logits: a float32 scalar."""
    return logits[:, 1:].float().mean()


def positive_top1(logits: Tensor) -> Tensor:
    """Fraction of the N rows of (N, 1 + K) logits whose positive (column 0) is strictly above
    every negative: a float32 scalar in [0, 1] (a tie counts as a miss)."""
    return (logits[:, 0] > logits[:, 1:].amax(dim=1)).float().mean()


def queue_fill(filled: int, size: int) -> float:
    """Fraction of the K = ``size`` queue slots that hold real keys (the rest still hold the
    random initial vectors): ``filled / size`` in [0, 1]."""
    if size < 1:
        raise ValueError(f"queue size must be positive, got {size}")
    return filled / size


def mean_key_age(written_at: Tensor, writes: int) -> Tensor:
    """Mean age, in write calls, of the keys of a queue.

    Args:
        written_at: int64 (K,), the write call (0, 1, ...) that wrote each slot, -1 if unknown.
        writes: the number of write calls so far; the last one's keys have age 0.

    Returns:
        A float32 scalar: the mean of ``writes - 1 - written_at`` over the known slots (0 if
        none is known).
    """
    known = written_at >= 0  # (K,)
    ages = (writes - 1 - written_at).clamp(min=0).float()  # (K,)
    return (ages * known).sum() / known.sum().clamp(min=1)
