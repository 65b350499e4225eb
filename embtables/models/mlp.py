"""Small shared building blocks."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, sizes: list[int], *, last_activation: bool = True,
        dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for i, h in enumerate(sizes):
        layers.append(nn.Linear(d, h))
        if i < len(sizes) - 1 or last_activation:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        d = h
    return nn.Sequential(*layers)
