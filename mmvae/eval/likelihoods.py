"""IWAE log-likelihood estimates of a trained model (REFERENCE.md §6, ``calculate_likelihoods``).

Every expert r contributes K particles z_rk ~ q_r(z | x_r) (the stratified draw of the mixture
q_mix(z) = (1/M) sum_m q_m(z | x_m)). With log p(z) the prior and log p_d(x_d | z) decoder d, the
per-datapoint estimates are

* ``joint_with_lambda`` (the paper's number: ``m_iwae`` with the likelihood scaling lambda_d,
  hence a bound on a *scaled* density, not on log p(x_1..x_M)):
      log (1/(MK)) sum_{r,k} exp[ log p(z_rk) + sum_d lambda_d log p_d(x_d | z_rk) - log q_mix(z_rk) ]
* ``joint_no_lambda``: the same with lambda_d = 1, a lower bound on log p(x_1, ..., x_M);
* ``x_{d}_from_mixture`` (marginal of modality d, mixture proposal, no lambda):
      log (1/(MK)) sum_{r,k} exp[ log p(z_rk) + log p_d(x_d | z_rk) - log q_mix(z_rk) ]
* ``x_{d}_from_{e}`` ("x_d from encoder e", unimodal proposal q_e, no lambda):
      log (1/K) sum_k exp[ log p(z_ek) + log p_d(x_d | z_ek) - log q_e(z_ek | x_e) ]
  Like the marginal, this is a lower bound on log p(x_d) (not a conditional likelihood); it only
  uses another proposal, so the gap to ``x_{d}_from_mixture`` shows how well q_e covers p(z|x_d).

Under a product fusion (``model.fusion`` poe / mopoe) the mixture proposal is the model's own
q(z | X): the uniform mixture of its S components (products of the prior and experts), K
particles each, so the "mixture" estimates average over S*K particles; and ``x_{d}_from_{e}``
uses the product of the prior and expert e, which is what such a model conditions on given x_e.

Unimodal models report ``iwae``: log (1/K) sum_k exp[log p(x, z_k) - log q(z_k | x)].

The K particles are processed ``k_chunk`` at a time: each chunk contributes its log-sum-exp, and
the chunks are combined with ``logaddexp``, so at most M * k_chunk * B decodes are alive at once
and the result equals the unchunked one for the same noise (up to float rounding).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from mmvae.eval import eval_mode
from mmvae.eval.distributed import batch_generator, capped_batches, sum_in_order
from mmvae.dists import log_sum
from mmvae.objectives import log_q_matrix
from mmvae.ranks import SINGLE, Ranks

DEFAULT_K = 1000


def _singletons(model) -> bool:
    """Whether the proposal of the joint estimates is a mixture of the single experts (moe and
    unimodal models); the product fusions' components are products of experts instead."""
    fusion = getattr(model, "fusion", None)
    return fusion is None or not fusion.product


def _particles(families, params, eps) -> torch.Tensor:
    return torch.stack([family.reparam(loc, scale, n)
                        for family, (loc, scale), n in zip(families, params, eps)])


def _chunk_log_sum_exps(model, xs, posts, eps, own_eps=None) -> dict[str, torch.Tensor]:
    """log sum_{particles of this chunk} exp(log-weight) for every estimate: each (B,).

    posts: the experts' (loc, scale); eps: per mixture component (k, B, D) standard noise (the
    experts, for moe). Mixture estimates sum over (r, k), the unimodal proposal ones over k only.
    own_eps (product fusions only): per expert e, the noise of the proposal q(z | x_e) = the
    product of the prior and expert e (what the model conditions on given x_e alone).
    """
    experts, names = model.experts, model.modalities
    M = len(experts)
    comps = model.components(posts)
    z = _particles(model.component_families(), comps, eps)  # (S, k, B, D)
    prior_loc, prior_scale = model.prior_params()
    log_prior = model.prior_family.log_prob(z, prior_loc, prior_scale).sum(-1)  # (S, k, B)
    llik = [e.log_likelihood(x, z) for e, x in zip(experts, xs)]  # per decoder d: (S, k, B)
    log_q = log_q_matrix(model, z, comps, detach_params=True)  # (S_m, S_r, k, B)
    if M == 1:
        return {"iwae": torch.logsumexp(log_prior + llik[0] - log_q[0], (0, 1))}  # (B,)
    log_q_mix = torch.logsumexp(log_q, 0) - math.log(log_q.shape[0])  # (S_r, k, B)
    scaled = sum(lam * lp for lam, lp in zip(model.llik_scaling, llik))
    out = {"joint_with_lambda": torch.logsumexp(log_prior + scaled - log_q_mix, (0, 1)),
           "joint_no_lambda": torch.logsumexp(log_prior + sum(llik) - log_q_mix, (0, 1))}
    if own_eps is None:  # the components are the experts: reuse their particles
        idx = torch.arange(M, device=z.device)
        own_prior, own_llik, log_q_own = log_prior, llik, log_q[idx, idx]
    else:
        singles = [(e,) for e in range(M)]
        families, params = model.component_families(singles), model.components(posts, singles)
        z_own = _particles(families, params, own_eps)  # (M_e, k, B, D)
        own_prior = model.prior_family.log_prob(z_own, prior_loc, prior_scale).sum(-1)
        own_llik = [e.log_likelihood(x, z_own) for e, x in zip(experts, xs)]
        log_q_own = torch.stack([log_sum(f.log_prob(z_own[e], loc.detach(), scale.detach()))
                                 for e, (f, (loc, scale)) in enumerate(zip(families, params))])
    for d, name_d in enumerate(names):
        out[f"x_{name_d}_from_mixture"] = torch.logsumexp(log_prior + llik[d] - log_q_mix, (0, 1))
        own = torch.logsumexp(own_prior + own_llik[d] - log_q_own, 1)  # (M_e, B)
        for e, name_e in enumerate(names):
            out[f"x_{name_d}_from_{name_e}"] = own[e]
    return out


