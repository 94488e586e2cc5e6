"""The shared body of the evaluation tests' stand-in models (imported by test modules and
conftest.py: pytest puts this folder on sys.path)."""
import torch
from torch import nn

from mmvae.dists import SCALES, get_family
from mmvae.models.vae import LatentModel


class StandInModel(LatentModel):
    """A multimodal model over hand-written experts with a fixed N(0, I) prior (softplus of
    0.5413 is 1); subclasses pass their experts (each with a ``modality``)."""

    multimodal = True

    def __init__(self, experts, latent_dim: int):
        super().__init__()
        self.vaes = nn.ModuleList(experts)
        self.latent_dim = latent_dim
        self.prior_family = get_family("normal")
        self._prior_scale, self._prior_eta = SCALES["softplus"], 0.0
        self.register_buffer("prior_loc", torch.zeros(1, latent_dim))
        self.prior_raw = nn.Parameter(torch.full((1, latent_dim), 0.5413), requires_grad=False)

    @property
    def experts(self):
        return list(self.vaes)

    @property
    def modalities(self):
        return [v.modality for v in self.vaes]

    @property
    def llik_scaling(self):
        return [1.0] * len(self.vaes)


def digit_mmvae(num: int = 3, latent_dim: int = 4, seed: int = 0):
    """An untrained mixture-of-experts MMVAE over `num` small MNIST VAEs named m0..m{num-1}
    (1x28x28 images): the real model, estimator and noise, with M modalities."""
    from mmvae.config import ModelConfig
    from mmvae.models.digits import build_mnist
    from mmvae.models.mmvae import MMVAE

    torch.manual_seed(seed)
    vaes = [build_mnist(ModelConfig(name="mnist", latent_dim=latent_dim)) for _ in range(num)]
    for i, vae in enumerate(vaes):
        vae.modality = f"m{i}"
    return MMVAE(vaes, latent_dim=latent_dim, llik_scaling=[1.0] * num).eval()
