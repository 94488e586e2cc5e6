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


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Tiny built-in digits shards (30 training pairs in 4 shards): 7 steps per epoch on one
    process at batch 4, 3 on two ranks. Used by the resume and SLURM tests."""
    from mmvae.data.recipes.digits import build_digits

    out = tmp_path_factory.mktemp("digits")
    build_digits(out, pairs_per_instance=1, sources_per_class=4, train_shards=4, test_shards=2,
                 progress=False)
    return out
