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
    # M (M + 1) = 6 labelled rows of 8 images, each padded to 32x32 and drawn at 2x (64 px) in
    # a cell of 72 px, after a 150 px column of row labels
    assert image.shape == (6 * (72 + 8), 150 + 8 * 72, 3)
    labels = image[:, :150]  # the labels are drawn: dark pixels in every row's label cell
    assert all((labels[r * 80:(r + 1) * 80] < 128).any() for r in range(6))
    assert txt.read_text().splitlines() == [
        "rows, top to bottom:", "input mnist", "mnist reconstruction", "mnist -> svhn",
        "input svhn", "svhn -> mnist", "svhn reconstruction"]


def test_reconstruction_images_are_drawn_at_twice_their_size(tmp_path):
    model = mmvae.build_model("mnist", latent_dim=4)
    x = torch.zeros(1, 1, 28, 28)
    x[..., 10:12, 10:12] = 1.0  # a 2x2 white square
    png, _ = save_reconstructions(model, [x], tmp_path / "r.png", n=1)
    tile = np.asarray(Image.open(png))[4:4 + 56, 154:154 + 56].min(axis=-1)  # first input
    assert tile.shape == (56, 56) and (tile > 250).sum() == 4 * 4  # the square, 2x2 -> 4x4


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
    assert sizes == [(2 * (8 * 30 + 2),) * 2, (2 * (8 * 34 + 2),) * 2]  # drawn at 2x


def test_non_image_models_write_nothing(tmp_path, gaussian_pair):
    xs = gaussian_pair.sample_data(4)
    assert save_reconstructions(gaussian_pair, xs, tmp_path / "r.png") == []
    assert save_prior_samples(gaussian_pair, tmp_path / "p.png") == []
    assert not list(tmp_path.iterdir())
