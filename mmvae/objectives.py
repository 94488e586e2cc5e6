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
  detached (the paper's intent, biased for M > 1); ``"stl"`` is what the paper code computed;
  ``"cv"`` and ``"swap"`` are ``unbiased`` with less noise from the other experts' score terms.
* ``elbo`` / ``m_elbo``: one particle, analytic KL (REFERENCE.md §3).
* ``m_dreg_score_part``: the other experts' score terms of the unbiased mixture DReG alone (value
  0), for the variance decomposition of ``launch/grad_snr.py`` (docs/estimators.md).

Missing modalities: every multimodal estimator (every ``dreg`` variant) takes ``present``
((B, M) bool, None = all). Per sample it is then the estimator of the model restricted to the
present modalities: the mixture over the components that exist for the sample
(``model.component_mask``: the present experts for moe and moe_plus, the subsets of present
experts for mopoe, the product of the present experts for poe), the likelihood terms of present
modalities only, the latent coordinates the restricted model has (``model.latent_mask``: moe_plus
integrates an absent modality's w out, `mmvae.models.mmvae_plus`), and the normalisers, counts
and the M of every formula over the sample's own components and particles (the cross terms of
``cv`` / ``swap`` over pairs of present components: `_low_noise_terms`). Absent modalities'
tensors are placeholders that only have to be finite: what they contribute is selected away
(``torch.where``), never multiplied by zero, so no NaN or gradient leaks from them.
tests/test_missing.py checks value and gradient against the restricted model, sample by sample.

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

VARIANTS = ("unbiased", "paper", "stl", "cv", "swap")
"""`objective.dreg_variant` values of `m_dreg` (see its docstring; `cv` and `swap`: `_cv_terms`,
`_swap_terms`, docs/estimators.md)."""


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
    valid: torch.Tensor | None = None
    """(S, B) bool: the components each sample's mixture keeps; None = all (no mask)."""
    dims: torch.Tensor | None = None
    """(B, D) bool: the latent coordinates each sample's densities read (`model.latent_mask`:
    moe_plus leaves out the w of absent modalities); None = all."""


