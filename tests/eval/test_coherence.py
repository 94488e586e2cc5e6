"""Coherence: perfect, direction-broken and untrained models."""
import pytest
import torch

import mmvae
from mmvae.eval.classifiers import DigitClassifier
from mmvae.eval.coherence import array_batches, cross_coherence, joint_coherence, unique_pairs


def batches_of(model, n=200, batch_size=64):
    xs, labels = model.pairs(n)
    return [([x[i:i + batch_size] for x in xs], labels[i:i + batch_size])
            for i in range(0, n, batch_size)]


def test_perfect_stand_in_is_fully_coherent(template_model):
    model = template_model
    cross = cross_coherence(model, batches_of(model), model.classifiers(), seed=0)
    assert cross["num_pairs"] == 200
    assert cross["values"] == {"self_mnist": 1.0, "cross_mnist_to_svhn": 1.0,
                               "cross_svhn_to_mnist": 1.0, "self_svhn": 1.0}
    joint = joint_coherence(model, model.classifiers(), num_samples=500, batch_size=128)
    assert joint["values"]["joint"] == 1.0 and joint["num_samples"] == 500
    assert sum(joint["class_counts"]["mnist"]) == 500


def test_direction_of_cross_coherence(make_template_model):
    """The SVHN decoder draws the wrong digit: only generations *into* SVHN fail."""
    model = make_template_model(shifts=(0, 1))
    cross = cross_coherence(model, batches_of(model), model.classifiers())["values"]
    assert cross["cross_svhn_to_mnist"] == 1.0  # MNIST decoded from the SVHN encoder: fine
    assert cross["cross_mnist_to_svhn"] == 0.0  # SVHN decoded from the MNIST encoder: shifted
    assert cross["self_svhn"] == 0.0 and cross["self_mnist"] == 1.0
    joint = joint_coherence(model, model.classifiers(), num_samples=300)["values"]["joint"]
    assert joint == 0.0


def test_untrained_model_is_near_chance():
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=8)
    classifiers = {"mnist": DigitClassifier(1, 28), "svhn": DigitClassifier(3, 32)}
    labels = torch.arange(200) % 10  # balanced: a constant prediction scores exactly 10%
    xs = [torch.rand(200, 1, 28, 28), torch.rand(200, 3, 32, 32)]
    cross = cross_coherence(model, array_batches(xs, labels, 64), classifiers)
    for key in ("cross_mnist_to_svhn", "cross_svhn_to_mnist"):
        assert 0.0 <= cross["values"][key] <= 0.3


def test_max_datapoints_and_seed(template_model):
    model = template_model
    out = cross_coherence(model, batches_of(model), model.classifiers(), max_datapoints=70)
    assert out["num_pairs"] == 70
    with pytest.raises(ValueError, match="multimodal"):
        joint_coherence(mmvae.build_model("mnist"), {}, num_samples=2)


def test_unique_pairs_use_each_image_of_the_smaller_side_once():
    ya, yb = torch.tensor([0, 1, 1, 2, 2, 2]).numpy(), torch.tensor([2, 1, 0, 2, 1, 9]).numpy()
    xa, xb = torch.arange(6).numpy(), torch.arange(6).numpy() + 100
    (pa, pb), labels = unique_pairs({"mnist": (xa, ya), "svhn": (xb, yb)}, ["mnist", "svhn"])
    assert len(labels) == 1 + 2 + 2  # per class min(n_a, n_b)
    assert (ya[pa] == labels).all() and (yb[pb - 100] == labels).all()
    assert len(set(pa.tolist())) == len(pa) and len(set(pb.tolist())) == len(pb)
