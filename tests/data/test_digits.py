"""Pairing recipe, the built-in digits dataset, ensure_builtin and launch/shard_demo.py."""
from __future__ import annotations

import importlib
import json
from functools import partial

import numpy as np
import pytest
import torch

from mmvae.data import builtin
from mmvae.data.pipeline import make_loader
from mmvae.data.recipes.digits import build_digits
from mmvae.data.recipes.pairing import expected_num_pairs, pair_by_class


def recipe_count(labels_a, labels_b, dm, cap=None):
    """The REFERENCE.md §4 formula, written independently of the implementation."""
    total = 0
    for c in set(labels_a) | set(labels_b):
        n = min(list(labels_a).count(c), list(labels_b).count(c))
        total += dm * (n if cap is None else min(n, cap))
    return total


@pytest.mark.parametrize("dm, cap", [(1, None), (3, None), (2, 4)])
def test_pairing_follows_the_recipe(dm, cap):
    rng = np.random.default_rng(0)
    labels_a = rng.integers(0, 5, 60)
    labels_b = np.concatenate([rng.integers(0, 5, 40), [7]])  # class 7 has no partner
    idx_a, idx_b = pair_by_class(labels_a, labels_b, pairs_per_instance=dm, seed=1, max_per_class=cap)
    assert len(idx_a) == len(idx_b) == recipe_count(labels_a, labels_b, dm, cap)
    assert len(idx_a) == expected_num_pairs(labels_a, labels_b, pairs_per_instance=dm, max_per_class=cap)
    assert (labels_a[idx_a] == labels_b[idx_b]).all()
    for c in range(5):  # only the first n (sorted) of each class are used, each exactly dm times
        n = min((labels_a == c).sum(), (labels_b == c).sum(), cap or 10**9)
        used_a, counts_a = np.unique(idx_a[labels_a[idx_a] == c], return_counts=True)
        assert (used_a == np.flatnonzero(labels_a == c)[:n]).all() and (counts_a == dm).all()
        used_b, counts_b = np.unique(idx_b[labels_b[idx_b] == c], return_counts=True)
        assert (used_b == np.flatnonzero(labels_b == c)[:n]).all() and (counts_b == dm).all()


def test_pairing_is_seeded():
    labels = np.repeat(np.arange(3), 20)
    first = pair_by_class(labels, labels[::-1], pairs_per_instance=2, seed=5)
    again = pair_by_class(labels, labels[::-1], pairs_per_instance=2, seed=5)
    other = pair_by_class(labels, labels[::-1], pairs_per_instance=2, seed=6)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[1] == other[1]).all()
    with pytest.raises(ValueError, match="pairs_per_instance"):
        pair_by_class(labels, labels, pairs_per_instance=0)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """40 handwritten sources per class, 2 pairs per instance, the default shard counts."""
    out = tmp_path_factory.mktemp("digits")
    build_digits(out, seed=0, pairs_per_instance=2, sources_per_class=40, progress=False)
    return out


