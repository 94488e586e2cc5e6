"""CUB image encoder/decoder (REFERENCE.md §2, "CUB image"): 3x64x64 <-> D through 64..512 maps.

Encoder: four Conv(4, 2, 1)+ReLU (64 -> 32 -> 16 -> 8 -> 4 pixels, 64/128/256/512 maps), then
two Conv(512 -> D, 4, 1, 0) heads (loc and raw scale). Decoder: ConvT(D -> 512, 4, 1, 0)+ReLU,
three ConvT(4, 2, 1)+ReLU to 64 maps, ConvT(64 -> 3, 4, 2, 1) + sigmoid: the Laplace location.
"""
from __future__ import annotations

import torch
from torch import nn

DATA_SHAPE = (3, 64, 64)
CHANNELS = (64, 128, 256, 512)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        layers, c_in = [], DATA_SHAPE[0]
        for c_out in CHANNELS:  # 64 -> 32 -> 16 -> 8 -> 4 pixels
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.ReLU(inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.loc = nn.Conv2d(c_in, latent_dim, 4, 1, 0)
        self.raw_scale = nn.Conv2d(c_in, latent_dim, 4, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (B, 512, 4, 4)
        # flatten(1), not squeeze(): B=1 keeps its batch dimension (the paper code breaks there).
        return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


class Decoder(nn.Module):
    """Sees M*K*B latents per step (6400 at K=50, B=64), so, as the SVHN decoder: the first
    transposed conv acts on a 1x1 input and is computed as one matrix product, and the rest
    runs channels-last (faster with oneDNN and cuDNN). Same modules, weights and maths as the
    plain stack (tested)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        layers = [nn.ConvTranspose2d(latent_dim, CHANNELS[-1], 4, 1, 0), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(CHANNELS[:0:-1], CHANNELS[-2::-1]):  # 512->256->128->64
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(CHANNELS[0], DATA_SHAPE[0], 4, 2, 1), nn.Sigmoid()]
        self.body = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.body[0]  # out[n, c, h, w] = z[n] . W[:, c, h, w] + b[c] on a 1x1 input
        weight = first.weight.reshape(first.in_channels, -1)  # (D, 512*16)
        h = torch.addmm(first.bias.repeat_interleave(16), z, weight)  # (N, 512*16)
        h = h.reshape(-1, first.out_channels, 4, 4).contiguous(memory_format=torch.channels_last)
        return self.body[2:](torch.relu(h))  # (N, 3, 64, 64), channels-last
