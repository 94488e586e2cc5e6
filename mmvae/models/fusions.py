"""Fusions: how the experts' posteriors q_m(z|x_m) make up the joint posterior q(z|x_1..M).

Every fusion here writes q(z|X) as a uniform mixture of S *components*, each a location-scale
density over z whose parameters are functions of some experts' outputs:

| fusion  | paper                         | components (subsets of the M experts)  | S       |
|---------|-------------------------------|----------------------------------------|---------|
| moe     | MMVAE (Shi et al. 2019)       | each expert alone: q_m                 | M       |
| mopoe   | MoPoE (Sutter et al. 2021)    | every non-empty subset s: PoE(p, q_s)  | 2^M - 1 |
| poe     | MVAE (Wu & Goodman 2018)      | all experts: PoE(p, q_1..q_M)          | 1       |
| moe_plus| MMVAE+ (Palumbo et al. 2023)  | each expert over (z, w_1..w_M)         | M       |

PoE(p, q_s) is the product of the prior expert p(z) and the experts of s, renormalised. It is
closed form only for Gaussians: precision P = 1/sigma_p^2 + sum_{m in s} 1/sigma_m^2, mean
(mu_p/sigma_p^2 + sum_m mu_m/sigma_m^2) / P; the product fusions therefore use Normal
posteriors and a Normal prior (`product=True`; the model builders switch the families).

moe_plus adds modality-specific latents w_m: the latent is u = (z, w_1..w_M) and component m is
q_m(z, w_m | x_m) times the auxiliary priors r_n(w_n) of the other modalities, built by
`mmvae.models.mmvae_plus` (`private=True`); to the estimators it is a mixture like moe's.

Because the estimators only see components (their (loc, scale), family and standard noise), one
set of estimators serves every fusion: K particles per component (stratified sampling), the
mixture density (1/S) sum_s q_s(z) at every particle, and the mixture DReG of
`mmvae.objectives.m_dreg` with the components in the place of the experts (its derivation holds
for any mixture whose components are reparameterised: see that docstring).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Callable

import torch

from mmvae.config import ConfigError
from mmvae.dists import Family, get_family

Subsets = list[tuple[int, ...]]


def singletons(M: int) -> Subsets:
    return [(m,) for m in range(M)]


def all_subsets(M: int) -> Subsets:
    """Every non-empty subset of range(M), by size then lexicographically."""
    return [s for n in range(1, M + 1) for s in combinations(range(M), n)]


def everything(M: int) -> Subsets:
    return [tuple(range(M))]


def product_of_experts(posts: list[tuple[torch.Tensor, torch.Tensor]],
                       prior: tuple[torch.Tensor, torch.Tensor],
                       present: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of the Gaussian PoE of the prior expert and `posts` (each (B, D); prior (1, D)).
    `present` (one (B,) bool per post) leaves a sample's absent experts out of its product
    (their precision counts as 0), so every row stays finite."""
    locs = [prior[0]] + [loc for loc, _ in posts]
    precisions = [prior[1] ** -2] + [scale ** -2 for _, scale in posts]
    if present is not None:
        precisions = precisions[:1] + [p * keep[:, None].to(p.dtype)
                                       for p, keep in zip(precisions[1:], present)]
    total = sum(precisions)
    loc = sum(p * m for p, m in zip(precisions, locs)) / total
    return loc, total.rsqrt()


@dataclass(frozen=True)
class Fusion:
    """One fusion: which subsets of experts are the mixture's components, and whether a
    component is the product of its experts (with the prior expert) or the single expert."""

    name: str
    subsets: Callable[[int], Subsets]
    product: bool
    elbo_subsets: Callable[[int], Subsets] | None = None
    """Subsets whose ELBOs are summed in training (MVAE's sub-sampled paths); None = the
    fusion's own ELBO over its mixture (`mmvae.objectives.m_elbo`)."""
    partial: bool = False
    """Missing modalities: a component whose subset holds absent experts is the product of its
    present ones (poe: the joint posterior of whatever is there) instead of being left out of
    the sample's mixture (moe, mopoe: the experts / subsets of the present modalities)."""
    private: bool = False
    """Modality-specific latents w_m next to the shared z (MMVAE+): the model builders make an
    `mmvae.models.mmvae_plus.MMVAEPlus`, whose experts' posteriors are its components."""

    def components(self, posts, prior, subsets: Subsets | None = None,
                   present: torch.Tensor | None = None):
        """Per component (loc, scale), each (B, D): the experts of `subsets` (default: the
        fusion's own) alone, or their PoE with the prior expert (over a sample's present
        experts only, given `present` (B, M) bool)."""
        subsets = self.subsets(len(posts)) if subsets is None else subsets
        if not self.product:
            if any(len(s) != 1 for s in subsets):
                raise ValueError(f"fusion {self.name} has one expert per component")
            return [posts[s[0]] for s in subsets]
        keep = (lambda s: None) if present is None else (lambda s: [present[:, m] for m in s])
        return [product_of_experts([posts[m] for m in s], prior, keep(s)) for s in subsets]

    def component_mask(self, present: torch.Tensor, subsets: Subsets | None = None) -> torch.Tensor:
        """Which components exist for each sample, (S, B) bool, from the modalities present
        (B, M) bool: a subset all of whose experts are present or, for a `partial` fusion, any
        of whose experts is. Per sample the mixture is then exactly the fusion of the model
        restricted to its present modalities (tests/test_missing.py)."""
        subsets = self.subsets(present.shape[1]) if subsets is None else subsets
        rows = [present[:, list(s)].any(1) if self.partial else present[:, list(s)].all(1)
                for s in subsets]
        return torch.stack(rows)

    def families(self, expert_families: list[Family], subsets: Subsets | None = None) -> list[Family]:
        subsets = self.subsets(len(expert_families)) if subsets is None else subsets
        if self.product:
            return [get_family("normal")] * len(subsets)
        return [expert_families[s[0]] for s in subsets]


FUSIONS: dict[str, Fusion] = {
    "moe": Fusion("moe", singletons, product=False),
    "mopoe": Fusion("mopoe", all_subsets, product=True),
    "poe": Fusion("poe", everything, product=True,
                  elbo_subsets=lambda M: everything(M) + singletons(M), partial=True),
    "moe_plus": Fusion("moe_plus", singletons, product=False, private=True),
}


def get_fusion(name: str) -> Fusion:
    if name not in FUSIONS:
        raise ConfigError(f"model.fusion={name!r} is not a fusion; valid: {', '.join(FUSIONS)}")
    return FUSIONS[name]


def fusion_for(cfg) -> Fusion:
    """The fusion of a multimodal model's config section (`model.fusion`)."""
    return get_fusion(cfg.fusion)


def family_for(fusion: Fusion, default: str) -> str:
    """The posterior / prior family a model uses under `fusion`: its own, or Normal for the
    product fusions (a product of experts is closed form only for Gaussians)."""
    return "normal" if fusion.product else default


def require_moe(cfg) -> None:
    """Models without a fusion choice (one modality; CUB's mixed families) accept only moe."""
    if cfg.fusion != "moe":
        raise ConfigError(f"model.fusion={cfg.fusion!r} does not apply to model {cfg.name!r}; "
                          f"fusions are for mnist_svhn, polydigits and gaussian_pair: set "
                          f"model.fusion=moe")
