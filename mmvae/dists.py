"""Distribution families, scale parameterisations and log-space helpers.

Densities are written as plain functions of (value, loc, scale) rather than through
`torch.distributions` objects so that the estimators can evaluate the same density with its
parameters detached (DReG) and so that every log-density is computed in fp32 whatever the
networks' autocast precision; their sums over data and latent dimensions (`log_sum`) are fp64.
Noise is drawn in its standard form (loc 0, scale 1) and moved by `reparam`, which lets the
trainer draw the noise of all K particles once and hand slices of it to particle shards or
K-chunks: the union of the slices is exactly the one-process draw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import distributions as td

ETA = 1e-6
"""Small constant added to scales (REFERENCE.md: eta)."""


def fp32(t: torch.Tensor) -> torch.Tensor:
    """At least single precision: half/bfloat16 autocast outputs go up to fp32, fp64 stays."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


LOG_SUM_BLOCK = 16
"""Consecutive terms that `log_sum` adds in fp32 before the fp64 accumulation."""


def log_sum(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum log-densities over `dim`, accumulated and returned in fp64.

    Why: an MNIST-SVHN log-weight is ~ -5e3 nats, where one fp32 ulp is ~5e-4; a sum over
    784/3072 pixels kept in fp32 rounds differently when the same particles are decoded in
    another batch layout (K/P particles per rank, K-chunks), and the importance weights
    exp(l - lse) inherit that ~5e-4 relative noise. Accumulated in fp64, the layouts agree to the
    rounding of the fp32 terms themselves. Long sums first add blocks of LOG_SUM_BLOCK terms in
    fp32 (partial sums of a few nats, rounded at ~1e-6) and accumulate the blocks in fp64: an
    fp64 copy of every term (x K particles x B x pixels) would cost a full extra pass over the
    largest tensor of the step. The gradient flows back to the terms in their own dtype.
    """
    n = t.shape[dim]
    if n <= 4 * LOG_SUM_BLOCK or n % LOG_SUM_BLOCK:
        return t.sum(dim, dtype=torch.float64)
    blocks = t.movedim(dim, -1).unflatten(-1, (n // LOG_SUM_BLOCK, LOG_SUM_BLOCK)).sum(-1)
    return blocks.sum(-1, dtype=torch.float64)


@dataclass(frozen=True)
class Family:
    """A location-scale family: standard noise, reparameterisation, log-density, torch object."""

    name: str
    noise: Callable[[tuple, torch.Generator | None, torch.device], torch.Tensor]
    log_prob: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    torch_cls: type

    def reparam(self, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = loc + scale * eps, with eps drawn from `noise` (loc 0, scale 1)."""
        return loc + scale * eps

    def dist(self, loc: torch.Tensor, scale: torch.Tensor) -> td.Distribution:
        """The torch.distributions object, for analytic KL and sampling in pictures."""
        return self.torch_cls(loc, scale)


def _normal_noise(shape, generator, device):
    return torch.randn(shape, generator=generator, device=device)


def _laplace_noise(shape, generator, device):
    # Inverse CDF of the standard Laplace from u ~ U(-1, 1); clamp keeps log1p finite.
    u = torch.rand(shape, generator=generator, device=device) * 2 - 1
    u = u.clamp(-1 + 1e-7, 1 - 1e-7)
    return -torch.sign(u) * torch.log1p(-u.abs())


def _normal_log_prob(x, loc, scale):
    x, loc, scale = fp32(x), fp32(loc), fp32(scale)
    return -((x - loc) ** 2) / (2 * scale**2) - scale.log() - 0.5 * math.log(2 * math.pi)


def _laplace_log_prob(x, loc, scale):
    x, loc, scale = fp32(x), fp32(loc), fp32(scale)
    return -(x - loc).abs() / scale - scale.log() - math.log(2)


FAMILIES: dict[str, Family] = {
    "normal": Family("normal", _normal_noise, _normal_log_prob, td.Normal),
    "laplace": Family("laplace", _laplace_noise, _laplace_log_prob, td.Laplace),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown distribution family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def kl(family_q: Family, loc_q, scale_q, family_p: Family, loc_p, scale_p) -> torch.Tensor:
    """KL(q || p) per dimension, analytic for the pairs torch registers (Laplace/Normal)."""
    q = family_q.dist(fp32(loc_q), fp32(scale_q))
    p = family_p.dist(fp32(loc_p), fp32(scale_p))
    return td.kl_divergence(q, p)


# --- scale parameterisations (REFERENCE.md §1) -------------------------------------------------

def softmax_scale(raw: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """D * softmax(raw) + eta over the last dim: the scales always sum to about D."""
    return raw.shape[-1] * F.softmax(fp32(raw), dim=-1) + eta


def softplus_scale(raw: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """softplus(raw) + eta."""
    return F.softplus(fp32(raw)) + eta


SCALES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "softmax": softmax_scale,
    "softplus": softplus_scale,
}
