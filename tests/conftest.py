"""Shared test setup: no network, no GPU, no W&B server; tiny models and data."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gaussian():
    torch.manual_seed(0)
    import mmvae

    model = mmvae.build_model("gaussian", latent_dim=2, data_dim=3)
    model.set_exact_posterior()
    return model


@pytest.fixture
def gaussian_pair():
    torch.manual_seed(0)
    import mmvae

    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3)
    model.set_exact_posterior()
    return model


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a SLURM cluster (tests/test_slurm.py brings "
                                       "one up on loopback with scripts/slurm_local.sh)")
