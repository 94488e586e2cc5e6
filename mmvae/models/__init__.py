"""Models: the unimodal VAE, the mixture-of-experts MMVAE and the linear-Gaussian references."""
from mmvae.models.mmvae import MMVAE
from mmvae.models.vae import VAE

__all__ = ["VAE", "MMVAE"]
