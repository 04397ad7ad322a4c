"""The key encoder as an exponential moving average (EMA) of the query encoder."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def init_key_from_query(query: nn.Module) -> nn.Module:
    """Return an exact copy of ``query`` whose parameters never receive gradients."""
    key = copy.deepcopy(query)
    for parameter in key.parameters():
        parameter.requires_grad_(False)
    return key


@torch.no_grad()
def ema_update(query: nn.Module, key: nn.Module, momentum: float) -> None:
    """``key = momentum * key + (1 - momentum) * query`` over all parameters, in fused ops.

    Buffers (BatchNorm running statistics) are left alone: the key encoder keeps its own, as in
    the MoCo reference. ``momentum=1`` freezes the key encoder, ``momentum=0`` copies the query.

    Args:
        query: the encoder trained by gradient descent.
        key: a module of the same structure (see :func:`init_key_from_query`).
        momentum: m in [0, 1].
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    key_params: list[Tensor] = list(key.parameters())
    query_params: list[Tensor] = list(query.parameters())
    if len(key_params) != len(query_params):
        raise ValueError(
            f"key encoder has {len(key_params)} parameters, query has {len(query_params)}"
        )
    if momentum == 1.0:
        return
    # lerp: key + (1 - m) * (query - key) == m * key + (1 - m) * query
    torch._foreach_lerp_(key_params, [p.detach() for p in query_params], 1.0 - momentum)
