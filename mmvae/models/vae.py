"""The unimodal VAE: an encoder, a decoder, a prior and a likelihood.

A VAE exposes the same interface as an MMVAE with one expert (`experts`, `llik_scaling`,
`prior_params`, `sample_noise`), so one set of estimators serves both. It holds no state between
calls: the estimators get everything they need from the methods below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mmvae.dists import ETA, SCALES, Family, fp32, get_family, log_sum


_LOG_NORM = {"laplace": lambda s: math.log(2 * s),
             "normal": lambda s: math.log(s) + 0.5 * math.log(2 * math.pi)}


@dataclass(frozen=True)
class LocScaleLikelihood:
    """p(x|z) = family(x; decoder(z), scale) with a fixed scale (REFERENCE.md: 0.75, 0.01)."""

    family: str
    scale: float

    def log_prob_sum(self, x: torch.Tensor, out: torch.Tensor, ndims: int) -> torch.Tensor:
        """log p(x|z) summed over the last `ndims` dims: fp32 terms, fp64 sum (`log_sum`). With
        a fixed scalar scale the distance is summed first and scaled once: a third of the memory
        passes of the elementwise density over (M, K, B, *data_shape)."""
        diff = (fp32(x) - fp32(out)).flatten(-ndims)  # (..., n)
        if self.family == "laplace":
            energy = log_sum(diff.abs()) / self.scale
        else:
            energy = log_sum(diff.square()) / (2 * self.scale**2)
        return -energy - diff.shape[-1] * _LOG_NORM[self.family](self.scale)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out


class LatentModel(nn.Module):
    """What VAE and MMVAE share: the prior, particle noise and pictures over `experts`.

    Subclasses set `prior_family`, `_prior_scale`, `_prior_eta`, the `prior_loc` buffer and the
    `prior_raw` parameter, and define `experts`."""

    experts: list

    def prior_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of p(z), each (1, D)."""
        return self.prior_loc, self._prior_scale(self.prior_raw, self._prior_eta)

    def sample_noise(self, K: int, B: int, generator: torch.Generator | None = None,
                     device=None) -> list[torch.Tensor]:
        """Standard noise of K particles for each posterior component (the experts, for the
        mixture of experts): a list of (K, B, D)."""
        device = device or self.prior_loc.device
        return [family.noise((K, B, self.latent_dim), generator, device)
                for family in self.component_families()]

    def components(self, posts, subsets=None, present=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of the components of q(z|X) from the experts' posteriors: one VAE's
        posterior is its only component (MMVAE overrides this with its fusion)."""
        return list(posts)

    def component_mask(self, present, subsets=None):
        """(S, B) bool: which components exist per sample given the modalities `present`
        (B, M) bool; None when every one does (one modality has nothing to leave out)."""
        return None

    def component_families(self, subsets=None) -> list[Family]:
        return [e.posterior_family for e in self.experts]

    def latent_mask(self, present):
        """(B, D) bool: the latent coordinates a sample's bound reads given the modalities
        `present` (B, M) bool; None when it reads them all (MMVAE+ overrides: an absent
        modality's private latent is integrated out)."""
        return None

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Decoder means of n prior samples, one tensor per modality."""
        loc, scale = self.prior_params()
        eps = self.prior_family.noise((n, self.latent_dim), generator, loc.device)
        z = self.prior_family.reparam(loc, scale, eps)
        return [fp32(e.likelihood.mean(e.decode(z))) for e in self.experts]

    @torch.no_grad()
    def reconstruct(self, xs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """grid[r][d]: modality d decoded (mean) from one posterior sample of expert r."""
        grid = []
        for expert, x in zip(self.experts, xs):
            loc, scale = expert.posterior(x)
            z = expert.posterior_family.dist(loc, scale).sample()
            grid.append([fp32(e.likelihood.mean(e.decode(z))) for e in self.experts])
        return grid


class VAE(LatentModel):
    """One modality: q(z|x) = posterior(loc, scale(raw)), p(z) = prior(0, scale(theta)),
    p(x|z) = likelihood(decoder(z))."""

    multimodal = False

    def __init__(self, *, modality: str, encoder: nn.Module, decoder: nn.Module,
                 data_shape: tuple, latent_dim: int, prior: str = "laplace",
                 posterior: str = "laplace", posterior_scale: str = "softmax",
                 prior_scale: str = "softmax", prior_eta: float = 0.0, prior_init: float = 0.0,
                 likelihood=LocScaleLikelihood("laplace", 0.75), learn_prior: bool = False):
        super().__init__()
        self.modality = modality
        self.enc, self.dec = encoder, decoder
        self.data_shape = tuple(data_shape)
        self.latent_dim = latent_dim
        self.posterior_family: Family = get_family(posterior)
        self.prior_family: Family = get_family(prior)
        self._posterior_scale = SCALES[posterior_scale]
        self._prior_scale, self._prior_eta = SCALES[prior_scale], prior_eta
        self.likelihood = likelihood
        # The prior mean is a fixed zero; only its scale parameters may be learned.
        self.register_buffer("prior_loc", torch.zeros(1, latent_dim))
        self.prior_raw = nn.Parameter(torch.full((1, latent_dim), float(prior_init)),
                                      requires_grad=learn_prior)

    # --- the interface the estimators use ------------------------------------------------------
    @property
    def experts(self) -> list["VAE"]:
        return [self]

    @property
    def modalities(self) -> list[str]:
        return [self.modality]

    @property
    def llik_scaling(self) -> list[float]:
        return [1.0]  # unimodal models are never rescaled (REFERENCE.md §2)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x), each (B, D), fp32."""
        loc, raw = self.enc(x)
        return fp32(loc), self._posterior_scale(raw, ETA)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters for latents (..., D) -> (..., *data_shape), one decoder call."""
        lead = z.shape[:-1]
        out = self.dec(z.reshape(-1, z.shape[-1]))
        return out.reshape(*lead, *out.shape[1:])

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over data dims: x (B, ...), z (..., B, D) -> (..., B), fp64."""
        return self.likelihood.log_prob_sum(x, self.decode(z), len(self.data_shape))


def default_llik_scaling(data_shapes: list[tuple], first: float) -> list[float]:
    """lambda_1 = prod(shape_2)/prod(shape_1) (3072/784 for MNIST-SVHN) unless `first` > 0."""
    if first > 0:
        return [first] + [1.0] * (len(data_shapes) - 1)
    sizes = [math.prod(s) for s in data_shapes]
    return [sizes[1] / sizes[0]] + [1.0] * (len(sizes) - 1)
