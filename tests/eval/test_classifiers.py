"""Digit classifiers: they learn digits quickly, and the cache round-trips."""
import json
import time

import pytest
import torch

from mmvae.eval.classifiers import (DigitClassifier, accuracy, load_or_train_classifiers,
                                    predict, train_classifier)


def test_paper_architecture_shapes():
    assert DigitClassifier(1, 28).fc1.in_features == 320  # REFERENCE.md §6
    assert DigitClassifier(3, 32).fc1.in_features == 500
    out = DigitClassifier(3, 32)(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.allclose(out.exp().sum(-1), torch.ones(2))


def test_learns_sklearn_digits_quickly(digits28):
    x, y = digits28
    start = time.perf_counter()
    net = train_classifier(x[:1400], y[:1400], epochs=5, batch_size=32, seed=0)
    assert time.perf_counter() - start < 30  # ~1-2 s on one idle core
    assert accuracy(net, x[1400:], y[1400:]) > 0.8


def test_cache_round_trip(unique_digits, tmp_path):
    cache = tmp_path / "classifiers"
    nets, infos = load_or_train_classifiers(unique_digits, ["mnist", "svhn"], epochs=1,
                                            cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.json", "mnist.pt", "svhn.json",
                                                       "svhn.pt"]
    assert json.loads((cache / "svhn.json").read_text())["test_accuracy"] == infos["svhn"]["test_accuracy"]
    assert infos["svhn"]["in_channels"] == 3 and infos["mnist"]["train_images"] == 1400
    mtime = (cache / "mnist.pt").stat().st_mtime_ns
    again, _ = load_or_train_classifiers(unique_digits, ["mnist"], epochs=1, cache_dir=cache)
    assert (cache / "mnist.pt").stat().st_mtime_ns == mtime  # loaded, not retrained
    probe = torch.rand(16, 1, 28, 28)
    assert torch.equal(predict(again["mnist"], probe), predict(nets["mnist"], probe))
    # the cache alone suffices (no unique images needed) ...
    empty = tmp_path / "no_unique"
    load_or_train_classifiers(empty, ["mnist"], cache_dir=cache, image_shapes={"mnist": (1, 28, 28)})
    # ... unless it was made for other images: then it retrains, which needs them
    with pytest.raises(FileNotFoundError, match="unique_train.npz"):
        load_or_train_classifiers(empty, ["mnist"], cache_dir=cache,
                                  image_shapes={"mnist": (3, 32, 32)})
