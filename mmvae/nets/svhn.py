"""SVHN convolutional encoder/decoder (REFERENCE.md §2): 3x32x32 <-> D through 32/64/128 maps."""
from __future__ import annotations

import torch
from torch import nn

DATA_SHAPE = (3, 32, 32)


class Encoder(nn.Module):
    def __init__(self, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.ReLU(inplace=True),     # 16x16
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(inplace=True),    # 8x8
            nn.Conv2d(64, 128, 4, 2, 1), nn.ReLU(inplace=True),   # 4x4
        )
        self.loc = nn.Conv2d(128, latent_dim, 4, 1, 0)
        self.raw_scale = nn.Conv2d(128, latent_dim, 4, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        # flatten(1) rather than squeeze(): keeps B=1 batches working (the paper code breaks).
        return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


class Decoder(nn.Module):
    """The decoder sees M*K*B latents per step, so two equivalent evaluations save time:
    the first transposed conv acts on a 1x1 input, i.e. it is a matrix product (computed as one);
    the others run channels-last, ~30% cheaper on CPU (oneDNN) and GPUs (cuDNN). Same modules,
    weights and maths as the plain stack."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 128, 4, 1, 0), nn.ReLU(inplace=True),  # 4x4
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(inplace=True),          # 8x8
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(inplace=True),           # 16x16
            nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Sigmoid(),                     # 32x32
        )  # weights stay contiguous (DeepSpeed broadcasts them as flat bytes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.body[0]  # ConvTranspose2d(D, 128, 4) on 1x1: out[n,c,h,w] = z[n] . W[:,c,h,w]
        weight = first.weight.reshape(first.in_channels, -1)  # (D, 128*16)
        h = torch.addmm(first.bias.repeat_interleave(16), z, weight)  # (N, 128*16)
        h = h.reshape(-1, first.out_channels, 4, 4).contiguous(memory_format=torch.channels_last)
        return self.body[2:](torch.relu(h))  # (N, 3, 32, 32), channels-last
