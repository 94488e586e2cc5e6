"""A small conv encoder/decoder for one 3x28x28 PolyMNIST-like modality (polydigits, PolyMNIST).

Sized for CPU: 16/32/64 feature maps (half the SVHN pair's), since a 5-modality model is five of
these and every decoder sees the particles of all five experts (the MMVAE+ / MoPoE papers use a
wider stack of the same shape for PolyMNIST).
"""
from __future__ import annotations

import torch
from torch import nn

from mmvae.dists import ETA

DATA_SHAPE = (3, 28, 28)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(inplace=True),     # 14x14
            nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(inplace=True),    # 7x7
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(inplace=True),    # 4x4
        )
        self.loc = nn.Conv2d(64, latent_dim, 4, 1, 0)
        self.raw_scale = nn.Conv2d(64, latent_dim, 4, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


class Decoder(nn.Module):
    """The first layer maps D -> 64x4x4 with one matrix product (it sees M*K*B latents per
    step); the transposed convolutions run channels-last (cheaper on CPU with oneDNN)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.first = nn.Linear(latent_dim, 64 * 4 * 4)
        self.body = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 3, 2, 1), nn.ReLU(inplace=True),    # 7x7
            nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(inplace=True),    # 14x14
            nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Sigmoid(),              # 28x28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.first(z).reshape(-1, 64, 4, 4).contiguous(memory_format=torch.channels_last)
        # Clamped so the Laplace likelihood's location never sits exactly on 0 or 1.
        return self.body(h).clamp(ETA, 1 - ETA)  # (N, 3, 28, 28)
