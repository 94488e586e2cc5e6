"""Linear-Gaussian reference models with an exact log-likelihood: the estimator test bed.

`gaussian`:      z ~ N(0, s^2 I_D), x = W z + b + N(0, sigma^2 I_n).
`gaussian_pair`: one z, two modalities x_m = W_m z + b_m + N(0, sigma^2 I_n), experts q_m(z|x_m).

Both train like any other model (Normal posteriors with softplus scales, a learnable prior
scale) and add `exact_log_likelihood(x) -> (B,)` (the marginal log p(x), or log p(x_1, x_2) for
the pair) and `sample_data(n)` (a tensor, or a list of two tensors, as the estimators take x).
`set_exact_posterior()` moves each encoder to the best mean-field fit of its exact posterior
p(z|x_m), which makes IWAE with large K converge to the exact value quickly.
"""
from __future__ import annotations

import math

import torch

from mmvae.models.mmvae import MMVAE
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
def _set_exact_posterior(vae: VAE, prior_scale: torch.Tensor) -> None:
    """Encoder <- mean-field fit of p(z|x): mean Sigma W^T (x - b) / sigma^2, var 1/diag(Lambda)."""
    W, b = vae.dec.linear.weight, vae.dec.linear.bias  # (n, D), (n,)
    precision = torch.diag(prior_scale.reshape(-1) ** -2) + W.T @ W / SIGMA_X**2
    cov = torch.linalg.inv(precision)
    A = cov @ W.T / SIGMA_X**2  # (D, n)
    vae.enc.loc.weight.copy_(A)
    vae.enc.loc.bias.copy_(-A @ b)
    std = precision.diagonal().rsqrt()
    vae.enc.raw_scale.copy_(torch.log(torch.expm1(std)))  # inverse softplus (eta negligible)


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
            _set_exact_posterior(vae, self.prior_params()[1])


def build_gaussian(cfg) -> GaussianVAE:
    vae = _linear_vae("x", cfg.data_dim, cfg.latent_dim, cfg.learn_prior)
    vae.__class__ = GaussianVAE
    return vae


def build_gaussian_pair(cfg) -> GaussianPair:
    vaes = [_linear_vae(m, cfg.data_dim, cfg.latent_dim, cfg.learn_prior) for m in ("x1", "x2")]
    return GaussianPair(vaes, latent_dim=cfg.latent_dim, prior="normal", prior_scale="softplus",
                        prior_init=PRIOR_INIT, learn_prior=cfg.learn_prior,
                        llik_scaling=[cfg.llik_scaling or 1.0, 1.0])
