"""Subsets of modalities and "z given a subset": the one route the M > 2 metrics draw latents by.

The conditional coherence and latent accuracy of the MoPoE (Sutter et al. 2021) and MMVAE+
(Palumbo et al. 2023) papers condition on every non-empty subset S of the M modalities. How
the posterior given S looks depends on the fusion, so the evaluation asks the model:

* ``model.latents_from_subset(xs, subset, K, generator=None) -> (K, B, D)``: K draws of z given
  the modalities in ``subset`` (a sorted tuple of indices into ``model.modalities``; ``xs`` holds
  every modality, those outside the subset unused), drawn from ``generator``;
* ``model.latent_mean_from_subset(xs, subset) -> (B, D)``: the mean of that posterior;
* ``model.decode_from_subset(z, target, generator=None) -> mean of modality target``: for
  models whose decoders take more than z (MMVAE+: z with a modality-specific w drawn from its
  prior).

A model that lacks them is a mixture of experts (MMVAE): q(z | x_S) = (1/|S|) sum_{m in S}
q_m(z | x_m). Each draw picks an expert of S uniformly (from the given generator, before the
noise), then reparameterises that expert's posterior; the mixture mean is the average of the
experts' means (loc: the families are symmetric). With |S| = 1 only the noise is drawn, exactly
as ``mmvae.eval.posterior_sample`` draws it, so for M = 2 the conditional coherence equals the
cross coherence draw for draw.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

import torch

from mmvae.eval import decode_mean
from mmvae.models.mmvae import mixture_draws

Subset = tuple[int, ...]


def nonempty_subsets(num_modalities: int, *, proper: bool = False) -> list[Subset]:
    """Every non-empty subset of range(M) (or every proper one), by size, then lexicographic:
    M = 3 -> (0,), (1,), (2,), (0, 1), (0, 2), (1, 2)[, (0, 1, 2)]."""
    top = num_modalities - 1 if proper else num_modalities
    return [s for k in range(1, top + 1) for s in combinations(range(num_modalities), k)]


def conditional_pairs(num_modalities: int) -> list[tuple[Subset, int]]:
    """(S, m) for every non-empty proper subset S and every modality m outside it, in
    `nonempty_subsets` order, then by m: the conditional-coherence directions."""
    return [(s, m) for s in nonempty_subsets(num_modalities, proper=True)
            for m in range(num_modalities) if m not in s]


def subset_name(names: Sequence[str], subset: Subset) -> str:
    """'m0+m2' for subset (0, 2) of modalities m0..m4 (a key part in eval.json and W&B)."""
    return "+".join(names[i] for i in subset)


def _expert_posteriors(model, xs, subset: Subset, cache: dict | None) -> list[tuple]:
    """(loc, scale) of each expert in `subset`, computed once per batch when `cache` is given
    (the metrics ask for dozens of subsets of the same batch)."""
    device = model.prior_params()[0].device
    out = []
    for i in subset:
        if cache is None or i not in cache:
            params = model.experts[i].posterior(xs[i].to(device))
            if cache is None:
                out.append(params)
                continue
            cache[i] = params
        out.append(cache[i])
    return out


def latents_from_subset(model, xs: Sequence[torch.Tensor], subset: Subset, K: int = 1,
                        generator: torch.Generator | None = None, *,
                        cache: dict | None = None) -> torch.Tensor:
    """K draws of z ~ q(z | x_S): (K, B, D). The model's own `latents_from_subset` when it has
    one, else the uniform mixture of the subset's experts (see the module docstring). `cache`:
    a dict shared across the calls of one batch (the experts' posteriors, MoE rule only)."""
    subset = tuple(sorted(subset))
    if not subset:
        raise ValueError("a subset of modalities must not be empty")
    own = getattr(model, "latents_from_subset", None)
    if own is not None:
        return own(xs, subset, K, generator=generator)
    params = _expert_posteriors(model, xs, subset, cache)
    return mixture_draws([model.experts[i].posterior_family for i in subset], params, K, generator)


MEAN_DRAWS = 256  # draws averaged for the mean of a model that can only sample q(z | x_S)


def latent_mean_from_subset(model, xs: Sequence[torch.Tensor], subset: Subset,
                            generator: torch.Generator | None = None, *,
                            cache: dict | None = None) -> torch.Tensor:
    """The mean of q(z | x_S): (B, D). The model's own `latent_mean_from_subset` when it has
    one; a model that only samples (`latents_from_subset`) gets the average of `MEAN_DRAWS`
    draws from `generator`; else the mixture mean (the average of the experts' locs)."""
    subset = tuple(sorted(subset))
    own = getattr(model, "latent_mean_from_subset", None)
    if own is not None:
        return own(xs, subset)
    if getattr(model, "latents_from_subset", None) is not None:
        return model.latents_from_subset(xs, subset, MEAN_DRAWS, generator=generator).mean(0)
    params = _expert_posteriors(model, xs, subset, cache)
    return torch.stack([loc for loc, _ in params]).mean(0)


def decode_target(model, z: torch.Tensor, target: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The decoded mean of modality `target` for latents z: the model's own
    `decode_from_subset` when it has one (decoders that take more than z), else the expert's."""
    own = getattr(model, "decode_from_subset", None)
    if own is not None:
        return own(z, target, generator=generator)
    return decode_mean(model.experts[target], z)
