"""CUB models (REFERENCE.md §2): images, ResNet features and captions, alone and paired.

| name         | paper   | prior                   | posterior                     | likelihood / lambda    |
|--------------|---------|-------------------------|-------------------------------|------------------------|
| cub_image    | cubI    | Laplace, softplus+eta   | Laplace, softplus+eta         | Laplace(loc, 0.01)     |
| cub_image_ft | cubIft  | Normal, softplus+eta    | Normal, softplus+eta          | Laplace(loc, 0.01)     |
| cub_sentence | cubS    | Normal, softplus+eta    | Normal, softplus+eta          | categorical (captions) |
| cubIS        | cubIS   | Laplace, D*softmax+eta  | image Laplace, caption Normal | lambda_img = 32/12288  |
| cubISft      | cubISft | Normal, softplus+eta    | both Normal                   | lambda_ft = 32/2048    |

cubISft's caption net is the wider cubSft (`cub_sentence_ft` width); there is no standalone
cubSft model, as in the paper. Modality names (the shard keys): image, feature, caption.
The vocabulary size is never hard-coded (the paper's 1590): `model.vocab_size`, which the
trainer reads from the shards' vocab.json.
"""
from __future__ import annotations

import torch

from mmvae.config import ConfigError
from mmvae.dists import ETA
from mmvae.models.captions import CaptionLikelihood
from mmvae.models.fusions import require_moe
from mmvae.models.mmvae import MMVAE
from mmvae.models.vae import VAE, LocScaleLikelihood, default_llik_scaling
from mmvae.nets import cub_feature, cub_image, cub_sentence

LIKELIHOOD_SCALE = 0.01
"""Fixed Laplace scale of the CUB image and ResNet-feature likelihoods."""


class CaptionVAE(VAE):
    """A VAE over captions. Its log-likelihood stops the decoder before the tied output layer
    and scores tokens with the fused categorical likelihood, so the estimators never hold the
    (M, K, B, 32, V) logits; `decode` (pictures, coherence) still returns logits."""

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z): x (B, 32) token ids, z (..., B, D) -> (..., B), fp64."""
        lead = z.shape[:-1]
        h = self.dec(z.reshape(-1, z.shape[-1]), logits=False)  # (N, 32, 128): one decoder call
        h = h.reshape(*lead, *h.shape[1:])
        return self.likelihood.log_prob_hidden(x, h, self.dec.out.weight, self.dec.out.bias)


def _vocab_size(cfg) -> int:
    if cfg.vocab_size <= 0:
        raise ConfigError(f"model {cfg.name!r} needs the caption vocabulary size: model.vocab_size "
                          f"is 0 and no vocab.json was found; point data.shards at CUB/shapes "
                          f"shards holding vocab.json (its 'itos' list) or set model.vocab_size")
    return cfg.vocab_size


def _softplus_vae(modality, net, cfg, family: str) -> VAE:
    """Image or feature VAE: softplus+eta scales, fixed Laplace(., 0.01) likelihood."""
    return VAE(modality=modality, encoder=net.Encoder(cfg.latent_dim),
               decoder=net.Decoder(cfg.latent_dim), data_shape=net.DATA_SHAPE,
               latent_dim=cfg.latent_dim, prior=family, posterior=family,
               posterior_scale="softplus", prior_scale="softplus", prior_eta=ETA,
               likelihood=LocScaleLikelihood("laplace", LIKELIHOOD_SCALE),
               learn_prior=cfg.learn_prior)


def _caption_vae(cfg, width: str) -> CaptionVAE:
    encoder = cub_sentence.Encoder(cfg.latent_dim, _vocab_size(cfg), width)
    decoder = cub_sentence.Decoder(cfg.latent_dim, encoder.embedding, width)
    return CaptionVAE(modality="caption", encoder=encoder, decoder=decoder,
                      data_shape=cub_sentence.DATA_SHAPE, latent_dim=cfg.latent_dim,
                      prior="normal", posterior="normal", posterior_scale="softplus",
                      prior_scale="softplus", prior_eta=ETA,
                      likelihood=CaptionLikelihood(cfg.paper_token_loss),
                      learn_prior=cfg.learn_prior)


def build_cub_image(cfg) -> VAE:
    require_moe(cfg)
    return _softplus_vae("image", cub_image, cfg, "laplace")


def build_cub_image_ft(cfg) -> VAE:
    require_moe(cfg)
    return _softplus_vae("feature", cub_feature, cfg, "normal")


def build_cub_sentence(cfg) -> CaptionVAE:
    require_moe(cfg)
    return _caption_vae(cfg, "cub_sentence")


def build_cubIS(cfg) -> MMVAE:
    """Images + captions; mixed posterior families under a Laplace D*softmax+eta prior."""
    require_moe(cfg)
    vaes = [build_cub_image(cfg), _caption_vae(cfg, "cub_sentence")]
    scaling = default_llik_scaling([v.data_shape for v in vaes], cfg.llik_scaling)
    return MMVAE(vaes, latent_dim=cfg.latent_dim, prior="laplace", prior_scale="softmax",
                 prior_eta=ETA, learn_prior=cfg.learn_prior, llik_scaling=scaling)


def build_cubISft(cfg) -> MMVAE:
    """ResNet features + captions (wider caption net); Normal softplus+eta prior."""
    require_moe(cfg)
    vaes = [build_cub_image_ft(cfg), _caption_vae(cfg, "cub_sentence_ft")]
    scaling = default_llik_scaling([v.data_shape for v in vaes], cfg.llik_scaling)
    return MMVAE(vaes, latent_dim=cfg.latent_dim, prior="normal", prior_scale="softplus",
                 prior_eta=ETA, learn_prior=cfg.learn_prior, llik_scaling=scaling)
