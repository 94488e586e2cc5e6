"""Latent linear-probe accuracy: informative latents score high, shuffled labels near chance."""
import torch

from mmvae.eval.latent import latent_accuracy


def split(model, n, seed):
    xs, labels = model.pairs(n, seed)
    return {m: (x, labels) for m, x in zip(model.modalities, xs)}


def test_class_coding_latents_are_linearly_separable(template_model):
    out = latent_accuracy(template_model, split(template_model, 200, 0),
                          split(template_model, 100, 1), seed=0)
    assert out["values"] == {"latent_mnist": 1.0, "latent_svhn": 1.0}
    assert out["num_train"] == {"mnist": 200, "svhn": 200}


def test_labels_unrelated_to_images_give_chance(template_model):
    train, test = split(template_model, 300, 0), split(template_model, 300, 1)
    g = torch.Generator().manual_seed(0)
    test = {m: (x, y[torch.randperm(len(y), generator=g)]) for m, (x, y) in test.items()}
    out = latent_accuracy(template_model, train, test, seed=0)
    assert all(v < 0.3 for v in out["values"].values())
