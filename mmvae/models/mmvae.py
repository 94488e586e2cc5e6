"""The mixture-of-experts multimodal VAE (Shi et al. 2019).

q(z|x_1..M) = (1/M) sum_m q_m(z|x_m). The mixture exists only inside the estimators, which draw K
particles from each expert (stratified sampling) and evaluate the mixture density at every one.
"""
from __future__ import annotations

import torch
from torch import nn

from mmvae.dists import SCALES, get_family
from mmvae.models.vae import VAE, LatentModel


class MMVAE(LatentModel):
    multimodal = True

    def __init__(self, vaes: list[VAE], *, latent_dim: int, prior: str = "laplace",
                 prior_scale: str = "softmax", prior_eta: float = 0.0, prior_init: float = 0.0,
                 learn_prior: bool = False, llik_scaling: list[float]):
        super().__init__()
        self.vaes = nn.ModuleList(vaes)
        self.latent_dim = latent_dim
        self.prior_family = get_family(prior)
        self._prior_scale, self._prior_eta = SCALES[prior_scale], prior_eta
        self.register_buffer("prior_loc", torch.zeros(1, latent_dim))
        self.prior_raw = nn.Parameter(torch.full((1, latent_dim), float(prior_init)),
                                      requires_grad=learn_prior)
        # One prior parameter for the whole model: the sub-VAEs' own priors would otherwise be
        # parameters without gradient, which DDP rejects.
        for vae in self.vaes:
            vae.prior_raw = self.prior_raw
        self._llik_scaling = list(llik_scaling)

    @property
    def experts(self) -> list[VAE]:
        return list(self.vaes)

    @property
    def modalities(self) -> list[str]:
        return [v.modality for v in self.vaes]

    @property
    def llik_scaling(self) -> list[float]:
        return self._llik_scaling
