"""MNIST, SVHN and MNIST-SVHN models (REFERENCE.md §2), and the five-modality polydigits model."""
from __future__ import annotations

from mmvae.models.fusions import family_for, fusion_for, require_moe
from mmvae.models.mmvae import MMVAE
from mmvae.models.mmvae_plus import private_dim, with_private_latents
from mmvae.models.vae import VAE, LocScaleLikelihood, default_llik_scaling
from mmvae.nets import mnist, polydigits, svhn

LIKELIHOOD_SCALE = 0.75  # fixed Laplace scale after the paper code's issue #2 fix


def _image_vae(modality, net, cfg, family: str = "laplace", **nets_kwargs) -> VAE:
    """A Laplace image VAE (Normal under a product fusion: `family`); its nets' latent size is
    z's, plus w's under moe_plus (`expert_latent_dim`)."""
    latent = expert_latent_dim(cfg)
    return VAE(modality=modality, encoder=net.Encoder(latent, **nets_kwargs),
               decoder=net.Decoder(latent, **nets_kwargs), data_shape=net.DATA_SHAPE,
               latent_dim=latent, prior=family, posterior=family,
               posterior_scale="softmax", prior_scale="softmax", prior_eta=0.0,
               likelihood=LocScaleLikelihood("laplace", LIKELIHOOD_SCALE),
               learn_prior=cfg.learn_prior)


def expert_latent_dim(cfg) -> int:
    """The latent size an expert's nets see: z, or (z, w_m) under a fusion with private latents."""
    return cfg.latent_dim + (private_dim(cfg) if fusion_for(cfg).private else 0)


def multimodal(vaes, cfg, fusion, family, scaling) -> MMVAE:
    """The MMVAE over `vaes` under `fusion`: MMVAE+ (`mmvae.models.mmvae_plus`) for moe_plus."""
    common = dict(prior=family, prior_scale="softmax", prior_eta=0.0,
                  learn_prior=cfg.learn_prior, llik_scaling=scaling, fusion=fusion)
    if fusion.private:
        return with_private_latents(vaes, shared=cfg.latent_dim, private=private_dim(cfg),
                                    aux_scale=cfg.aux_scale, **common)
    return MMVAE(vaes, latent_dim=cfg.latent_dim, **common)


def build_mnist(cfg) -> VAE:
    require_moe(cfg)
    return _image_vae("mnist", mnist, cfg, num_hidden_layers=cfg.num_hidden_layers)


def build_svhn(cfg) -> VAE:
    require_moe(cfg)
    return _image_vae("svhn", svhn, cfg)


def build_mnist_svhn(cfg) -> MMVAE:
    fusion = fusion_for(cfg)
    family = family_for(fusion, "laplace")
    vaes = [_image_vae("mnist", mnist, cfg, family, num_hidden_layers=cfg.num_hidden_layers),
            _image_vae("svhn", svhn, cfg, family)]
    scaling = default_llik_scaling([mnist.DATA_SHAPE, svhn.DATA_SHAPE], cfg.llik_scaling)
    return multimodal(vaes, cfg, fusion, family, scaling)


def build_polydigits(cfg) -> MMVAE:
    """Five 3x28x28 image VAEs (m0..m4: polydigits or PolyMNIST) under `model.fusion`; Laplace
    posteriors and prior as the digit models (Normal for the product fusions), the fixed
    Laplace(., 0.75) likelihood, and no likelihood rescaling (the modalities have one size)."""
    fusion = fusion_for(cfg)
    family = family_for(fusion, "laplace")
    vaes = [_image_vae(f"m{i}", polydigits, cfg, family) for i in range(5)]
    scaling = default_llik_scaling([polydigits.DATA_SHAPE] * 5, cfg.llik_scaling)
    return multimodal(vaes, cfg, fusion, family, scaling)
