"""Linear-Gaussian reference models with an exact log-likelihood: the estimator test bed.

`gaussian`:      z ~ N(0, s^2 I_D), x = W z + b + N(0, sigma^2 I_n).
`gaussian_pair`: one z, M modalities x_m = W_m z + b_m + N(0, sigma^2 I_n), experts q_m(z|x_m)
                 (`model.num_modalities`, default 2: x1, x2), under any `model.fusion`.

Both train like any other model (Normal posteriors with softplus scales, a learnable prior
scale) and add `exact_log_likelihood(x) -> (B,)` (the marginal log p(x), or log p(x_1..x_M) for
the pair) and `sample_data(n)` (a tensor, or a list of M tensors, as the estimators take x).
`set_exact_posterior()` moves each encoder to the best mean-field fit of its exact posterior
p(z|x_m), which makes IWAE with large K converge to the exact value quickly. Under a product
fusion (poe, mopoe) an expert is a likelihood factor instead: its product with the prior expert
is that fit (same mean, same diagonal precision). Under moe_plus (MMVAE+, `GaussianPairPlus`)
decoder m reads (z, w_m): x_m = A_m z + B_m w_m + b_m + noise, still linear-Gaussian in
u = (z, w_1..w_M), so log p(x_1..x_M) stays exact.
"""
from __future__ import annotations

import math

import torch

from mmvae.config import ConfigError
from mmvae.models.fusions import fusion_for, require_moe
from mmvae.models.mmvae import MMVAE
from mmvae.models.mmvae_plus import MMVAEPlus, private_dim, with_private_latents
from mmvae.models.vae import VAE, LocScaleLikelihood
from mmvae.nets import linear

SIGMA_X = 0.5
PRIOR_INIT = math.log(math.e - 1)  # softplus(PRIOR_INIT) = 1: a standard-normal prior at init


def _linear_vae(modality: str, data_dim: int, latent_dim: int, learn_prior: bool) -> VAE:
    return VAE(modality=modality, encoder=linear.Encoder(data_dim, latent_dim),
               decoder=linear.Decoder(latent_dim, data_dim), data_shape=(data_dim,),
               latent_dim=latent_dim, prior="normal", posterior="normal",
               posterior_scale="softplus", prior_scale="softplus", prior_init=PRIOR_INIT,
               likelihood=LocScaleLikelihood("normal", SIGMA_X), learn_prior=learn_prior)


def _stacked_decoder(experts: list[VAE]) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.cat([e.dec.linear.weight for e in experts], 0)  # (sum n_m, D)
    b = torch.cat([e.dec.linear.bias for e in experts], 0)
    return W, b


