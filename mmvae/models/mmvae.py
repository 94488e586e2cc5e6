"""The multimodal VAE over M experts, with the joint posterior given by a fusion.

Default fusion `moe` (Shi et al. 2019): q(z|x_1..M) = (1/M) sum_m q_m(z|x_m). The other fusions
(`mmvae.models.fusions`: mopoe, poe) make q(z|X) a uniform mixture of other *components*
(products of experts over subsets). The mixture exists only inside the estimators, which draw K
particles from each component (stratified sampling) and evaluate the mixture density at every one.
"""
from __future__ import annotations

import torch
from torch import nn

from mmvae.dists import SCALES, Family, get_family
from mmvae.models.fusions import FUSIONS, Fusion
from mmvae.models.vae import VAE, LatentModel


def mixture_draws(families: list[Family], params: list[tuple], K: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """K draws from the uniform mixture of experts with posteriors `families[j]`(*params[j])
    ((loc, scale) of shape (B, D) each): (K, B, D). Each draw first picks its expert (from
    `generator`, only when there are several), then every expert's noise is drawn in order and
    reparameterised; a draw keeps its expert's. With one expert only the noise is drawn, so the
    draws are those of that expert's posterior sample from the same generator (the evaluation's
    M = 2 conditional coherence equals its cross coherence draw for draw)."""
    loc0 = params[0][0]
    shape, device = (K, *loc0.shape), loc0.device
    pick = (torch.randint(len(params), shape[:-1], generator=generator, device=device)
            if len(params) > 1 else None)
    z = None
    for j, (family, (loc, scale)) in enumerate(zip(families, params)):
        draw = family.reparam(loc, scale, family.noise(shape, generator, device))
        z = draw if z is None else torch.where((pick == j)[..., None], draw, z)
    return z


class MMVAE(LatentModel):
    multimodal = True

    def __init__(self, vaes: list[VAE], *, latent_dim: int, prior: str = "laplace",
                 prior_scale: str = "softmax", prior_eta: float = 0.0, prior_init: float = 0.0,
                 learn_prior: bool = False, llik_scaling: list[float],
                 fusion: Fusion = FUSIONS["moe"]):
        super().__init__()
        self.vaes = nn.ModuleList(vaes)
        self.latent_dim = latent_dim
        self.fusion = fusion
        if fusion.product and not (prior == "normal" and all(
                v.posterior_family.name == "normal" for v in vaes)):
            raise ValueError(f"fusion {fusion.name} multiplies Gaussian experts: build the "
                             f"model with Normal posteriors and a Normal prior")
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

    # --- the joint posterior as a mixture of components (mmvae.models.fusions) ---------------
    def components(self, posts, subsets=None, present=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of each mixture component from the experts' posteriors `posts`
        (products over a sample's present experts only, given `present` (B, M) bool)."""
        return self.fusion.components(posts, self.prior_params(), subsets, present)

    def component_mask(self, present, subsets=None):
        """(S, B) bool: the components each sample's mixture keeps (None: no mask given)."""
        return None if present is None else self.fusion.component_mask(present, subsets)

    def component_families(self, subsets=None) -> list[Family]:
        return self.fusion.families([e.posterior_family for e in self.experts], subsets)

    @torch.no_grad()
    def latents_from_subset(self, xs: list[torch.Tensor], subset, K: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """K draws of z given only the modalities in `subset` (indices into `modalities`):
        (K, B, D). `xs` holds every modality (only the subset's are read) or just the subset's.

        A mixture fusion (moe) draws from the uniform mixture of the subset's experts; a product
        fusion (poe, mopoe) from the PoE of the prior and the subset's experts, which is what
        MVAE and MoPoE condition on."""
        subset = list(subset)
        given = xs if len(xs) == len(subset) else [xs[i] for i in subset]
        posts = {i: self.experts[i].posterior(x) for i, x in zip(subset, given)}
        B, device = given[0].shape[0], given[0].device
        if self.fusion.product:
            loc, scale = self.fusion.components([posts[i] for i in subset], self.prior_params(),
                                                [tuple(range(len(subset)))])[0]
            eps = get_family("normal").noise((K, B, self.latent_dim), generator, device)
            return loc + scale * eps
        return mixture_draws([self.experts[i].posterior_family for i in subset],
                             [posts[i] for i in subset], K, generator)
