"""Projection and prediction heads. Widths follow the backbone (``in_dim = backbone.dim``)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Sequential):
    """``Linear -> [BN] -> ReLU -> ... -> Linear [-> BN]``.

    MoCo-v2's projector is ``MLP(2048, 2048, 128)`` (no BN); BYOL's projector/predictor is
    ``MLP(d, 4096, 256, batch_norm=True)``. ``last_bn`` adds a BatchNorm (no affine) after the last layer.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = False,
                 last_bn: bool = False, bias: bool = True) -> None:
        if num_layers < 1:
            raise ValueError(f"MLP needs at least 1 layer, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=bias and not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 (typed for readers)
        return super().forward(x)
