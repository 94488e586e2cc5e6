"""CUB ResNet-feature encoder/decoder (REFERENCE.md §2, "CUB feature"): 2048-d ImageNet
ResNet-101 avgpool features <-> D through ELU MLPs 1024/512/256.

The decoder output has no activation: it is the Laplace location of raw (non-negative,
unnormalised) ResNet features.
"""
from __future__ import annotations

import torch
from torch import nn

FEATURE_DIM = 2048
DATA_SHAPE = (FEATURE_DIM,)
HIDDEN = (1024, 512, 256)


def _mlp(sizes) -> nn.Sequential:
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ELU(inplace=True)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.body = _mlp((FEATURE_DIM, *HIDDEN))
        self.loc = nn.Linear(HIDDEN[-1], latent_dim)
        self.raw_scale = nn.Linear(HIDDEN[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.flatten(1))  # (B, 256)
        return self.loc(h), self.raw_scale(h)


class Decoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.body = _mlp((latent_dim, *HIDDEN[::-1]))
        self.out = nn.Linear(HIDDEN[0], FEATURE_DIM)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))  # (N, 2048)