def test_digits_manifest_sizes_follow_the_recipe(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    pairs = np.load(digits_dir / "pairs.npz")
    assert manifest["dataset"] == "digits" and manifest["params"]["pairs_per_instance"] == 2
    for split in ("train", "test"):
        unique = np.load(digits_dir / f"unique_{split}.npz")
        idx_m, idx_s = pairs[f"{split}_mnist"], pairs[f"{split}_svhn"]
        expected = recipe_count(unique["mnist_labels"], unique["svhn_labels"], 2)
        assert len(idx_m) == len(idx_s) == expected == manifest["splits"][split]["num_samples"]
        assert (unique["mnist_labels"][idx_m] == unique["svhn_labels"][idx_s]).all()
        assert sorted(pairs[f"{split}_write_order"]) == list(range(expected))
    assert len(manifest["splits"]["train"]["shards"]) == 16 and len(manifest["splits"]["test"]["shards"]) == 8
    assert manifest["params"]["sizes"]["train"] == {"mnist_unique": 320, "svhn_unique": 320,
                                                    "pairs": 640, "shards": 16}


def test_digits_train_test_disjoint_by_source_and_stratified(digits_dir):
    train, test = (dict(np.load(digits_dir / f"unique_{s}.npz")) for s in ("train", "test"))
    src_train, src_test = set(train["mnist_source"]), set(test["mnist_source"])
    assert not src_train & src_test and len(src_train | src_test) == 400
    test_per_class = np.bincount(test["mnist_labels"], minlength=10)
    assert (test_per_class == 8).all() and (np.bincount(train["mnist_labels"], minlength=10) == 32).all()
    # the printed pools match the handwritten class counts, and test is rendered with other seeds
    assert (np.bincount(test["svhn_labels"], minlength=10) == test_per_class).all()
    flat_train = train["svhn"].reshape(len(train["svhn"]), -1)
    assert not any((flat_train == img.reshape(-1)).all(axis=1).any() for img in test["svhn"])


def test_digits_shards_hold_exactly_the_recorded_pairs(digits_dir):
    pairs = np.load(digits_dir / "pairs.npz")
    unique = np.load(digits_dir / "unique_test.npz")
    loader = make_loader(digits_dir, "test", batch_size=64, modalities=["mnist", "svhn"], shuffle=False,
                         drop_last=False, return_keys=True)
    seen = 0
    for batch in loader:
        j = np.array([int(k) for k in batch["__key__"]])
        mnist = torch.from_numpy(unique["mnist"][pairs["test_mnist"][j]]).float() / 255
        svhn = torch.from_numpy(unique["svhn"][pairs["test_svhn"][j]]).float() / 255
        torch.testing.assert_close(batch["mnist"], mnist)
        torch.testing.assert_close(batch["svhn"], svhn)
        assert (batch["label"].numpy() == unique["mnist_labels"][pairs["test_mnist"][j]]).all()
        seen += len(j)
    assert seen == len(pairs["test_mnist"]) and loader.errors == 0


def test_digits_images_look_like_mnist_and_svhn(digits_dir):
    unique = np.load(digits_dir / "unique_train.npz")
    mnist, svhn = unique["mnist"].astype(np.float64), unique["svhn"].astype(np.float64)
    assert mnist.shape[1:] == (1, 28, 28) and svhn.shape[1:] == (3, 32, 32)
    # MNIST: a digit on black, centred by centre of mass
    assert np.median(mnist[:, 0, [0, -1]]) == 0 and mnist.max(axis=(1, 2, 3)).min() > 200
    ys, xs = np.indices((28, 28))
    mass = mnist[:, 0].sum(axis=(1, 2))
    cy, cx = (mnist[:, 0] * ys).sum(axis=(1, 2)) / mass, (mnist[:, 0] * xs).sum(axis=(1, 2)) / mass
    assert np.abs(cy - 13.5).max() < 1.5 and np.abs(cx - 13.5).max() < 1.5
    # SVHN-like: colour, legible contrast, varied backgrounds
    assert (svhn.std(axis=(1, 2, 3)) > 10).mean() > 0.95
    assert (np.abs(svhn[:, 0] - svhn[:, 2]).mean(axis=(1, 2)) > 3).mean() > 0.5
    assert svhn[:, :, 0, 0].std(axis=0).min() > 30


def test_digits_build_is_deterministic_given_the_seed(tmp_path):
    def build(name, seed):
        m = build_digits(tmp_path / name, seed=seed, pairs_per_instance=2, sources_per_class=6,
                         train_shards=3, test_shards=2, progress=False)
        return [s["sha256"] for split in m["splits"].values() for s in split["shards"]], m["extra_files"]

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first == again
    assert not set(first[0]) & set(other[0])
    assert first[1]["pairs.npz"] != other[1]["pairs.npz"]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_ensure_builtin_builds_once_and_rejects_unknown(tmp_path, monkeypatch):
    calls = []

    def fake_build(out_dir, **kw):
        calls.append(out_dir)
        return build_digits(out_dir, sources_per_class=3, pairs_per_instance=1, train_shards=2,
                            test_shards=1, progress=False)

    monkeypatch.setitem(builtin.BUILTINS, "digits", fake_build)
    manifest = builtin.ensure_builtin(tmp_path / "d", "digits")
    assert manifest["dataset"] == "digits" and (tmp_path / "d" / "manifest.json").is_file()
    assert builtin.ensure_builtin(tmp_path / "d", "digits") == manifest and len(calls) == 1
    with pytest.raises(ValueError, match="built-ins: digits"):
        builtin.ensure_builtin(tmp_path / "e", "mnist_svhn")


def _shard_demo():
    return importlib.import_module("mmvae.cli.shard_demo")


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar", "--out", "x"], "unknown --dataset 'cifar'; valid: digits, polydigits, shapes"),
    (["--dataset", "digits", "--out", "x", "--pairs-per-instance", "0"], "must be >= 1"),
    (["--dataset", "digits"], "required: --out"),
    (["--dataset", "digits", "--out", "x", "--seed", "one"], "invalid int value"),
])
def test_shard_demo_rejects_bad_arguments_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _shard_demo().main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_shard_demo_builds_through_the_registry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(builtin.BUILTINS, "digits", partial(
        build_digits, sources_per_class=3, train_shards=2, test_shards=1, progress=False))
    assert _shard_demo().main(["--dataset", "digits", "--out", str(tmp_path / "o"), "--seed", "4",
                               "--pairs-per-instance", "2"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 4 and manifest["params"]["pairs_per_instance"] == 2
    assert "train: " in capsys.readouterr().out
