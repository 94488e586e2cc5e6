"""MMVAE+ (Palumbo, Daunhawer & Vogt, ICLR 2023) as `model.fusion: moe_plus`: a shared latent z
whose posterior is a mixture of experts, plus a modality-specific latent w_m per modality with
an auxiliary prior r_m(w_m) for the modalities that are not given.

**Model.** The latent is u = (z, w_1, .., w_M) (sizes D_z = `model.latent_dim`, D_w =
`model.private_dim` each), p(u) = p(z) prod_n p(w_n), and decoder n reads (z, w_n):
p(X | u) = prod_n p_n(x_n | z, w_n). Encoder m outputs q_m(z | x_m) and q_m(w_m | x_m).

**Joint posterior.** The uniform mixture over the modalities of the *components*

    q_m(u) = q_m(z | x_m) q_m(w_m | x_m) prod_{n != m} r_n(w_n),

so a particle of stratum m has z and w_m from encoder m and every other w_n from the auxiliary
prior r_n = family(0, `model.aux_scale`): the paper's cross reconstruction. Each q_m is a
diagonal location-scale density over u whose (z, w_m) blocks are encoder m's outputs and whose
w_n blocks are r_n's constants (`PrivateExpert.posterior` returns it in u-space). To the
estimators this is a mixture of reparameterised components like moe's, so IWAE, DReG, looser,
particle shards, k_chunk, mixed precision and the checkpoints are `mmvae.objectives` and
`mmvae.parallel` unchanged, with the log-weight

    l(u) = log p(z) + sum_n [log p(w_n) + lambda_n log p_n(x_n | z, w_n)] - log (1/M) sum_j q_j(u),

and log (1/(MK)) sum exp l (joint) or (1/M) sum_m log (1/K) sum_k exp l (looser) is a lower
bound on log p(X) (every q_m has full support on u).

**The paper's weight.** The paper code (its looser IWAE/DReG) scores stratum r with
log p(z, w_r) + sum_d lambda_d log p_d(x_d | z, w_d) - log q(z | X) - log q_r(w_r | x_r), the
w_d (d != r) drawn from r_d but absent from the weight (and a beta on the KL-like terms). That
uses r_d as the prior of w_d in the cross terms and bounds a different quantity in every
stratum, not log p(X) of the model. Here the same particles (the same decoder calls) are
weighted as a proposal over all of u: the r_d-drawn w_d is scored under p(w_d) and r_d sits in
the proposal density, which makes the bound a bound on log p(X), checked against the exact
value of the linear-Gaussian reference (below).

**Unbiased mixture DReG for (z, w).** `mmvae.objectives.m_dreg` with the components above in
the place of the experts. Its derivation needs only that each component's particles are
reparameterised by that component's parameters psi_r, which holds: u_rk = loc_r + scale_r eps_rk.
Written out for (z, w), with

    rho_j(u) = q_j(z | x_j) q_j(w_j | x_j) / r_j(w_j),   alpha_j(u) = rho_j(u) / sum_i rho_i(u)

(q_j(u) = rho_j(u) prod_n r_n(w_n): the common factor cancels in the responsibilities), the IWAE
gradient of an encoder phi is sum_{r,k} w [dl/du du_rk/dphi - sum_j alpha_j(u_rk)
d log q_j(u_rk)/dpsi_j dpsi_j/dphi] (w the normalised weights, u held fixed in the second
part). For j = r the reparameterisation identity E_eps[h(u_rk) d log q_r(u_rk)/dpsi_r] =
E[dh/du du_rk/dpsi_r] (h = w~ alpha_r, the other particles fixed) turns the score into path
terms, giving m_dreg's formula:

* decoders and the priors p(z), p(w_n): sum w grad_theta l;
* encoder r, on the path of its own particles: sum_k [w - w(1 - w~) alpha_r] dl/du du/dphi_r
  - sum_k w d(alpha_r)/du du/dphi_r. du_rk/dphi_r is zero on the r_n-drawn blocks (n != r:
  r's parameters are constants), so this reaches encoder r through z and w_r only, while
  dl/du and d(alpha_r)/du are taken at the whole u (l reads the r-drawn w_n through decoder n);
* encoder j != r, from the particles of stratum r (score terms that stay):
  - sum_k w alpha_j(u_rk) grad_phi_j [log q_j(z_rk | x_j) + log q_j(w_j,rk | x_j)], u fixed;
  w_j,rk is the w_j that stratum r drew from r_j: encoder j's private head is scored at draws
  of the auxiliary prior, its shared head at the other experts' z.

With a learned auxiliary scale the r_n blocks would be parameters of every component but n and
the same formula would carry them; `aux_scale` is a constant here. The `paper` and `stl`
variants are m_dreg's (w~^2 on the path; no score terms). Checked like MoE in
tests/test_mmvae_plus.py: the formula by hand in fp64, z-tests against the IWAE gradient, the
encoder-gradient variance ratio.

**ELBO** (`objective.name: elbo`): the stratified mixture ELBO
(1/M) sum_m [E_{q_m(u)} sum_d lambda_d log p_d(x_d | z, w_d) - KL(q_m(u) || p(u))], one
particle per stratum, KL(q_m(u) || p(u)) = KL(q_m(z) || p(z)) + KL(q_m(w_m) || p(w_m)) +
sum_{n != m} KL(r_n || p(w_n)): stratum m reconstructs x_m from its own (z, w_m) and the
others from its z and r-drawn w_n, the paper's ELBO structure with per-component KLs (below the
ELBO of the mixture: no mixture-entropy term).

**Missing modalities** (a presence mask; `mmvae.objectives`). A sample with present set S has
p(X_S) = int p(z) prod_{n in S} [p(w_n) p_n(x_n | z, w_n)] du_S over u_S = (z, w_S): no
decoder of S reads an absent w_n, and int p(w_n) dw_n = 1. The estimators use MMVAE+ over S:
the uniform mixture of the components of S only, q_m(u_S) = q_m(z, w_m | x_m)
prod_{n in S, n != m} r_n(w_n) for m in S, with

    l_S(u_S) = log p(z) + sum_{n in S} [log p(w_n) + lambda_n log p_n(x_n | z, w_n)]
               - log (1/|S|) sum_{j in S} q_j(u_S).

The particles are still drawn over all of u, so an absent w_n is drawn from r_n in every
component of S (as any n != m is), but `MMVAEPlus.latent_mask` leaves its coordinates out of
log p(u) and of every log q_j(u). Scoring them instead (under p(w_n), with r_n in the proposal)
multiplies each weight by c_n = p(w_n) / r_n(w_n), the same factor in every component of S.
That is still a bound on log p(X_S): w_n is independent of u_S under every q_m, m in S, and
E_{r_n}[p(w_n) / r_n(w_n)] = 1, so each weight stays unbiased for p(X_S) and Jensen gives the
bound. Integrating w_n out replaces each weight by its conditional mean given u_S, exactly
(that expectation is 1), so it keeps the bound, is at least as tight (log of the K-average is
concave: E log mean_k a_k c_k <= log mean_k a_k given the a_k) and removes the factor's noise:
log c_n has variance D_w Var(|w| (1/b_p - 1/b_r)), 32 nats^2 per absent modality (sd 5.7) at
the start of configs/mmvae_plus_poly.yaml (D_w = 32, p Laplace(0, 1), r Laplace(0, 2)), noise
that would decide the importance weights rather than the data (measured on that model at
initialisation, one modality absent: sd 5.5 nats, mean -9.6 = the bound lost at K=1). Per
sample the value and gradient are then exactly those of the MMVAE+ built over the present
modalities alone (tests/test_missing.py, fp64).

The DReG formula above then runs over S: strata r in S only (an absent expert has none),
rho_j and alpha_j over j in S, the score terms of encoders j in S other than r at the w_j that
stratum r drew from r_j, weights normalised over the sample's |S| K particles (1/|S| for looser); the
derivation is unchanged because it is the restricted model's. An absent modality's encoder has
no stratum, no responsibility and no score term, and its decoder no likelihood term: it gets
no gradient, and its placeholder input only feeds terms that are selected away. The ELBO:
strata over S, each KL(q_m(u_S) || p(u_S)) = KL(q_m(z) || p(z)) + KL(q_m(w_m) || p(w_m)) +
sum_{n in S, n != m} KL(r_n || p(w_n)) (no KL for an absent w: it is integrated out too).

**Generation.** Unconditional: u ~ p(u). Given a subset S of modalities
(`MMVAE.latents_from_subset`): the uniform mixture of S's components, so z comes from one of
S's experts and a modality outside S gets its w from r (the paper's cross generation); cross
coherence e -> d decodes d at one draw of component e, whose w_d is from r_d.

**Exact reference** (`gaussian_pair`, `mmvae.models.toy.GaussianPairPlus`): x_n = A_n z + B_n w_n
+ b_n + sigma eps is x = W u + b + sigma eps with W block-sparse (the rows of modality n have A_n
in the z columns and B_n in the w_n columns), so x ~ N(b, W S^2 W^T + sigma^2 I), S the prior
scales of u: the IWAE bound above is checked against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmvae.dists import ETA, fp32
from mmvae.models.fusions import Fusion
from mmvae.models.mmvae import MMVAE
from mmvae.models.vae import VAE


def private_dim(cfg) -> int:
    """The size of each w_m from a model config: `model.private_dim`, 0 meaning latent_dim."""
    return cfg.private_dim or cfg.latent_dim


@dataclass(frozen=True)
class Layout:
    """Where the blocks of u = (z, w_1..w_M) lie: z in [0, shared), w_n after it."""

    shared: int
    private: int
    M: int

    @property
    def size(self) -> int:
        return self.shared + self.M * self.private

    def w(self, n: int) -> slice:
        start = self.shared + n * self.private
        return slice(start, start + self.private)

    def own(self, u: torch.Tensor, n: int) -> torch.Tensor:
        """(z, w_n) of u (..., size): what decoder n reads, (..., shared + private)."""
        return torch.cat([u[..., :self.shared], u[..., self.w(n)]], -1)

    def spread(self, own: torch.Tensor, n: int, fill: torch.Tensor) -> torch.Tensor:
        """u (..., size) with `own` = (z, w_n) in its blocks and `fill` (..., private) in the
        other w blocks."""
        z, w_n = own[..., :self.shared], own[..., self.shared:]
        return torch.cat([z] + [w_n if m == n else fill for m in range(self.M)], -1)

    def blocks(self) -> list[slice]:
        return [slice(0, self.shared)] + [self.w(n) for n in range(self.M)]


class PrivateExpert(VAE):
    """A VAE whose nets have latent size shared + private, presented to the estimators in
    u-space: `posterior` gives the component q_m(u) (encoder m's (z, w_m) and r_n's constants),
    `decode` reads (z, w_m) out of u. Made by `with_private_latents` from a built VAE."""

    layout: Layout
    index: int
    aux_scale: float

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q_m(u), each (B, layout.size), fp32. The z and w_m heads get their
        scales apart (a softmax scale spreads D over each block, as the paper's)."""
        loc, raw = self.enc(x)
        loc, cut = fp32(loc), self.layout.shared
        scale = torch.cat([self._posterior_scale(raw[..., :cut], ETA),
                           self._posterior_scale(raw[..., cut:], ETA)], -1)
        zeros = loc.new_zeros(*loc.shape[:-1], self.layout.private)
        return (self.layout.spread(loc, self.index, zeros),
                self.layout.spread(scale, self.index, zeros + self.aux_scale))

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        return super().decode(self.layout.own(u, self.index))