def _keep(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`values` where `mask` holds, else 0 (selected, not multiplied: no NaN from the rest)."""
    return values if mask is None else torch.where(mask, values, torch.zeros_like(values))


def _as_list(x) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def draw(model, xs: Sequence[torch.Tensor], K: int | None, eps=None, present=None) -> Particles:
    """Encode, reparameterise K particles per posterior component and score them under every
    decoder.

    The components are the experts for the mixture of experts, and in general whatever the
    model's fusion makes of the experts' posteriors (`mmvae.models.fusions`: subset products of
    experts for mopoe, the full product for poe); S of them. All S*K*B particles go through each
    decoder in one call. `eps` (a list of (K, B, D) standard noise tensors, one per component)
    fixes the noise; otherwise K particles are drawn. `present` ((B, M) bool) keeps each
    sample's likelihood terms to its present modalities and marks its components (`valid`).
    """
    experts = model.experts
    if eps is None:
        eps = model.sample_noise(K, xs[0].shape[0], device=xs[0].device)
    posts = model.components([e.posterior(x) for e, x in zip(experts, xs)], present=present)
    z = _reparam(model, posts, eps)  # (S, K, B, D)
    dims = model.latent_mask(present)
    prior_loc, prior_scale = model.prior_params()
    log_joint = log_sum(_keep(model.prior_family.log_prob(z, prior_loc, prior_scale), dims))
    for d, (lam, expert, x) in enumerate(zip(model.llik_scaling, experts, xs)):
        llik = expert.log_likelihood(x, z)
        if present is not None:
            llik = torch.where(present[:, d], llik, torch.zeros_like(llik))
        log_joint = log_joint + lam * llik
    return Particles(z, posts, log_joint, eps, model.component_mask(present), dims)


def _reparam(model, posts, eps) -> torch.Tensor:
    return torch.stack([family.reparam(loc, scale, n)
                        for family, (loc, scale), n in zip(model.component_families(), posts, eps)])


def log_q_matrix(model, z: torch.Tensor, posts, detach_params: bool,
                 dims: torch.Tensor | None = None) -> torch.Tensor:
    """log q_m(z_rk) for every component m (of the S in `posts`) and particle: (S_m, S_r, K, B),
    over the latent coordinates `dims` ((B, D) bool, `Particles.dims`) only."""
    rows = []
    for family, (loc, scale) in zip(model.component_families(), posts):
        if detach_params:
            loc, scale = loc.detach(), scale.detach()
        rows.append(log_sum(_keep(family.log_prob(z, loc, scale), dims)))
    return torch.stack(rows)


def log_mixture(log_q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """log q_mix(z_rk) = log (1/S_b) sum_{m valid for b} q_m(z_rk) from log_q (S_m, S_r, K, B):
    (S_r, K, B). Without a mask every component counts."""
    if valid is None:
        return torch.logsumexp(log_q, 0) - math.log(log_q.shape[0])
    masked = log_q.masked_fill(~valid[:, None, None, :], -math.inf)
    return torch.logsumexp(masked, 0) - valid.sum(0).to(log_q.dtype).log()


def log_responsibilities(log_q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """log alpha_m(z_rk) = log q_m / sum_{j valid} q_j (S_m, S_r, K, B); -inf for a component
    the sample does not have."""
    if valid is not None:
        log_q = log_q.masked_fill(~valid[:, None, None, :], -math.inf)
    return log_q - torch.logsumexp(log_q, 0)


def _log_weights(model, xs, K, eps, present) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(l(z_rk) (S, K, B) finite everywhere, the (S, B) component mask or None)."""
    p = draw(model, _as_list(xs), K, eps, present)
    log_q = log_q_matrix(model, p.z, p.posts, detach_params=False, dims=p.dims)
    return p.log_joint - log_mixture(log_q, p.valid), p.valid


def log_weights(model, xs, K: int | None = None, eps=None, present=None) -> torch.Tensor:
    """l(z_rk) for all particles, (M, K, B), fp64, with its full gradient graph; -inf for the
    particles of a component a sample does not have (`present`), so that a log-sum-exp over
    them is the sample's own normaliser."""
    lw, valid = _log_weights(model, xs, K, eps, present)
    return lw if valid is None else lw.masked_fill(~valid[:, None, :], -math.inf)


def _n_components(valid: torch.Tensor | None, S: int):
    """Components per sample: (B,) float64, or the int S without a mask."""
    return S if valid is None else valid.sum(0).to(torch.float64)


def _normalise(lw: torch.Tensor, looser: bool, reducer,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(bound value (B,), normalised weights (M, K, B) detached, each stratum's scale).

    Joint: softmax over all M*K particles. Looser: softmax over K within each stratum, and the
    stratum bounds averaged with 1/M, which is folded into the returned weights. With a
    component mask `valid` (S, B), M is each sample's own count and absent components'
    particles get weight 0 (their entries of `lw` may hold anything finite or -inf).
    """
    M, K, B = lw.shape
    if valid is not None:
        lw = lw.masked_fill(~valid[:, None, :], -math.inf)
    n = _n_components(valid, M)
    if looser:
        lse = reducer.logsumexp(lw, 1)  # (M, B); -inf for an absent stratum
        strata = lse - math.log(reducer.count(K))
        if valid is None:
            value, weights = strata.mean(0), torch.exp(lw - lse[:, None]) / M
        else:
            value = torch.where(valid, strata, torch.zeros_like(strata)).sum(0) / n
            weights = torch.where(valid[:, None, :], torch.exp(lw - lse[:, None]),
                                  torch.zeros_like(lw)) / n
    else:
        flat = lw.reshape(M * K, B)
        lse = reducer.logsumexp(flat, 0)  # (B,)
        value = lse - math.log(reducer.count(M * K))
        if valid is not None:  # the sample's own S_b * K particles, not M * K
            value = value - torch.log(n / M)
        weights = torch.exp(lw - lse)
    return value.detach(), weights.detach()


def _with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor whose value is `value` and whose gradient is that of `surrogate`."""
    return value + (surrogate - surrogate.detach())


# --- importance-weighted bounds ----------------------------------------------------------------

def m_iwae(model, xs, K: int = 1, *, looser: bool = False, eps=None, reducer=None,
           present=None) -> torch.Tensor:
    """Multimodal IWAE bound (joint, or the stratified `looser` bound), shape (B,).

    Gradient: sum over particles of w * grad l, w the normalised weights (the exact gradient of
    the bound's estimate, all score terms included).
    """
    lw, valid = _log_weights(model, xs, K, eps, present)
    value, w = _normalise(lw, looser, reducer or LocalReducer(), valid)
    return _with_value(value, (w * lw).sum((0, 1)))


def iwae(model, x, K: int = 1, *, eps=None, reducer=None) -> torch.Tensor:
    """IWAE bound log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x), shape (B,)."""
    return m_iwae(model, [x], K, eps=eps, reducer=reducer)


def m_dreg(model, xs, K: int = 1, *, looser: bool = False, variant: str = "unbiased", eps=None,
           reducer=None, present=None) -> torch.Tensor:
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

    ``variant="cv"`` and ``"swap"`` keep this mean and replace the last (score) terms:
    ``cv`` by the score terms with w - 1/(MK) in place of w plus a bounded control-variate path
    term through expert m's particles (any mixture, looser and joint); ``swap`` (looser only)
    by a path term through expert m's particle z_mk that carries the whole term, weights
    included (`_low_noise_terms` has the derivation; docs/estimators.md the measurements).
    Use ``swap`` with the looser bound where the experts overlap (early training, larger K):
    there it has the lowest encoder-gradient variance of the unbiased variants; ``cv`` for the
    joint bound. Where the experts have separated all variants give nearly the same gradient.

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
    p = draw(model, xs, K, eps, present)
    M = p.z.shape[0]
    log_q_fixed = log_q_matrix(model, p.z, p.posts, detach_params=True, dims=p.dims)
    lw = p.log_joint - log_mixture(log_q_fixed, p.valid)  # (M, K, B)
    value, w = _normalise(lw, looser, reducer or LocalReducer(), p.valid)
    w_soft = w * _n_components(p.valid, M) if looser else w  # the weight within its own softmax
    surrogate = (w * lw).sum((0, 1))
    if variant == "stl" or not p.z.requires_grad:
        return _with_value(value, surrogate)
    if variant == "paper" or M == 1:
        path_scale = w_soft
    else:
        idx = torch.arange(M, device=lw.device)
        log_alpha_all = log_responsibilities(log_q_fixed, p.valid)  # (M_m, M_r, K, B)
        alpha_own = log_alpha_all[idx, idx].exp().detach()  # alpha_r(z_rk): (M, K, B)
        path_scale = 1 - (1 - w_soft) * alpha_own
        if variant == "unbiased":
            surrogate = surrogate + _mixture_terms(model, p, w, idx)
        else:  # cv / swap: the other experts' score terms replaced (same mean, less noise)
            extra_scale, terms = _low_noise_terms(model, p, lw, w, looser, variant,
                                                  reducer or LocalReducer())
            path_scale, surrogate = path_scale + extra_scale, surrogate + terms
    p.z.register_hook(lambda grad: (grad * path_scale.unsqueeze(-1)).to(grad.dtype))
    return _with_value(value, surrogate)


def _mixture_terms(model, p: Particles, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The unbiased mixture DReG's extra terms (B,): -sum w alpha_r(z) through a fresh copy of z
    (not the hooked one), and the score terms of the other experts' densities at fixed z."""
    # alpha_r(z_rk) on the path: z rebuilt from the same noise, so its gradient bypasses the hook.
    z_again = _reparam(model, p.posts, p.eps)
    log_q_fixed = log_q_matrix(model, z_again, p.posts, detach_params=True, dims=p.dims)
    log_alpha = log_responsibilities(log_q_fixed, p.valid)
    alpha_term = -(w * log_alpha[idx, idx].exp()).sum((0, 1))
    return alpha_term - _score_terms(model, p, w, log_alpha.detach())


def _score_terms(model, p: Particles, w: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """sum_{m != r} sum_k w alpha_m(z_rk) log q_m(z_rk) (B,): its gradient is grad_phi_m
    log q_m at z held fixed, weighted by w alpha_m (log_alpha: (M_m, M_r, K, B), detached)."""
    log_q_params = log_q_matrix(model, p.z.detach(), p.posts, detach_params=False, dims=p.dims)
    pairs = _pairs(log_alpha.shape[0], p.valid, w.device)
    return _keep(w.unsqueeze(0) * log_alpha.exp() * log_q_params, pairs).sum((0, 1, 2))


def _pairs(M: int, valid: torch.Tensor | None, device) -> torch.Tensor:
    """[m, r, 1, b]: m != r and both components in sample b's mixture ((M, M, 1, B) bool, or
    (M, M, 1, 1) without a mask): the pairs whose cross terms a sample has."""
    off = ~torch.eye(M, dtype=torch.bool, device=device)[:, :, None, None]
    return off if valid is None else off & valid[:, None, None, :] & valid[None, :, None, :]


def _low_noise_terms(model, p: Particles, lw: torch.Tensor, w: torch.Tensor, looser: bool,
                     variant: str, reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """The `cv` and `swap` variants' stand-in for the other experts' score terms of the unbiased
    mixture DReG: (an extra per-particle scale for the path hook (M, K, B), surrogate (B,)).

    Notation as in `m_dreg`; s_m(z) = grad_psi_m log q_m(z) at z fixed, all of q's parameters
    held fixed inside alpha and l. The term to replace is, per stratum r, particle k and m != r,
        T_rkm = - w_rk alpha_m(z_rk) s_m(z_rk),   z_rk ~ q_r.
    Two facts give it another form with the same mean:
    (1) q_r alpha_m = q_r q_m / sum_j q_j = q_m alpha_r, so for any f fixed (not a function of
        psi), E_{z~q_r}[alpha_m(z) f(z) s_m(z)] = E_{u~q_m}[alpha_r(u) f(u) s_m(u)]: both
        coefficients lie in [0, 1] (the plain importance ratio q_m/q_r does not, and its
        variance can be infinite);
    (2) the reparameterisation identity E_{u~q_m}[F(u) s_m(u)] = E_eps[dF/du du/dpsi_m],
        u = loc_m + scale_m eps, for F fixed: a path term through expert m's particles.
    The noise eps_mk of z_mk (same k, stratum m) is independent of stratum r's particles, so
    z_mk may serve as u for T_rkm (it keeps its own roles too: unbiasedness is per term).

    * ``cv``: a control variate with a known mean. By (1)-(2) with f = 1,
      C_rkm = beta [alpha_m(z_rk) s_m(z_rk) - d alpha_r(z_mk)/dz dz_mk/dpsi_m] has mean zero for
      any beta that depends on no particle; beta = 1/(M K) (K all particles of a stratum,
      across shards and chunks), the mean of w_rk. T_rkm + C_rkm leaves the score term with
      w_rk - beta in place of w_rk (nothing when the weights are flat) and adds a bounded path
      term. Any mixture, looser and joint; no decoder work (alpha only).
    * ``swap`` (looser only): the whole term moves onto expert m's particle. Given stratum r's
      other particles, w~_rk = h_rk(z_rk) with h_rk(u) = e^l(u) / (A_rk + e^l(u)) and
      A_rk = sum_{j != k} e^l(z_rj) (a fixed function of u), so by (1)-(2) with f = h_rk,
      T_rkm has the mean of -(1/M) d[alpha_r h_rk](z_mk)/dz dz_mk/dpsi_m, i.e.
      -(1/M)[h_rk grad alpha_r + alpha_r h_rk (1 - h_rk) grad l] at u = z_mk: no score term is
      left. The joint bound's normaliser holds z_mk too, so h would not be fixed in u there.
      The grad-l part rides on the hook of z_mk (scale / w_mk, formed in log space); where
      w_mk underflows in the networks' gradient dtype (fp32/bf16: w < ~1e-38) that part is
      lost; under fp16 that is common, and config refuses swap with fp16.
    Both use only z_rk and z_mk with the same k and the global normalisers (`reducer`), so
    particle shards and K-chunks (which slice k alike in every stratum) give the one-process
    gradient.

    **Missing modalities** (`p.valid`): a sample's mixture is its own S_b components, so alpha is
    normalised over them, T_rkm exists only for r != m both in S_b (`_pairs`), and M in the
    formulas above is S_b: beta = 1/(S_b K), the mean of that sample's w_rk (w = w~/S_b for
    `looser`; S_b K particles share the joint softmax), and swap's 1/M is 1/S_b. Facts (1) and
    (2) are identities about q_r, q_m and alpha within the sample's mixture, so they hold there
    unchanged: per sample the terms are those of the model restricted to the present modalities
    (tests/test_missing.py, value and gradient) and keep the mean of the masked IWAE gradient
    (z-tests in tests/test_dreg_low_noise.py). An absent component's particles are still drawn
    (tensors stay rectangular), but every term that reads them is selected away.
    """
    M, K, _ = lw.shape
    n = _n_components(p.valid, M)  # each sample's own M
    idx = torch.arange(M, device=lw.device)
    pairs = _pairs(M, p.valid, lw.device)  # [row r or m, column: stratum]
    z_again = _reparam(model, p.posts, p.eps)  # a copy of z the hook does not scale
    log_q = log_q_matrix(model, z_again, p.posts, detach_params=True, dims=p.dims)
    log_alpha_path = log_responsibilities(log_q, p.valid)
    alpha_path = log_alpha_path.exp()  # [i, j]: alpha_i(z_jk), on the path
    log_alpha = log_alpha_path.detach()
    own = -(w * alpha_path[idx, idx]).sum((0, 1))  # as in `unbiased`
    if variant == "cv":
        # 1/(M K) per sample: the mean of its w_rk over its own n K particles
        beta = (1.0 / (M * reducer.count(K)) if looser else 1.0 / reducer.count(M * K)) * (M / n)
        moved = -(beta * _keep(alpha_path, pairs).sum((0, 1, 2)))  # [r, m]: alpha_r at z_mk
        return torch.zeros_like(w), own + moved - _score_terms(model, p, w - beta, log_alpha)
    if not looser:
        raise ValueError("dreg variant 'swap' needs the looser (stratified) bound; "
                         "use variant 'cv' for the joint bound")
    lw = lw.detach()
    lse = reducer.logsumexp(lw, 1)  # (M, B): log Z_r over all of stratum r's particles
    log_w_soft = (lw - lse[:, None]).clamp(max=0)
    log_a = lse[:, None] + torch.log(-torch.expm1(log_w_soft))  # log A_rk (-inf if w~_rk = 1)
    log_n = torch.logaddexp(log_a[:, None], lw[None])  # [r, m, k, b]: log(A_rk + e^l(z_mk))
    h = (lw[None] - log_n).exp()  # h_rk(z_mk)
    moved = -_keep(h * alpha_path, pairs).sum((0, 1, 2)) / n
    # alpha_r h (1 - h) / w~_mk at z_mk, summed over r != m: the grad-l coefficient over w_mk
    log_c = log_alpha + (log_a[:, None] - log_n) + (lse[None, :, None] - log_n)
    extra = -_keep(log_c.clamp(max=700).exp(), pairs).sum(0)
    return extra, own + moved


def m_dreg_score_part(model, xs, K: int = 1, *, looser: bool = False, eps=None,
                      reducer=None, present=None) -> torch.Tensor:
    """The other experts' score terms of the unbiased mixture DReG alone, as a (B,) surrogate
    of value 0: its gradient is - sum_{m != r} sum_k w alpha_m(z_rk) grad_phi_m log q_m(z_rk),
    exactly the part of `m_dreg(variant="unbiased")`'s gradient that `stl` and `paper` drop
    (same noise -> same particles and weights). It reaches the encoders only. For the variance
    decomposition of `mmvae.eval.gradsnr`; with M = 1 it is zero."""
    xs = _as_list(xs)
    p = draw(model, xs, K, eps, present)
    log_q_fixed = log_q_matrix(model, p.z, p.posts, detach_params=True, dims=p.dims)
    lw = p.log_joint - log_mixture(log_q_fixed, p.valid)
    _, w = _normalise(lw, looser, reducer or LocalReducer(), p.valid)
    log_alpha = log_responsibilities(log_q_fixed, p.valid).detach()
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


def m_elbo(model, xs, K: int = 1, *, eps=None, present=None) -> torch.Tensor:
    """The multimodal ELBO of the model's fusion (`ELBOS`), shape (B,)."""
    return ELBOS[model.fusion.name](model, xs, eps=eps, present=present)


def moe_elbo(model, xs, K: int = 1, *, eps=None, present=None) -> torch.Tensor:
    """The paper's multimodal ELBO with one particle per expert, z_d ~ q_d (REFERENCE.md §3):

    (1/M) [ sum_r sum_d W_rd lambda_d log p_d(x_d | z_d) - sum_r KL(q_r || p) ],

    W_dd = 1 and W_rd = q_r(sg z_d) / sg q_d(z_d) for r != d: the cross terms
    E_{q_r}[log p_d(x_d|z)] are importance-sampled from q_d, the weight passing gradient only to
    q_r's parameters. Only the diagonal decoders are used. With `present`, r and d run over a
    sample's present modalities and M is their number.
    """
    xs = _as_list(xs)
    experts, M = model.experts, len(xs)
    on = (lambda d: None) if present is None else (lambda d: present[:, d])
    both = (lambda r, d: None) if present is None else (lambda r, d: present[:, r] & present[:, d])
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
                total = total + _keep(lpx, on(d))
                continue
            loc_r, scale_r = posts[r]
            log_q_rd = log_sum(expert_r.posterior_family.log_prob(z_d.detach(), loc_r,
                                                                   scale_r))
            total = total + _keep(torch.exp(log_q_rd - log_q_dd.detach()) * lpx, both(r, d))
        total = total - _keep(log_sum(kl(expert_d.posterior_family, loc_d, scale_d,
                                         model.prior_family, prior_loc, prior_scale)), on(d))
    return total / (M if present is None else present.sum(1).to(total.dtype))


def _subset_elbos(model, xs, subsets, noise, own_only: bool, present=None) -> torch.Tensor:
    """Per subset s: sum_d lambda_d log p_d(x_d | z) - KL(q_s || p) with one particle
    z ~ q_s (the fusion's component for s) and the analytic KL: (S, B). `own_only` scores only
    the modalities of s (MVAE), otherwise all of them; with `present`, only present ones."""
    posts = [e.posterior(x) for e, x in zip(model.experts, xs)]
    comps = model.components(posts, subsets, present)
    families = model.component_families(subsets)
    z = torch.stack([f.reparam(loc, scale, n[0])
                     for f, (loc, scale), n in zip(families, comps, noise)])  # (S, B, D)
    prior_loc, prior_scale = model.prior_params()
    dims = model.latent_mask(present)  # moe_plus: no KL for an absent modality's w
    rows = [-log_sum(_keep(kl(f, loc, scale, model.prior_family, prior_loc, prior_scale), dims))
            for f, (loc, scale) in zip(families, comps)]  # per subset (B,)
    for d, (lam, expert, x) in enumerate(zip(model.llik_scaling, model.experts, xs)):
        scored = [i for i, s in enumerate(subsets) if d in s or not own_only]
        llik = expert.log_likelihood(x, z[scored])  # one decoder call: (len(scored), B)
        if present is not None:
            llik = _keep(llik, present[:, d])
        for j, i in enumerate(scored):
            rows[i] = rows[i] + lam * llik[j]
    return torch.stack(rows)


def mixture_elbo(model, xs, K: int = 1, *, eps=None, present=None) -> torch.Tensor:
    """ELBO of a uniform mixture of S components (MoPoE's subset PoEs), stratified: one particle
    from each component, shape (B,):

        (1/S) sum_s [ sum_d lambda_d log p_d(x_d | z_s) - KL(q_s || p) ],   z_s ~ q_s.

    Its expectation is below the ELBO of the mixture itself, since the entropy of a mixture is
    at least the mean entropy of its components (MoPoE's objective, Sutter et al. 2021).
    With `present`, the mean runs over the subsets of a sample's present modalities."""
    xs = _as_list(xs)
    noise = eps if eps is not None else model.sample_noise(1, xs[0].shape[0],
                                                           device=xs[0].device)
    subsets = model.fusion.subsets(len(xs))
    rows = _subset_elbos(model, xs, subsets, noise, own_only=False, present=present)
    valid = model.component_mask(present, subsets)
    return rows.mean(0) if valid is None else _keep(rows, valid).sum(0) / valid.sum(0)


def subsets_elbo(model, xs, K: int = 1, *, eps=None, present=None) -> torch.Tensor:
    """MVAE's training objective (Wu & Goodman 2018): the sum of the ELBOs of the fusion's
    `elbo_subsets` (the joint PoE and every single modality), each scoring only the modalities
    it is given, shape (B,). The paper adds random subsets too; these fixed ones keep the
    objective deterministic given the noise. Every subset uses the same standard noise (one
    particle per datapoint): each term is still an unbiased estimate of its own ELBO. With
    `present`, the joint PoE is that of the present modalities and only their own terms count
    (the objective of the model restricted to them)."""
    xs = _as_list(xs)
    noise = eps if eps is not None else model.sample_noise(1, xs[0].shape[0],
                                                           device=xs[0].device)
    subsets = model.fusion.elbo_subsets(len(xs))
    rows = _subset_elbos(model, xs, subsets, [noise[0]] * len(subsets), own_only=True,
                         present=present)
    return _keep(rows, model.component_mask(present, subsets)).sum(0)


ELBOS = {"moe": moe_elbo, "mopoe": mixture_elbo, "poe": subsets_elbo, "moe_plus": mixture_elbo}
"""The ELBO of each fusion (`mmvae.models.fusions.FUSIONS`), the `elbo` objective of a
multimodal model."""


# --- selection ---------------------------------------------------------------------------------

def select(name: str, multimodal: bool, *, looser: bool = False, variant: str = "unbiased"):
    """The estimator for `objective.name`, bound to its flags: f(model, xs, K, eps=, reducer=).

    Always takes `xs` as a list (unimodal models get a one-element list), and `present=`
    ((B, M) bool or None; a unimodal model has nothing to leave out and ignores it).
    """
    if name == "elbo":
        # One particle, no normaliser: `reducer` is accepted (the trainer always passes one)
        # and has nothing to do; config refuses particle shards and k_chunk with the ELBO.
        if multimodal:
            return lambda model, xs, K=1, eps=None, reducer=None, present=None: m_elbo(
                model, xs, K, eps=eps, present=present)
        return lambda model, xs, K=1, eps=None, reducer=None, present=None: elbo(
            model, xs[0], K, eps=eps)
    if name == "iwae":
        return lambda model, xs, K, eps=None, reducer=None, present=None: m_iwae(
            model, xs, K, looser=looser and multimodal, eps=eps, reducer=reducer,
            present=present if multimodal else None)
    if name == "dreg":
        return lambda model, xs, K, eps=None, reducer=None, present=None: m_dreg(
            model, xs, K, looser=looser and multimodal, variant=variant, eps=eps, reducer=reducer,
            present=present if multimodal else None)
    raise ValueError(f"unknown objective {name!r}; choose one of elbo, iwae, dreg")