def _exact_log_likelihood(model, x: torch.Tensor) -> torch.Tensor:
    """log N(x; b, W S^2 W^T + sigma^2 I) for the experts' stacked decoders."""
    W, b = _stacked_decoder(model.experts)
    s2 = model.prior_params()[1].reshape(-1) ** 2
    cov = W @ torch.diag(s2) @ W.T + SIGMA_X**2 * torch.eye(W.shape[0])
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def _sample(model, n: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    loc, scale = model.prior_params()
    z = loc + scale * torch.randn(n, model.latent_dim, generator=generator)
    return [e.decode(z) + SIGMA_X * torch.randn(n, e.data_shape[0], generator=generator)
            for e in model.experts]


@torch.no_grad()
def _set_exact_posterior(vae: VAE, prior_scale: torch.Tensor, factor: bool = False) -> None:
    """Encoder <- mean-field fit of p(z|x): mean Sigma W^T (x - b) / sigma^2, var 1/diag(Lambda).

    `factor`: the expert of a product of experts, whose product with the prior expert
    N(0, s^2) is that fit: precision diag(Lambda) - 1/s^2, mean scaled by diag(Lambda) / it."""
    W, b = vae.dec.linear.weight, vae.dec.linear.bias  # (n, D), (n,)
    prior_precision = prior_scale.reshape(-1) ** -2
    precision = torch.diag(prior_precision) + W.T @ W / SIGMA_X**2
    cov = torch.linalg.inv(precision)
    A = cov @ W.T / SIGMA_X**2  # (D, n)
    diag = precision.diagonal()
    if factor:
        A = (diag / (diag - prior_precision))[:, None] * A
        diag = diag - prior_precision
    vae.enc.loc.weight.copy_(A)
    vae.enc.loc.bias.copy_(-A @ b)
    vae.enc.raw_scale.copy_(torch.log(torch.expm1(diag.rsqrt())))  # inverse softplus


class GaussianVAE(VAE):
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        return _exact_log_likelihood(self, x)

    @torch.no_grad()
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return _sample(self, n, generator)[0]

    def set_exact_posterior(self) -> None:
        _set_exact_posterior(self, self.prior_params()[1])


class GaussianPair(MMVAE):
    def exact_log_likelihood(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return _exact_log_likelihood(self, torch.cat(list(xs), -1))

    @torch.no_grad()
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return _sample(self, n, generator)

    def set_exact_posterior(self) -> None:
        for vae in self.experts:
            _set_exact_posterior(vae, self.prior_params()[1], factor=self.fusion.product)


class GaussianPairPlus(MMVAEPlus):
    """gaussian_pair under moe_plus: the latent u = (z, w_1..w_M) (`mmvae.models.mmvae_plus`)."""

    def _decoder_in_u(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked decoders as one linear map of u: (sum n_m, size) and the bias."""
        rows = []
        for n, e in enumerate(self.experts):
            W = e.dec.linear.weight  # (n_m, shared + private): columns (z, w_n)
            full = W.new_zeros(W.shape[0], self.layout.size)
            full[:, :self.layout.shared] = W[:, :self.layout.shared]
            full[:, self.layout.w(n)] = W[:, self.layout.shared:]
            rows.append(full)
        return torch.cat(rows, 0), torch.cat([e.dec.linear.bias for e in self.experts], 0)

    def exact_log_likelihood(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """log N(x; b, W S^2 W^T + sigma^2 I), W the decoders as a map of u (block-sparse)."""
        W, b = self._decoder_in_u()
        s2 = self.prior_params()[1].reshape(-1) ** 2
        cov = W @ torch.diag(s2) @ W.T + SIGMA_X**2 * torch.eye(W.shape[0], dtype=W.dtype)
        return torch.distributions.MultivariateNormal(b, cov).log_prob(torch.cat(list(xs), -1))

    @torch.no_grad()
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return _sample(self, n, generator)

    def set_exact_posterior(self) -> None:
        """Component m's (z, w_m) <- the mean-field fit of p(z, w_m | x_m), the model of x_m
        alone (the other w_n are r_n's, fixed)."""
        scale = self.prior_params()[1]
        for n, vae in enumerate(self.experts):
            _set_exact_posterior(vae, self.layout.own(scale, n))


def build_gaussian(cfg) -> GaussianVAE:
    require_moe(cfg)
    vae = _linear_vae("x", cfg.data_dim, cfg.latent_dim, cfg.learn_prior)
    vae.__class__ = GaussianVAE
    return vae


def build_gaussian_pair(cfg) -> GaussianPair:
    if cfg.num_modalities < 2:
        raise ConfigError(f"model.num_modalities={cfg.num_modalities}: gaussian_pair needs at "
                          f"least 2 (use the gaussian model for one)")
    names = [f"x{m + 1}" for m in range(cfg.num_modalities)]
    fusion = fusion_for(cfg)
    if fusion.private:
        private = private_dim(cfg)
        vaes = [_linear_vae(m, cfg.data_dim, cfg.latent_dim + private, cfg.learn_prior)
                for m in names]
        return with_private_latents(
            vaes, shared=cfg.latent_dim, private=private, aux_scale=cfg.aux_scale,
            fusion=fusion, cls=GaussianPairPlus, prior="normal", prior_scale="softplus",
            prior_init=PRIOR_INIT, learn_prior=cfg.learn_prior,
            llik_scaling=[cfg.llik_scaling or 1.0] + [1.0] * (len(names) - 1))
    vaes = [_linear_vae(m, cfg.data_dim, cfg.latent_dim, cfg.learn_prior) for m in names]
    return GaussianPair(vaes, latent_dim=cfg.latent_dim, prior="normal", prior_scale="softplus",
                        prior_init=PRIOR_INIT, learn_prior=cfg.learn_prior,
                        llik_scaling=[cfg.llik_scaling or 1.0] + [1.0] * (len(names) - 1),
                        fusion=fusion_for(cfg))
