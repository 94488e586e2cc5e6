"""Latent embedding and KL plots: files written, UMAP fallback, KL identities."""
import sys

import numpy as np
import pytest
import torch

import mmvae
from mmvae.eval.plots import embed_2d, embedding_plot, kl_per_dimension, kl_plot


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=6)
    xs = [torch.rand(16, 1, 28, 28), torch.rand(16, 3, 32, 32)]
    return model, xs, torch.arange(16) % 10


def test_embedding_plot_written(tmp_path, model_and_batch):
    model, xs, labels = model_and_batch
    out = embedding_plot(model, xs, tmp_path / "emb.png", labels=labels, K=3, method="pca")
    assert out["path"].stat().st_size > 0 and out["method"] == "pca"
    assert out["points"] == 3 * 3 * 16  # prior + 2 posteriors, K * B each


def test_umap_failure_falls_back_to_tsne(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` raises ImportError
    points = np.random.default_rng(0).normal(size=(40, 5))
    emb, used = embed_2d(points, "umap")
    assert used == "tsne" and emb.shape == (40, 2)
    with pytest.raises(ValueError, match="umap, tsne, pca"):
        embed_2d(points, "mds")


def test_kl_plot_written_and_kl_identities(tmp_path, model_and_batch):
    model, xs, _ = model_and_batch
    out = kl_plot(model, xs, tmp_path / "kl.png")
    assert out["path"].stat().st_size > 0
    assert set(out["mean_kl"]) == {"KL(q_mnist||p)", "KL(q_svhn||p)", "J(q_mnist,q_svhn)"}
    values = kl_per_dimension(model, xs)
    assert all(v.shape == (16, 6) and (v >= -1e-6).all() for v in values.values())


def test_symmetric_kl_of_identical_experts_is_zero(gaussian_pair):
    """Both experts share weights and see the same x: J(q_1, q_2) = 0, KL(q||p) > 0."""
    e1, e2 = gaussian_pair.experts
    e2.load_state_dict(e1.state_dict())
    x = gaussian_pair.sample_data(8)[0]
    values = kl_per_dimension(gaussian_pair, [x, x])
    assert np.abs(values["J(q_x1,q_x2)"]).max() < 1e-6
    assert (values["KL(q_x1||p)"] > 0).all()
