"""MNIST MLP encoder/decoder (REFERENCE.md §2): 784 -> 400 (-> 400)* -> D heads, and the mirror."""
from __future__ import annotations

import torch
from torch import nn

from mmvae.dists import ETA

DATA_SHAPE = (1, 28, 28)
HIDDEN = 400


def _mlp(n_in: int, num_hidden_layers: int) -> nn.Sequential:
    layers = [nn.Linear(n_in, HIDDEN), nn.ReLU(inplace=True)]
    for _ in range(num_hidden_layers - 1):
        layers += [nn.Linear(HIDDEN, HIDDEN), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int, num_hidden_layers: int = 1):
        super().__init__()
        self.body = _mlp(784, num_hidden_layers)
        self.loc = nn.Linear(HIDDEN, latent_dim)
        self.raw_scale = nn.Linear(HIDDEN, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.reshape(x.shape[0], -1))  # (B, 400)
        return self.loc(h), self.raw_scale(h)


class Decoder(nn.Module):
    def __init__(self, latent_dim: int, num_hidden_layers: int = 1):
        super().__init__()
        self.body = _mlp(latent_dim, num_hidden_layers)
        self.out = nn.Linear(HIDDEN, 784)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mean = torch.sigmoid(self.out(self.body(z)))  # (N, 784)
        # Clamped so a Laplace/Bernoulli-style likelihood never sees exact 0 or 1.
        return mean.clamp(ETA, 1 - ETA).reshape(-1, *DATA_SHAPE)
