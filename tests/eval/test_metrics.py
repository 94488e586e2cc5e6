"""The metric registry: one `Metric` record per name says when it applies, whether it is sharded
and whether it needs labels; the trainer's periodic list in the config names the same metrics."""
from pathlib import Path

import numpy as np
import pytest
import torch

import mmvae
from mmvae.config import PERIODIC_METRICS, load_config
from mmvae.eval.context import EvalContext, is_reference
from mmvae.eval.metrics import METRICS, SHARDED, inapplicable


def context(model, tmp_path, **overrides) -> EvalContext:
    cfg = load_config(None, [f"data.shards={tmp_path}", *(f"{k}={v}" for k, v in overrides.items())])
    return EvalContext(Path(tmp_path), cfg, model, cfg.eval, 0, torch.device("cpu"))


def test_the_sharded_metrics_are_the_ones_the_config_lets_the_trainer_run():
    """config sits below eval, so it keeps its own list: it must name exactly the sharded ones."""
    assert set(SHARDED) == set(PERIODIC_METRICS)
    assert all(callable(m.fn) and callable(m.applies_to) for m in METRICS.values())


def test_reference_models_are_recognised_by_their_class_not_their_attributes():
    assert is_reference(mmvae.build_model("gaussian")) and is_reference(mmvae.build_model("gaussian_pair"))
    digits = mmvae.build_model("mnist_svhn", latent_dim=2)
    digits.sample_data = lambda n, generator=None: None  # an attribute does not make it a reference
    assert not is_reference(digits)


@pytest.mark.parametrize("name", [n for n, m in METRICS.items() if m.needs_labels])
def test_metrics_that_need_labels_do_not_apply_to_reference_models(name, tmp_path):
    ctx = context(mmvae.build_model("gaussian_pair"), tmp_path, **{"model.name": "gaussian_pair"})
    assert inapplicable(name, ctx) == f"{name} needs labelled data; model gaussian_pair has none"


def test_a_metric_that_needs_labels_still_checks_its_own_conditions(tmp_path):
    """A digits model on shards without unique images or cached classifiers: coherence is
    refused with its own reason (labels are there), latent applies."""
    ctx = context(mmvae.build_model("mnist_svhn", latent_dim=2), tmp_path)
    assert "neither unique_train.npz nor cached classifiers" in inapplicable("coherence", ctx)
    assert inapplicable("latent", ctx) is None and inapplicable("likelihood", ctx) is None


@pytest.mark.parametrize("name", ["subset_coherence", "subset_latent"])
def test_subset_metrics_apply_to_multimodal_models_with_a_classifier_for_every_modality(name, tmp_path):
    from standins import digit_mmvae

    assert "needs a multimodal model" in inapplicable(name, context(mmvae.build_model("mnist"), tmp_path))
    model = digit_mmvae(3)
    assert inapplicable(name, context(model, tmp_path)).startswith(f"{name}: no digit classifier for m0, m1, m2")
    (tmp_path / "classifiers").mkdir()
    for m in ("m0", "m2"):
        (tmp_path / "classifiers" / f"{m}.pt").touch()
    assert "no digit classifier for m1:" in inapplicable(name, context(model, tmp_path))
    np.savez(tmp_path / "unique_train.npz", m1=np.zeros((2, 1, 28, 28), np.uint8), m1_labels=np.zeros(2))
    assert inapplicable(name, context(model, tmp_path)) is None  # m1 can be trained
    reason = inapplicable(name, context(model, tmp_path, **{"eval.coherence_pairs": "unique"}))
    if name == "subset_coherence":  # unique pairs are built for two modalities
        assert "eval.coherence_pairs=unique pairs two modalities" in reason
    else:
        assert reason is None


def test_with_two_modalities_the_subset_metrics_repeat_coherence_and_latent_and_only_then(tmp_path):
    """The default list leaves a subset metric out where it would compute the same numbers as
    another chosen metric (M = 2: every subset is one expert); with three it adds its own."""
    from mmvae.eval.metrics import repeats
    from standins import digit_mmvae

    two = context(mmvae.build_model("mnist_svhn", latent_dim=2), tmp_path)
    assert repeats("subset_coherence", two) == "coherence" and repeats("subset_latent", two) == "latent"
    three = context(digit_mmvae(3), tmp_path)
    assert repeats("subset_coherence", three) is None and repeats("subset_latent", three) is None
    assert all(repeats(n, two) is None for n in METRICS if not n.startswith("subset_"))