def _num_particles(key: str, S: int, K: int) -> int:
    """Particles behind an estimate: S*K for the mixture proposal (S components), K for one."""
    mixture = key.startswith("joint") or key.endswith("_from_mixture")
    return S * K if mixture else K


def batch_log_likelihoods(model, xs: Sequence[torch.Tensor], K: int = DEFAULT_K, *,
                          k_chunk: int = 0, eps: list[torch.Tensor] | None = None,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Every estimate of the module docstring for one batch: name -> (B,) tensor.

    xs: one tensor per modality (model.modalities order), each (B, ...). eps: optional standard
    noise per mixture component (the experts, for moe), (K, B, D); drawn from `generator`
    otherwise (a product fusion then also draws the single-modality proposals' noise). k_chunk:
    particles per chunk (0 = all K at once).
    """
    xs = list(xs)
    B, M = xs[0].shape[0], len(model.experts)
    if eps is None:
        eps = model.sample_noise(K, B, generator, device=xs[0].device)
    K, S = eps[0].shape[0], len(eps)
    own_eps = None
    if not _singletons(model) and M > 1:
        own_eps = [f.noise((K, B, model.latent_dim), generator, xs[0].device)
                   for f in model.component_families([(e,) for e in range(M)])]
    step = k_chunk if 0 < k_chunk < K else K
    with eval_mode(model):
        posts = [e.posterior(x) for e, x in zip(model.experts, xs)]  # encoders run once
        total: dict[str, torch.Tensor] = {}
        for start in range(0, K, step):
            chunk = _chunk_log_sum_exps(model, xs, posts, [n[start:start + step] for n in eps],
                                        None if own_eps is None
                                        else [n[start:start + step] for n in own_eps])
            for key, lse in chunk.items():
                total[key] = lse if key not in total else torch.logaddexp(total[key], lse)
    return {key: lse - math.log(_num_particles(key, S, K)) for key, lse in total.items()}


def calculate_likelihoods(model, batches: Iterable[Sequence[torch.Tensor]], *,
                          K: int = DEFAULT_K, k_chunk: int = 100, seed: int = 0,
                          max_datapoints: int | None = None, ranks: Ranks = SINGLE) -> dict:
    """Average the per-datapoint estimates over `batches` (lists of modality tensors).

    Returns ``{"values": {name: mean nats per datapoint}, "K", "k_chunk", "seed",
    "num_datapoints", "llik_scaling"}``. Batch i draws its noise from a generator seeded with
    (seed, i), so a rerun with the same batches gives the same numbers, and so does any number
    of processes (`ranks`: each computes its share of the batches; see
    ``mmvae.eval.distributed``).
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    device = model.prior_params()[0].device
    rows: dict[int, dict[str, float]] = {}
    n = 0
    for index, xs in capped_batches(batches, max_datapoints):
        if ranks.owns(index):
            est = batch_log_likelihoods(model, [x.to(device) for x in xs], K, k_chunk=k_chunk,
                                        generator=batch_generator(seed, index, device))
            rows[index] = {key: value.double().sum().item() for key, value in est.items()}
        n += xs[0].shape[0]
    if n == 0:
        raise ValueError("calculate_likelihoods got no datapoints")
    sums = sum_in_order(ranks.gather_by_index(rows))
    return {"values": {key: s / n for key, s in sums.items()}, "K": K, "k_chunk": k_chunk,
            "seed": seed, "num_datapoints": n, "llik_scaling": list(model.llik_scaling)}
