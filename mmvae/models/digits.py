"""MNIST, SVHN and MNIST-SVHN models (REFERENCE.md §2)."""
from __future__ import annotations

from mmvae.models.mmvae import MMVAE
from mmvae.models.vae import VAE, LocScaleLikelihood, default_llik_scaling
from mmvae.nets import mnist, svhn

LIKELIHOOD_SCALE = 0.75  # fixed Laplace scale after the paper code's issue #2 fix


def _image_vae(modality, net, cfg, **nets_kwargs) -> VAE:
    return VAE(modality=modality, encoder=net.Encoder(cfg.latent_dim, **nets_kwargs),
               decoder=net.Decoder(cfg.latent_dim, **nets_kwargs), data_shape=net.DATA_SHAPE,
               latent_dim=cfg.latent_dim, prior="laplace", posterior="laplace",
               posterior_scale="softmax", prior_scale="softmax", prior_eta=0.0,
               likelihood=LocScaleLikelihood("laplace", LIKELIHOOD_SCALE),
               learn_prior=cfg.learn_prior)


def build_mnist(cfg) -> VAE:
    return _image_vae("mnist", mnist, cfg, num_hidden_layers=cfg.num_hidden_layers)


def build_svhn(cfg) -> VAE:
    return _image_vae("svhn", svhn, cfg)


def build_mnist_svhn(cfg) -> MMVAE:
    vaes = [build_mnist(cfg), build_svhn(cfg)]
    scaling = default_llik_scaling([mnist.DATA_SHAPE, svhn.DATA_SHAPE], cfg.llik_scaling)
    return MMVAE(vaes, latent_dim=cfg.latent_dim, prior="laplace", prior_scale="softmax",
                 prior_eta=0.0, learn_prior=cfg.learn_prior, llik_scaling=scaling)
