"""Reconstruction and prior-sample grids: files, layout, and no-ops for non-image models."""
import numpy as np
import torch
from PIL import Image

import mmvae
from mmvae.eval.pictures import save_prior_samples, save_reconstructions, to_rgb_canvas


def test_reconstruction_grid_layout(tmp_path):
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=4)
    model.train()
    xs = [torch.rand(10, 1, 28, 28), torch.rand(10, 3, 32, 32)]
    paths = save_reconstructions(model, xs, tmp_path / "recon_001.png", n=8)
    png, txt = paths
    assert png.stat().st_size > 0 and model.training  # mode restored
    image = np.asarray(Image.open(png))
    # M (M + 1) = 6 rows of 8 images, every image padded to 32x32 plus 2 px of grid padding
    assert image.shape == (6 * 34 + 2, 8 * 34 + 2, 3)
    assert len(txt.read_text().splitlines()) == 1 + 6


def test_mnist_is_centred_and_expanded_to_rgb():
    x = torch.ones(2, 1, 28, 28)
    out = to_rgb_canvas(x, (32, 32))
    assert out.shape == (2, 3, 32, 32)
    assert out[:, :, 2:30, 2:30].eq(1).all() and out.sum() == 2 * 3 * 28 * 28


def test_prior_samples_one_grid_per_modality(tmp_path):
    model = mmvae.build_model("mnist_svhn", latent_dim=4)
    gen = torch.Generator().manual_seed(0)
    paths = save_prior_samples(model, tmp_path / "prior_002.png", n=64, generator=gen)
    assert [p.name for p in paths] == ["prior_002_mnist.png", "prior_002_svhn.png"]
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(8 * 30 + 2, 8 * 30 + 2), (8 * 34 + 2, 8 * 34 + 2)]


def test_non_image_models_write_nothing(tmp_path, gaussian_pair):
    xs = gaussian_pair.sample_data(4)
    assert save_reconstructions(gaussian_pair, xs, tmp_path / "r.png") == []
    assert save_prior_samples(gaussian_pair, tmp_path / "p.png") == []
    assert not list(tmp_path.iterdir())
