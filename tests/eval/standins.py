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
