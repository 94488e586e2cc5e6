"""Variational bounds and their gradient estimators, as pure functions.

Every estimator takes a model and data and returns a tensor of shape (B,) whose **value** is the
bound being estimated and whose **gradient** is the estimator's gradient; training minimises
``-objective(...).mean()``. Unimodal estimators take ``x`` (a tensor); multimodal ones take
``xs`` (one tensor per modality, in ``model.modalities`` order).

Notation (REFERENCE.md §3, DESIGN.md "Estimators"): M experts q_m(z|x_m), K particles per expert,
z_rk = loc_r + scale_r * eps_rk the k-th particle of expert r, lambda_d the likelihood scaling,
and the log-weight

    l(z) = log p(z) + sum_d lambda_d log p_d(x_d | z) - log (1/M) sum_m q_m(z | x_m).

With M = 1 this is the usual log p(x, z) - log q(z|x).

* ``iwae`` / ``m_iwae``: log (1/(MK)) sum_{r,k} exp l(z_rk) (the joint bound), or with
  ``looser=True`` the paper's stratified bound (1/M) sum_r log (1/K) sum_k exp l(z_rk).
* ``dreg`` / ``m_dreg``: the same values, with the doubly-reparameterised gradient (Tucker et al.
  2019). The paper code registers its DReG hook on a concatenated copy of z that is not on the
  loss path, so the hook never fires and it really trains with a "sticking the landing"-style
  estimator; here the reweighting is applied to the z that the log-weights are computed from, and
  it is tested against the IWAE gradient. For the mixture, ``variant="unbiased"`` (default) is
  the form derived in DESIGN.md; ``"paper"`` reweights the path by w^2 with the mixture density
  detached (the paper's intent, biased for M > 1); ``"stl"`` is what the paper code computed.
* ``elbo`` / ``m_elbo``: one particle, analytic KL (REFERENCE.md §3).
* ``m_dreg_score_part``: the other experts' score terms of the unbiased mixture DReG alone (value
  0), for the variance decomposition of ``launch/grad_snr.py`` (docs/estimators.md).

Particle sharding and K-chunking need the normaliser log sum_k exp l over *all* particles while a
call only sees some of them; they pass a ``reducer`` (see `LocalReducer`) that turns the local
log-sum-exp into the global one.

Precision: the networks may run in bf16/fp16 and the elementwise log-densities are fp32, but
their sums over data and latent dimensions are accumulated in fp64 (`mmvae.dists.log_sum`), and
the log-weights, normalisers, weights and returned bounds are fp64. A log-weight of ~ -5e3 nats
(MNIST-SVHN) has an fp32 ulp of ~5e-4, which would make the weights depend on the batch layout
(one process, P particle shards, K-chunks) at that level; in fp64 the layouts agree to ~1e-7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mmvae.dists import kl, log_sum

VARIANTS = ("unbiased", "paper", "stl")


# --- reducers: local vs. global normalisers ----------------------------------------------------

class LocalReducer:
    """All particles are here: the normaliser is the plain log-sum-exp."""

    def logsumexp(self, lw: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.logsumexp(lw, dim)

    def count(self, n_local: int) -> int:
        return n_local


@dataclass
class FixedReducer:
    """Normalisers computed beforehand (pass 1 of K-chunking): `lse` and the total count."""

    lse: torch.Tensor
    total: int

    def logsumexp(self, lw: torch.Tensor, dim: int) -> torch.Tensor:
        return self.lse

    def count(self, n_local: int) -> int:
        return self.total


# --- particles and log-weights -----------------------------------------------------------------

@dataclass
class Particles:
    """Everything an estimator needs about the M*K particles of a batch.

    z: (M, K, B, D) particles on the reparameterisation path (gradient reaches the encoders).
    posts: per posterior component (loc, scale), each (B, D) (the experts for moe).
    log_joint: (M, K, B) log p(z) + sum_d lambda_d log p_d(x_d|z), with z attached.
    """

    z: torch.Tensor
    posts: list[tuple[torch.Tensor, torch.Tensor]]
    log_joint: torch.Tensor
    eps: list[torch.Tensor]


def _as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def draw(model, xs: Sequence[torch.Tensor], K: int | None, eps=None) -> Particles:
    """Encode, reparameterise K particles per posterior component and score them under every
    decoder.

    The components are the experts for the mixture of experts, and in general whatever the
    model's fusion makes of the experts' posteriors (`mmvae.models.fusions`: subset products of
    experts for mopoe, the full product for poe); S of them. All S*K*B particles go through each
    decoder in one call. `eps` (a list of (K, B, D) standard noise tensors, one per component)
    fixes the noise; otherwise K particles are drawn.
    """
    experts = model.experts
    if eps is None:
        eps = model.sample_noise(K, xs[0].shape[0], device=xs[0].device)
    posts = model.components([e.posterior(x) for e, x in zip(experts, xs)])
    z = _reparam(model, posts, eps)  # (S, K, B, D)
    prior_loc, prior_scale = model.prior_params()
    log_joint = log_sum(model.prior_family.log_prob(z, prior_loc, prior_scale))  # (S, K, B)
    for lam, expert, x in zip(model.llik_scaling, experts, xs):
        log_joint = log_joint + lam * expert.log_likelihood(x, z)
    return Particles(z, posts, log_joint, eps)


def _reparam(model, posts, eps) -> torch.Tensor:
    return torch.stack([family.reparam(loc, scale, n)
                        for family, (loc, scale), n in zip(model.component_families(), posts, eps)])


def log_q_matrix(model, z: torch.Tensor, posts, detach_params: bool) -> torch.Tensor:
    """log q_m(z_rk) for every component m (of the S in `posts`) and particle: (S_m, S_r, K, B)."""
    rows = []
    for family, (loc, scale) in zip(model.component_families(), posts):
        if detach_params:
            loc, scale = loc.detach(), scale.detach()
        rows.append(log_sum(family.log_prob(z, loc, scale)))
    return torch.stack(rows)


def log_weights(model, xs, K: int | None = None, eps=None) -> torch.Tensor:
    """l(z_rk) for all particles, (M, K, B), fp64, with its full gradient graph."""
    p = draw(model, _as_list(xs), K, eps)
    log_q = log_q_matrix(model, p.z, p.posts, detach_params=False)
    return p.log_joint - (torch.logsumexp(log_q, 0) - math.log(log_q.shape[0]))


def _normalise(lw: torch.Tensor, looser: bool, reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound value (B,), normalised weights (M, K, B) detached, each stratum's scale).

    Joint: softmax over all M*K particles. Looser: softmax over K within each stratum, and the
    stratum bounds averaged with 1/M, which is folded into the returned weights.
    """
    M, K, B = lw.shape
    if looser:
        lse = reducer.logsumexp(lw, 1)  # (M, B)
        value = (lse - math.log(reducer.count(K))).mean(0)
        weights = torch.exp(lw - lse[:, None]) / M
    else:
        flat = lw.reshape(M * K, B)
        lse = reducer.logsumexp(flat, 0)  # (B,)
        value = lse - math.log(reducer.count(M * K))
        weights = torch.exp(lw - lse)
    return value.detach(), weights.detach()


