"""Linear encoder/decoder for the linear-Gaussian reference models."""
from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """q(z|x) = N(A x + c, softplus(s)): the scale is amortisation-free (one per dimension)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Linear(data_dim, latent_dim)
        self.raw_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.loc(x)
        return loc, self.raw_scale.expand_as(loc)


class Decoder(nn.Module):
    """Mean of p(x|z) = N(W z + b, sigma^2 I)."""

    def __init__(self, latent_dim: int, data_dim: int):
        super().__init__()
        self.linear = nn.Linear(latent_dim, data_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)
