"""Evaluation and analysis of trained models (REFERENCE.md §5–7).

One module per job:

* `likelihoods`  IWAE log-likelihood estimates (joint, marginal, cross), chunked over K;
* `classifiers`  the digit classifiers of the coherence metrics, trained on unique images, cached;
* `coherence`    cross and joint coherence (MNIST-SVHN style digit datasets);
* `subsets`      subsets of modalities and z given a subset (the model's own rule, else MoE);
* `conditional`  conditional coherence from every subset to each left-out modality (M >= 2);
* `latent`       latent classification accuracy (logistic regression on posterior samples),
                 also per subset of modalities;
* `text`, `cca`  CUB CCA coherence: FastText + SIF sentence vectors, CCA space, its artifacts;
* `attributes`   attribute coherence of image-caption models on the built-in shapes data;
* `pictures`     reconstruction and prior-sample grids (also used by the trainer every epoch);
* `plots`        latent embedding (UMAP) and per-dimension KL box plots;
* `report`       the metrics table and `report.md`;
* `distributed`  metrics sharded over `accelerate launch` processes (`mmvae.ranks.Ranks`): seeds
                 per batch, batches capped, sums in batch order;
* `context`      `EvalContext`: the run, its model and options, and the batches metrics read;
* `metrics`      `METRICS`: one `Metric(fn, applies_to, sharded, needs_labels)` record per name;
* `run`          `evaluate_run(run_dir, metrics)`: load and check, run the metrics, write the files.

Importing `mmvae.eval` is cheap: submodules (and torch, matplotlib, umap, sklearn) load on first
use, so the numpy-only `mmvae.eval.text` imports without torch.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_EXPORTS = {
    "calculate_likelihoods": "likelihoods",
    "save_reconstructions": "pictures",
    "save_prior_samples": "pictures",
    "DigitClassifier": "classifiers",
    "train_classifier": "classifiers",
    "load_or_train_classifiers": "classifiers",
    "cross_coherence": "coherence",
    "joint_coherence": "coherence",
    "latent_accuracy": "latent",
    "subset_latent_accuracy": "latent",
    "conditional_coherence": "conditional",
    "latents_from_subset": "subsets",
    "cca_coherence": "cca",
    "cca_joint": "cca",
    "CaptionCCA": "cca",
    "Ranks": "distributed",
    "embedding_plot": "plots",
    "kl_plot": "plots",
    "write_report": "report",
    "evaluate_run": "run",
    "METRICS": "metrics",
    "Metric": "metrics",
    "EvalContext": "context",
}

__all__ = ["eval_mode", "posterior_sample", "decode_mean", *_EXPORTS]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model.eval()` and no_grad for the block; the previous train/eval mode is restored."""
    import torch  # here, not at the top: `mmvae.eval.text` is imported without torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def posterior_sample(expert, x: torch.Tensor, generator) -> torch.Tensor:
    """One z ~ q(z | x) per datapoint, (B, D), drawn with `generator` (what the cross-generation
    metrics decode)."""
    loc, scale = expert.posterior(x)
    eps = expert.posterior_family.noise(loc.shape, generator, loc.device)
    return expert.posterior_family.reparam(loc, scale, eps)


def decode_mean(expert, z: torch.Tensor) -> torch.Tensor:
    """The expert's decoded "mean" of z: images/features, or caption logits."""
    return expert.likelihood.mean(expert.decode(z))


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
