"""Analysis figures (REFERENCE.md §5, ``analyse``): latent embedding and per-dimension KL.

* ``embedding_plot``: K posterior samples z ~ q_m(z | x_m) per modality and K*B prior samples
  z ~ p(z), embedded in 2-D with UMAP (n_neighbors=40, as the paper), falling back to t-SNE when
  UMAP is missing or fails; two panels, coloured by source (prior / q_m) and by digit class.
* ``kl_plot``: box plots over the batch of KL(q_m(z|x_m) || p(z)) per latent dimension and, for
  every pair of experts, the symmetric J(q_i, q_j) = (KL(q_i||q_j) + KL(q_j||q_i)) / 2, on a log
  axis. Dimensions whose KL sits at ~0 for every input are unused by the encoder.

matplotlib with the Agg backend (no display); figures are closed after saving.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmvae.dists import kl
from mmvae.eval import eval_mode

log = logging.getLogger(__name__)
METHODS = ("umap", "tsne", "pca")
KL_FLOOR = 1e-6  # log axis: exact zeros are drawn at the floor


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def embed_2d(points: np.ndarray, method: str = "umap", *, n_neighbors: int = 40,
             seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) -> ((N, 2), method actually used). UMAP falls back to t-SNE if it fails."""
    if method not in METHODS:
        raise ValueError(f"unknown embedding method {method!r}; valid: {', '.join(METHODS)}")
    if method == "umap":
        try:
            import umap

            reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(points) - 1), random_state=seed)
            with warnings.catch_warnings():  # "n_jobs overridden by random_state": we want seeded
                warnings.simplefilter("ignore", UserWarning)
                return np.asarray(reducer.fit_transform(points)), "umap"
        except Exception as err:  # missing package, numba trouble, degenerate input
            log.warning("UMAP failed (%s); falling back to t-SNE", err)
            method = "tsne"
    if method == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, init="pca", random_state=seed,
                    perplexity=min(30.0, max(2.0, (len(points) - 1) / 3)))
        return tsne.fit_transform(points), "tsne"
    centred = points - points.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, "pca"


@torch.no_grad()
def latent_samples(model, xs: Sequence[torch.Tensor], K: int = 10,
                   generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """{"prior": (K*B, D), modality: (K*B, D) from q_m(z | x_m)}; rows k*B + b (class of b)."""
    B = xs[0].shape[0]
    out = {}
    with eval_mode(model):
        loc, scale = model.prior_params()
        eps = model.prior_family.noise((K * B, loc.shape[-1]), generator, loc.device)
        out["prior"] = model.prior_family.reparam(loc, scale, eps).cpu().numpy()
        for name, expert, x in zip(model.modalities, model.experts, xs):
            q_loc, q_scale = expert.posterior(x.to(loc.device))
            eps = expert.posterior_family.noise((K, *q_loc.shape), generator, loc.device)
            z = expert.posterior_family.reparam(q_loc, q_scale, eps)  # (K, B, D)
            out[name] = z.reshape(K * B, -1).cpu().numpy()
    return out


def embedding_plot(model, xs: Sequence[torch.Tensor], path, *, labels=None, K: int = 10,
                   method: str = "umap", n_neighbors: int = 40, seed: int = 0) -> dict:
    """Write the 2-D latent embedding figure to `path`. Returns {"path", "method", "points"}."""
    generator = torch.Generator(device=model.prior_params()[0].device).manual_seed(seed)
    samples = latent_samples(model, xs, K, generator)
    sources = list(samples)
    emb, used = embed_2d(np.concatenate(list(samples.values())), method,
                         n_neighbors=n_neighbors, seed=seed)
    sizes = np.cumsum([0] + [len(v) for v in samples.values()])
    plt = _pyplot()
    ncols = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 5.5), squeeze=False)
    ax = axes[0, 0]
    for i, name in enumerate(sources):
        part = emb[sizes[i]:sizes[i + 1]]
        ax.scatter(part[:, 0], part[:, 1], s=3, alpha=0.5,
                   label="p(z)" if name == "prior" else f"q(z|{name})")
    ax.legend(markerscale=4)
    ax.set_title(f"latent samples ({used}) by source")
    if labels is not None:
        ax = axes[0, 1]
        prior = emb[: sizes[1]]
        ax.scatter(prior[:, 0], prior[:, 1], s=3, c="lightgrey", label="p(z)")
        classes = np.tile(np.asarray(labels).reshape(-1), K)  # rows k*B + b
        post = emb[sizes[1]:]
        sc = ax.scatter(post[:, 0], post[:, 1], s=3, alpha=0.6, cmap="tab10", vmin=-0.5, vmax=9.5,
                        c=np.tile(classes, len(sources) - 1))
        fig.colorbar(sc, ax=ax, ticks=range(10), label="class")
        ax.set_title("posterior samples by class (grey: prior)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"path": path, "method": used, "points": int(len(emb))}


@torch.no_grad()
def kl_per_dimension(model, xs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """{"KL(q_m||p)": (B, D), "J(q_i,q_j)": (B, D)} per modality and per expert pair."""
    out = {}
    with eval_mode(model):
        p_loc, p_scale = model.prior_params()
        posts = [e.posterior(x.to(p_loc.device)) for e, x in zip(model.experts, xs)]
        fams = [e.posterior_family for e in model.experts]
        for name, fam, (loc, scale) in zip(model.modalities, fams, posts):
            out[f"KL(q_{name}||p)"] = kl(fam, loc, scale, model.prior_family, p_loc, p_scale)
        for (i, a), (j, b) in itertools.combinations(enumerate(model.modalities), 2):
            ab = kl(fams[i], *posts[i], fams[j], *posts[j])
            ba = kl(fams[j], *posts[j], fams[i], *posts[i])
            out[f"J(q_{a},q_{b})"] = (ab + ba) / 2
    return {k: v.cpu().numpy() for k, v in out.items()}


def kl_plot(model, xs: Sequence[torch.Tensor], path) -> dict:
    """Write the per-dimension KL box plot to `path`. Returns {"path", "mean_kl"} where
    mean_kl[name] is the batch mean summed over dimensions."""
    values = kl_per_dimension(model, xs)
    plt = _pyplot()
    D = next(iter(values.values())).shape[1]
    n = len(values)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.25 * D * n)), 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, v) in enumerate(values.items()):
        pos = np.arange(D) + (i - (n - 1) / 2) * width
        box = ax.boxplot(np.maximum(v, KL_FLOOR), positions=pos, widths=width * 0.9,
                         patch_artist=True, showfliers=False, manage_ticks=False)
        for patch in box["boxes"]:
            patch.set_facecolor(colours[i % len(colours)])
        ax.plot([], [], color=colours[i % len(colours)], lw=6, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(D))
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("nats")
    ax.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"path": path, "mean_kl": {k: float(v.sum(1).mean()) for k, v in values.items()}}
