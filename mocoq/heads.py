"""Projection heads that map backbone features to the contrastive embedding space."""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Sequential):
    """An MLP projection: ``num_layers=1`` is MoCo v1's linear map, ``2`` is MoCo v2's MLP.

    Hidden layers are Linear -> (BatchNorm1d) -> ReLU; the output layer is plain Linear.

    Args:
        in_dim: backbone feature dimension.
        hidden_dim: width of the hidden layers; None uses ``in_dim`` (as MoCo v2 does).
        out_dim: embedding dimension D (the queue's key dimension).
        num_layers: number of Linear layers, >= 1.
        batch_norm: add BatchNorm1d after each hidden Linear (MoCo v3 style).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = False,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"a projection head needs at least one layer, got {num_layers}")
        hidden_dim = hidden_dim or in_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, features: Tensor) -> Tensor:
        """Map features (N, in_dim) to projections (N, out_dim) (not normalised)."""
        return super().forward(features)