def _with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is `value` and whose gradient is that of `surrogate`."""
    return value + (surrogate - surrogate.detach())


# --- importance-weighted bounds ----------------------------------------------------------------

def m_iwae(model, xs, K: int = 1, *, looser: bool = False, eps=None, reducer=None) -> torch.Tensor:
    """Multimodal IWAE bound (joint, or the stratified `looser` bound), shape (B,).

    Gradient: sum over particles of w * grad l, w the normalised weights (the exact gradient of
    the bound's estimate, all score terms included).
    """
    lw = log_weights(model, xs, K, eps)
    value, w = _normalise(lw, looser, reducer or LocalReducer())
    return _with_value(value, (w * lw).sum((0, 1)))


def iwae(model, x, K: int = 1, *, eps=None, reducer=None) -> torch.Tensor:
    """IWAE bound log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), shape (B,)."""
    return m_iwae(model, [x], K, eps=eps, reducer=reducer)


def m_dreg(model, xs, K: int = 1, *, looser: bool = False, variant: str = "unbiased", eps=None,
           reducer=None) -> torch.Tensor:
    """Multimodal IWAE bound with the doubly-reparameterised gradient, shape (B,).

    With w the normalised weights (times 1/M for `looser`), alpha_m(z) = q_m(z) / sum_j q_j(z)
    the responsibilities and every density in the path terms evaluated with its parameters held
    fixed (DESIGN.md "DReG for the mixture"):

    * decoders and prior:  sum w grad_theta l;
    * encoder r, through the path of its own particles:
      sum_k [w - w(1 - w~) alpha_r] dl/dz dz/dphi_r - sum_k w d(alpha_r)/dz dz/dphi_r,
      where w~ is the weight within its softmax (w = w~ / M for `looser`);
    * encoder m != r, from the particles of stratum r (a score term that stays):
      - sum_k w alpha_m(z_rk) grad_phi_m log q_m(z_rk), z held fixed.

    With M = 1, alpha = 1 and this is DReG: w~^2 on the path, nothing else for the encoder.
    The path reweighting is a gradient hook on the very z the log-weights are computed from (the
    paper code's hook sat on a copy that is not on the loss path, and never fired).

    **Any fusion** (`mmvae.models.fusions`): "expert r" above is mixture component r with
    parameters psi_r = (loc_r, scale_r), M the number S of components; for mopoe psi_s is the
    product of the prior and the experts of subset s, a function of several encoders (and of the
    prior's parameters). The derivation holds per component, so it holds there unchanged:
    the IWAE gradient is sum_{r,k} w dl(z_rk)/dphi, where l depends on phi along the path
    z_rk = loc_r + scale_r eps_rk and, with z fixed, through the mixture density, whose score
    is sum_m alpha_m(z) d log q_m(z)/dpsi_m dpsi_m/dphi. The reparameterisation identity
    E_{eps_r}[h(z_rk) d log q_r(z_rk)/dpsi_r] = E[dh/dz dz_rk/dpsi_r], with h = w~ alpha_r and
    the other particles fixed, needs only that z_rk is reparameterised by psi_r; it turns the
    m = r part of the score into the path terms above, and the chain rule through psi_r (linear
    in the per-component gradients) carries both to every encoder that component r depends on.
    The m != r parts stay score terms, now reaching the encoders of subset m. A parameter of
    both p(z) and the components (a learned prior under a product fusion) gets its p(z) part as
    theta (sum w grad log p, z fixed) and its component part as above. Checked like MoE: an
    fp64 formula test and z-tests against the IWAE gradient (tests/test_fusions.py). For
    moe_plus the components are densities over u = (z, w_1..w_M): the same formula, written out
    for (z, w) in `mmvae.models.mmvae_plus`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"dreg variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    xs = _as_list(xs)
    p = draw(model, xs, K, eps)
    M = p.z.shape[0]
    log_q_fixed = log_q_matrix(model, p.z, p.posts, detach_params=True)  # (M_m, M_r, K, B)
    lw = p.log_joint - (torch.logsumexp(log_q_fixed, 0) - math.log(M))  # (M, K, B)
    value, w = _normalise(lw, looser, reducer or LocalReducer())
    w_soft = w * M if looser else w  # the weight within its own softmax
    surrogate = (w * lw).sum((0, 1))
    if variant == "stl" or not p.z.requires_grad:
        return _with_value(value, surrogate)
    if variant == "paper" or M == 1:
        path_scale = w_soft
    else:
        idx = torch.arange(M, device=lw.device)
        log_alpha_all = log_q_fixed - torch.logsumexp(log_q_fixed, 0)  # (M_m, M_r, K, B)
        alpha_own = log_alpha_all[idx, idx].exp().detach()  # alpha_r(z_rk): (M, K, B)
        path_scale = 1 - (1 - w_soft) * alpha_own
        surrogate = surrogate + _mixture_terms(model, p, w, idx)
    p.z.register_hook(lambda grad: (grad * path_scale.unsqueeze(-1)).to(grad.dtype))
    return _with_value(value, surrogate)


def _mixture_terms(model, p: Particles, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The unbiased mixture DReG's extra terms (B,): -sum w alpha_r(z) through a fresh copy of z
    (not the hooked one), and the score terms of the other experts' densities at fixed z."""
    # alpha_r(z_rk) on the path: z rebuilt from the same noise, so its gradient bypasses the hook.
    z_again = _reparam(model, p.posts, p.eps)
    log_q_fixed = log_q_matrix(model, z_again, p.posts, detach_params=True)
    log_alpha = log_q_fixed - torch.logsumexp(log_q_fixed, 0)
    alpha_term = -(w * log_alpha[idx, idx].exp()).sum((0, 1))
    return alpha_term - _score_terms(model, p, w, log_alpha.detach())


def _score_terms(model, p: Particles, w: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """sum_{m != r} sum_k w alpha_m(z_rk) log q_m(z_rk) (B,): its gradient is grad_phi_m
    log q_m at z held fixed, weighted by w alpha_m (log_alpha: (M_m, M_r, K, B), detached)."""
    log_q_params = log_q_matrix(model, p.z.detach(), p.posts, detach_params=False)
    off_diag = ~torch.eye(log_alpha.shape[0], dtype=torch.bool, device=w.device)  # (M_m, M_r)
    return (w.unsqueeze(0) * log_alpha.exp() * log_q_params)[off_diag].sum((0, 1))


def m_dreg_score_part(model, xs, K: int = 1, *, looser: bool = False, eps=None,
                      reducer=None) -> torch.Tensor:
    """The other experts' score terms of the unbiased mixture DReG alone, as a (B,) surrogate
    of value 0: its gradient is - sum_{m != r} sum_k w alpha_m(z_rk) grad_phi_m log q_m(z_rk),
    exactly the part of `m_dreg(variant="unbiased")`'s gradient that `stl` and `paper` drop
    (same noise -> same particles and weights). It reaches the encoders only. For the variance
    decomposition of `mmvae.eval.gradsnr`; with M = 1 it is zero."""
    xs = _as_list(xs)
    p = draw(model, xs, K, eps)
    M = p.z.shape[0]
    log_q_fixed = log_q_matrix(model, p.z, p.posts, detach_params=True)
    lw = p.log_joint - (torch.logsumexp(log_q_fixed, 0) - math.log(M))
    _, w = _normalise(lw, looser, reducer or LocalReducer())
    log_alpha = (log_q_fixed - torch.logsumexp(log_q_fixed, 0)).detach()
    surrogate = -_score_terms(model, p, w, log_alpha)
    return surrogate - surrogate.detach()


def dreg(model, x, K: int = 1, *, eps=None, reducer=None) -> torch.Tensor:
    """IWAE bound with the doubly-reparameterised gradient (Tucker et al. 2019), shape (B,).

    Decoder gradient sum_k w_k grad l_k; encoder gradient sum_k w_k^2 dl/dz dz/dphi with l
    evaluated with q's parameters held fixed.
    """
    return m_dreg(model, [x], K, eps=eps, reducer=reducer)


# --- ELBOs (one particle) ----------------------------------------------------------------------

def elbo(model, x, K: int = 1, *, eps=None) -> torch.Tensor:
    """log p(x|z) - KL(q(z|x) || p(z)) with one particle and the analytic KL, shape (B,)."""
    loc, scale = model.posterior(x)
    noise = eps if eps is not None else model.sample_noise(1, x.shape[0], device=x.device)
    z = model.posterior_family.reparam(loc, scale, noise[0][0])  # (B, D)
    prior_loc, prior_scale = model.prior_params()
    kl_term = kl(model.posterior_family, loc, scale, model.prior_family, prior_loc, prior_scale)
    return model.log_likelihood(x, z) - log_sum(kl_term)


def m_elbo(model, xs, K: int = 1, *, eps=None) -> torch.Tensor:
    """The multimodal ELBO of the model's fusion (`ELBOS`), shape (B,)."""
    return ELBOS[model.fusion.name](model, xs, eps=eps)


def moe_elbo(model, xs, K: int = 1, *, eps=None) -> torch.Tensor:
    """The paper's multimodal ELBO with one particle per expert, z_d ~ q_d (REFERENCE.md §3):

    (1/M) [ sum_r sum_d W_rd lambda_d log p_d(x_d | z_d) - sum_r KL(q_r || p) ],

    W_dd = 1 and W_rd = q_r(sg z_d) / sg q_d(z_d) for r != d: the cross terms
    E_{q_r}[log p_d(x_d|z)] are importance-sampled from q_d, the weight passing gradient only to
    q_r's parameters. Only the diagonal decoders are used.
    """
    xs = _as_list(xs)
    experts, M = model.experts, len(xs)
    noise = eps if eps is not None else model.sample_noise(1, xs[0].shape[0], device=xs[0].device)
    posts = [e.posterior(x) for e, x in zip(experts, xs)]
    prior_loc, prior_scale = model.prior_params()
    total = 0.0
    for d, (expert_d, x_d) in enumerate(zip(experts, xs)):
        loc_d, scale_d = posts[d]
        z_d = expert_d.posterior_family.reparam(loc_d, scale_d, noise[d][0])  # (B, D)
        lpx = model.llik_scaling[d] * expert_d.log_likelihood(x_d, z_d)  # (B,)
        log_q_dd = log_sum(expert_d.posterior_family.log_prob(z_d.detach(), loc_d, scale_d))
        for r, expert_r in enumerate(experts):
            if r == d:
                total = total + lpx
                continue
            loc_r, scale_r = posts[r]
            log_q_rd = log_sum(expert_r.posterior_family.log_prob(z_d.detach(), loc_r,
                                                                   scale_r))
            total = total + torch.exp(log_q_rd - log_q_dd.detach()) * lpx
        total = total - log_sum(kl(expert_d.posterior_family, loc_d, scale_d,
                                   model.prior_family, prior_loc, prior_scale))
    return total / M


def _subset_elbos(model, xs, subsets, noise, own_only: bool) -> torch.Tensor:
    """Per subset s: sum_d lambda_d log p_d(x_d | z) - KL(q_s || p) with one particle
    z ~ q_s (the fusion's component for s) and the analytic KL: (S, B). `own_only` scores only
    the modalities of s (MVAE), otherwise all of them."""
    posts = [e.posterior(x) for e, x in zip(model.experts, xs)]
    comps = model.components(posts, subsets)
    families = model.component_families(subsets)
    z = torch.stack([f.reparam(loc, scale, n[0])
                     for f, (loc, scale), n in zip(families, comps, noise)])  # (S, B, D)
    prior_loc, prior_scale = model.prior_params()
    rows = [-log_sum(kl(f, loc, scale, model.prior_family, prior_loc, prior_scale))
            for f, (loc, scale) in zip(families, comps)]  # per subset (B,)
    for d, (lam, expert, x) in enumerate(zip(model.llik_scaling, model.experts, xs)):
        scored = [i for i, s in enumerate(subsets) if d in s or not own_only]
        llik = expert.log_likelihood(x, z[scored])  # one decoder call: (len(scored), B)
        for j, i in enumerate(scored):
            rows[i] = rows[i] + lam * llik[j]
    return torch.stack(rows)


def mixture_elbo(model, xs, K: int = 1, *, eps=None) -> torch.Tensor:
    """ELBO of a uniform mixture of S components (MoPoE's subset PoEs), stratified: one particle
    from each component, shape (B,):

        (1/S) sum_s [ sum_d lambda_d log p_d(x_d | z_s) - KL(q_s || p) ],   z_s ~ q_s.

    Its expectation is below the ELBO of the mixture itself, since the entropy of a mixture is
    at least the mean entropy of its components (MoPoE's objective, Sutter et al. 2021)."""
    xs = _as_list(xs)
    noise = eps if eps is not None else model.sample_noise(1, xs[0].shape[0],
                                                           device=xs[0].device)
    subsets = model.fusion.subsets(len(xs))
    return _subset_elbos(model, xs, subsets, noise, own_only=False).mean(0)


def subsets_elbo(model, xs, K: int = 1, *, eps=None) -> torch.Tensor:
    """MVAE's training objective (Wu & Goodman 2018): the sum of the ELBOs of the fusion's
    `elbo_subsets` (the joint PoE and every single modality), each scoring only the modalities
    it is given, shape (B,). The paper adds random subsets too; these fixed ones keep the
    objective deterministic given the noise. Every subset uses the same standard noise (one
    particle per datapoint): each term is still an unbiased estimate of its own ELBO."""
    xs = _as_list(xs)
    noise = eps if eps is not None else model.sample_noise(1, xs[0].shape[0],
                                                           device=xs[0].device)
    subsets = model.fusion.elbo_subsets(len(xs))
    return _subset_elbos(model, xs, subsets, [noise[0]] * len(subsets), own_only=True).sum(0)


ELBOS = {"moe": moe_elbo, "mopoe": mixture_elbo, "poe": subsets_elbo, "moe_plus": mixture_elbo}
"""The ELBO of each fusion (`mmvae.models.fusions.FUSIONS`), the `elbo` objective of a
multimodal model."""


# --- selection ---------------------------------------------------------------------------------

def select(name: str, multimodal: bool, *, looser: bool = False, variant: str = "unbiased"):
    """The estimator for `objective.name`, bound to its flags: f(model, xs, K, eps=, reducer=).

    Always takes `xs` as a list (unimodal models get a one-element list).
    """
    if name == "elbo":
        # One particle, no normaliser: `reducer` is accepted (the trainer always passes one)
        # and has nothing to do; config refuses particle shards and k_chunk with the ELBO.
        fn = m_elbo if multimodal else (lambda model, xs, K=1, eps=None: elbo(model, xs[0], K, eps=eps))
        return lambda model, xs, K=1, eps=None, reducer=None: fn(model, xs, K, eps=eps)
    if name == "iwae":
        return lambda model, xs, K, eps=None, reducer=None: m_iwae(
            model, xs, K, looser=looser and multimodal, eps=eps, reducer=reducer)
    if name == "dreg":
        return lambda model, xs, K, eps=None, reducer=None: m_dreg(
            model, xs, K, looser=looser and multimodal, variant=variant, eps=eps, reducer=reducer)
    raise ValueError(f"unknown objective {name!r}; choose one of elbo, iwae, dreg")