def with_private_latents(vaes: list[VAE], *, shared: int, private: int, aux_scale: float,
                         fusion: Fusion, cls=None, **mmvae_kwargs) -> "MMVAEPlus":
    """The MMVAE+ model over `vaes`, whose nets were built with latent size shared + private."""
    layout = Layout(shared, private, len(vaes))
    for n, vae in enumerate(vaes):
        if type(vae) is not VAE or vae.latent_dim != shared + private:
            raise ValueError(f"expert {vae.modality}: MMVAE+ takes plain VAEs whose nets have "
                             f"latent size shared + private = {shared + private}")
        vae.__class__ = PrivateExpert  # the same module, read in u-space
        vae.layout, vae.index, vae.aux_scale = layout, n, float(aux_scale)
        vae.latent_dim = layout.size
    return (cls or MMVAEPlus)(vaes, layout=layout, fusion=fusion, **mmvae_kwargs)


class MMVAEPlus(MMVAE):
    """MMVAE over u = (z, w_1..w_M) (module docstring): `latent_dim` is the size of u,
    `shared_dim` of z, `private_dim` of each w_m. The prior's scale parameterisation is applied
    to each block apart."""

    def __init__(self, vaes: list[PrivateExpert], *, layout: Layout, **kwargs):
        super().__init__(vaes, latent_dim=layout.size, **kwargs)
        self.layout = layout
        self.shared_dim, self.private_dim = layout.shared, layout.private

    def prior_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of p(u) = p(z) prod_n p(w_n), each (1, size)."""
        raw = self.prior_raw
        scale = torch.cat([self._prior_scale(raw[:, b], self._prior_eta)
                           for b in self.layout.blocks()], -1)
        return self.prior_loc, scale

    def latent_mask(self, present: torch.Tensor | None) -> torch.Tensor | None:
        """(B, size) bool: z and the w_n of the modalities `present` (B, M) bool; None without
        a mask. An absent modality's w_n is integrated out of the bound (module docstring,
        "Missing modalities"): its coordinates are left out of log p(u) and log q_m(u)."""
        if present is None:
            return None
        z = present.new_ones(present.shape[0], self.layout.shared)
        return torch.cat([z] + [present[:, n, None].expand(-1, self.layout.private)
                                for n in range(self.layout.M)], -1)

    def shared_latent(self, u: torch.Tensor) -> torch.Tensor:
        """z out of u (..., size)."""
        return u[..., :self.layout.shared]
