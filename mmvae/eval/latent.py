"""Latent classification accuracy (REFERENCE.md §6, ``analyse_ms``: latent accuracy).

For each encoder m: one reparameterised sample z ~ q_m(z | x_m) per train image (no gradient to
the encoder), a linear classifier p(y | z) = softmax(W z + b) fitted on (z, y), and its accuracy
on one sample per test image. The paper fits Linear(D, 10) with Adam for 30 epochs over the
duplicated pairs (a fresh sample each epoch); here it is scikit-learn's multinomial
LogisticRegression on standardised z of the unique images, which fits the same linear model to
convergence.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmvae.eval import eval_mode
from mmvae.eval.classifiers import as_float_images


@torch.no_grad()
def posterior_samples(expert, images, generator: torch.Generator | None = None, *,
                      device=None, batch_size: int = 512) -> np.ndarray:
    """One z ~ q(z | x) per image: (N, D) float64 array. images: (N, C, H, W) (uint8 or [0, 1])."""
    out = []
    with eval_mode(expert):
        for i in range(0, len(images), batch_size):
            x = as_float_images(images[i:i + batch_size]).to(device)
            loc, scale = expert.posterior(x)
            eps = expert.posterior_family.noise(loc.shape, generator, device)
            out.append(expert.posterior_family.reparam(loc, scale, eps).double().cpu())
    return torch.cat(out).numpy()


def linear_probe(z_train: np.ndarray, y_train, z_test: np.ndarray, y_test, *, seed: int = 0,
                 max_iter: int = 1000) -> float:
    """Test accuracy of a standardised multinomial logistic regression fitted on (z_train, y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(z_train, np.asarray(y_train))
    return float(clf.score(z_test, np.asarray(y_test)))


def latent_accuracy(model, train: dict[str, tuple], test: dict[str, tuple], *, seed: int = 0,
                    modalities: Sequence[str] | None = None) -> dict:
    """Linear-probe accuracy of each encoder's latent samples.

    train, test: modality -> (images (N, C, H, W), labels (N,)). Returns
    ``{"values": {"latent_{m}": test accuracy}, "num_train", "num_test", "seed"}``.
    """
    device = model.prior_params()[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    names = list(modalities or model.modalities)
    values, n_train, n_test = {}, {}, {}
    for m, expert in zip(model.modalities, model.experts):
        if m not in names:
            continue
        (x_tr, y_tr), (x_te, y_te) = train[m], test[m]
        z_tr = posterior_samples(expert, x_tr, generator, device=device)
        z_te = posterior_samples(expert, x_te, generator, device=device)
        values[f"latent_{m}"] = linear_probe(z_tr, y_tr, z_te, y_te, seed=seed)
        n_train[m], n_test[m] = len(y_tr), len(y_te)
    return {"values": values, "num_train": n_train, "num_test": n_test, "seed": seed}
