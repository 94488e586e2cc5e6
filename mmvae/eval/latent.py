"""Latent classification accuracy (REFERENCE.md §6, ``analyse_ms``: latent accuracy).

For each encoder m: one reparameterised sample z ~ q_m(z | x_m) per train image (no gradient to
the encoder), a linear classifier p(y | z) = softmax(W z + b) fitted on (z, y), and its accuracy
on one sample per test image. The paper fits Linear(D, 10) with Adam for 30 epochs over the
duplicated pairs (a fresh sample each epoch); here it is scikit-learn's multinomial
LogisticRegression on standardised z of the unique images, which fits the same linear model to
convergence.

`subset_latent_accuracy` does the same for the latent *mean* given every non-empty subset of
modalities (the MoPoE paper's latent representation per subset), sharded over processes.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from mmvae.eval import eval_mode
from mmvae.eval.classifiers import as_float_images
from mmvae.eval.distributed import batch_generator, capped_batches
from mmvae.eval.subsets import latent_mean_from_subset, nonempty_subsets, subset_name
from mmvae.ranks import SINGLE, Ranks


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


def subset_latent_accuracy(model, train_batches: Iterable, test_batches: Iterable, *,
                           seed: int = 0, max_datapoints: int | None = None,
                           ranks: Ranks = SINGLE) -> dict:
    """Linear-probe accuracy of the latent mean given each non-empty subset S of modalities
    (``mmvae.eval.subsets.latent_mean_from_subset``; for a mixture of experts the average of
    the subset's expert means), fitted on the train batches and scored on the test batches.

    batches: (xs, labels) of all modalities, at most `max_datapoints` of each split. Sharded:
    the means of batch i are computed by rank i % world (a model that only samples draws them
    from a generator seeded with (seed, split, i)), the probe of subset j by rank j % world.
    Returns ``{"values": {"latent_<S>": acc, "latent_given_<k>": mean over |S| = k},
    "by_size": {k: {"mean", "subsets": {S: acc}}}, "num_train", "num_test", "seed"}``.
    """
    names = model.modalities
    subsets = nonempty_subsets(len(names))
    (z_tr, y_tr), (z_te, y_te) = (
        _subset_means(model, batches, subsets, seed, stream, max_datapoints, ranks)
        for stream, batches in ((1, train_batches), (2, test_batches)))
    mine = {j: linear_probe(z_tr[j], y_tr, z_te[j], y_te, seed=seed)
            for j, _ in ranks.mine(subsets)}
    accs = ranks.gather_by_index(mine)
    values = {f"latent_{subset_name(names, s)}": acc for s, acc in zip(subsets, accs)}
    by_size = {}
    for k in range(1, len(names) + 1):
        sized = {subset_name(names, s): acc for s, acc in zip(subsets, accs) if len(s) == k}
        by_size[str(k)] = {"mean": sum(sized.values()) / len(sized), "subsets": sized}
        values[f"latent_given_{k}"] = by_size[str(k)]["mean"]
    return {"values": values, "by_size": by_size, "num_train": len(y_tr), "num_test": len(y_te),
            "seed": seed}


def _subset_means(model, batches, subsets, seed, stream, max_datapoints, ranks):
    """([(N, D) float64 means per subset], labels (N,)) over the batches, in batch order."""
    device = model.prior_params()[0].device
    rows: dict[int, tuple] = {}
    with eval_mode(model):
        batches = ([labels, *xs] for xs, labels in batches)
        for index, (labels, *xs) in capped_batches(batches, max_datapoints):
            if ranks.owns(index):
                generator = batch_generator(seed, index, device, stream)
                xs = [as_float_images(x).to(device) for x in xs]
                cache: dict = {}
                means = [latent_mean_from_subset(model, xs, s, generator, cache=cache)
                         .double().cpu().numpy() for s in subsets]
                rows[index] = (means, torch.as_tensor(labels).long().numpy())
    gathered = ranks.gather_by_index(rows)
    if not gathered:
        raise ValueError("subset_latent_accuracy got no datapoints")
    means = [np.concatenate([row[0][j] for row in gathered]) for j in range(len(subsets))]
    return means, np.concatenate([row[1] for row in gathered])
