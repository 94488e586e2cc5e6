"""CUB caption encoder/decoder (REFERENCE.md §2, "CUB sentence" and "cubSft").

A caption is 32 token ids. The encoder embeds them, (B, 32) -> (B, 1, 32, 128), and treats the
32x128 embedding as a one-channel image: three Conv(4, 2, 1) halve both sides (16x64, 8x32,
4x16), two Conv((1, 4), (1, 2), (0, 1)) halve the width (4x8, 4x4), and Conv(4, 1, 0) heads give
loc and raw scale. The decoder mirrors it back to (N, 1, 32, 128) and a Linear(128 -> V) whose
weight is the embedding matrix itself (tied: one Parameter) and which has its own bias gives
logits (N, 32, V).

Two widths: ``cub_sentence`` (cubS, in cubIS) has maps 32/64/128/128/128 and convs without bias;
``cub_sentence_ft`` (cubSft, in cubISft) has maps 32/64/128/256/512 and convs with bias. Every
conv but the heads and the last transposed conv is followed by BatchNorm2d and ReLU.
"""
from __future__ import annotations

import torch
from torch import nn

MAX_LEN = 32
EMBED_DIM = 128
DATA_SHAPE = (MAX_LEN,)
CHANNELS = {"cub_sentence": (32, 64, 128, 128, 128), "cub_sentence_ft": (32, 64, 128, 256, 512)}
BIAS = {"cub_sentence": False, "cub_sentence_ft": True}

# (kernel, stride, padding): three steps that halve both sides, then two that halve the width.
_HALVE_BOTH, _HALVE_WIDTH = (4, 2, 1), ((1, 4), (1, 2), (0, 1))
_STEPS = (_HALVE_BOTH,) * 3 + (_HALVE_WIDTH,) * 2


def _block(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """(B, 32) token ids (any integer-valued dtype) -> (loc, raw scale), each (B, D)."""

    def __init__(self, latent_dim: int, vocab_size: int, width: str = "cub_sentence"):
        super().__init__()
        channels, bias = CHANNELS[width], BIAS[width]
        self.embedding = nn.Embedding(vocab_size, EMBED_DIM, padding_idx=0)
        layers, c_in = [], 1
        for c_out, (k, s, p) in zip(channels, _STEPS):  # 32x128 -> 16x64 -> 8x32 -> 4x16 -> 4x8 -> 4x4
            layers += _block(nn.Conv2d(c_in, c_out, k, s, p, bias=bias), c_out)
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.loc = nn.Conv2d(c_in, latent_dim, 4, 1, 0, bias=bias)
        self.raw_scale = nn.Conv2d(c_in, latent_dim, 4, 1, 0, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Shards may carry ids as float (.npy arrays are loaded as float32): exact for V < 2^24.
        h = self.embedding(x.long()).unsqueeze(1)  # (B, 1, 32, 128)
        h = self.body(h)  # (B, C, 4, 4)
        return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


class Decoder(nn.Module):
    """(N, D) latents -> logits (N, 32, V), or with ``logits=False`` the (N, 32, 128) inputs of
    the tied output layer (what the fused caption likelihood consumes)."""

    def __init__(self, latent_dim: int, embedding: nn.Embedding, width: str = "cub_sentence"):
        super().__init__()
        channels, bias = CHANNELS[width][::-1], BIAS[width]
        layers = _block(nn.ConvTranspose2d(latent_dim, channels[0], 4, 1, 0, bias=bias), channels[0])
        for c_in, c_out, (k, s, p) in zip(channels, channels[1:], _STEPS[::-1]):
            layers += _block(nn.ConvTranspose2d(c_in, c_out, k, s, p, bias=bias), c_out)
        k, s, p = _STEPS[0]
        layers += [nn.ConvTranspose2d(channels[-1], 1, k, s, p, bias=bias), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)  # 1x1 -> 4x4 -> 4x8 -> 4x16 -> 8x32 -> 16x64 -> 32x128
        vocab_size = embedding.num_embeddings
        self.out = nn.Linear(EMBED_DIM, vocab_size)
        self.out.weight = embedding.weight  # tied: the very same Parameter (V, 128)

    def forward(self, z: torch.Tensor, logits: bool = True) -> torch.Tensor:
        h = self.body(z.reshape(*z.shape, 1, 1)).reshape(-1, MAX_LEN, EMBED_DIM)  # (N, 32, 128)
        return self.out(h) if logits else h
