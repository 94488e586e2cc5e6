"""MNIST-SVHN recipe on tiny files in the exact published formats (gzipped idx, MATLAB .mat)."""
from __future__ import annotations

import gzip
import importlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from mmvae.data.pipeline import make_loader
from mmvae.data.recipes.common import InputError
from mmvae.data.recipes.mnist_svhn import build_mnist_svhn
from mmvae.data.recipes.pairing import expected_num_pairs

SIZES = {"train": (40, 50), "test": (20, 30)}  # (MNIST images, SVHN images)


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> None:
    """The idx format as published: big-endian magic (2051 images / 2049 labels), dims, bytes."""
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_raw(root: Path, *, layout: str = "flat", gz: bool = True, seed: int = 0) -> dict:
    """MNIST idx files and SVHN .mat files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    mnist_dir = root / "mnist" / ("MNIST/raw" if layout == "torchvision" else "")
    written = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        n_m, n_s = SIZES[split]
        images = rng.integers(0, 256, (n_m, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n_m).astype(np.uint8)
        write_idx(mnist_dir / f"{prefix}-images-idx3-ubyte", images, 2051, gz)
        write_idx(mnist_dir / f"{prefix}-labels-idx1-ubyte", labels, 2049, gz)
        X = rng.integers(0, 256, (32, 32, 3, n_s), dtype=np.uint8)
        y = rng.integers(1, 11, (n_s, 1)).astype(np.uint8)   # 10 means digit 0, as in SVHN
        y[:3, 0] = 10
        (root / "svhn").mkdir(parents=True, exist_ok=True)
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": X, "y": y})
        written[split] = (images, labels, X, y)
    return written


def recipe_count(labels_a, labels_b, dm, cap):
    return sum(dm * min(int((labels_a == c).sum()), int((labels_b == c).sum()), cap) for c in range(10))


def _launch():
    return importlib.import_module("mmvae.cli.shard_mnist_svhn")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ms")
    raw = make_raw(root)
    manifest = build_mnist_svhn(root / "mnist", root / "svhn", root / "out", seed=0, pairs_per_instance=3,
                                max_per_class=4, min_shards=4, progress=False)
    return root / "out", raw, manifest


def test_pair_counts_labels_and_unique_arrays_follow_the_inputs(built):
    out, raw, manifest = built
    pairs = np.load(out / "pairs.npz")
    assert manifest["dataset"] == "mnist_svhn" and manifest["sample_keys"] == ["label.cls", "mnist.npy", "svhn.npy"]
    assert manifest["params"]["pairs_per_instance"] == 3 and manifest["params"]["max_per_class"] == 4
    for split, (images, labels, X, y) in raw.items():
        unique = np.load(out / f"unique_{split}.npz")
        svhn_labels = y[:, 0].astype(np.int64) % 10
        # exact pixels and layouts: MNIST (N, 1, 28, 28); SVHN X[h, w, c, n] -> (N, C, H, W)
        assert (unique["mnist"] == images[:, None]).all() and (unique["mnist_labels"] == labels).all()
        assert (unique["svhn"] == X.transpose(3, 2, 0, 1)).all() and unique["svhn"].dtype == np.uint8
        assert (unique["svhn_labels"] == svhn_labels).all() and unique["svhn_labels"][:3].tolist() == [0, 0, 0]
        n = recipe_count(labels, svhn_labels, 3, 4)
        assert manifest["splits"][split]["num_samples"] == len(pairs[f"{split}_mnist"]) == n > 0
        assert (labels[pairs[f"{split}_mnist"]] == svhn_labels[pairs[f"{split}_svhn"]]).all()
    assert len(manifest["splits"]["train"]["shards"]) == 4


def test_shard_samples_are_the_recorded_pairs(built):
    out, raw, _ = built
    images, labels, X, y = raw["test"]
    pairs = np.load(out / "pairs.npz")
    loader = make_loader(out, "test", batch_size=8, modalities=["mnist", "svhn"], shuffle=False,
                         drop_last=False, return_keys=True)
    seen = 0
    for batch in loader:
        j = np.array([int(k) for k in batch["__key__"]])
        i_m, i_s = pairs["test_mnist"][j], pairs["test_svhn"][j]
        torch.testing.assert_close(batch["mnist"], torch.from_numpy(images[i_m][:, None]).float() / 255)
        torch.testing.assert_close(batch["svhn"], torch.from_numpy(X[..., i_s].transpose(3, 2, 0, 1)).float() / 255)
        assert (batch["label"].numpy() == labels[i_m]).all() and (batch["label"].numpy() == y[i_s, 0] % 10).all()
        seen += len(j)
    assert seen == len(pairs["test_mnist"]) and loader.errors == 0


def test_two_dp_ranks_see_disjoint_halves(built):
    out, _, manifest = built
    keys = [[k for b in make_loader(out, "train", batch_size=4, modalities=["mnist"], dp_rank=r, dp_size=2,
                                    drop_last=False, return_keys=True) for k in b["__key__"]] for r in range(2)]
    assert not set(keys[0]) & set(keys[1]) and len(keys[0]) > 0 and len(keys[1]) > 0
    assert len(keys[0]) + len(keys[1]) == manifest["splits"]["train"]["num_samples"]


def test_paper_counts_from_the_real_class_sizes():
    """REFERENCE.md §4: 1,121,360 / 200,000 pairs at dm=20 (1,682,040 / 300,000 at dm=30)."""
    mnist = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
             "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}
    svhn = {"train": [4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659],
            "test": [1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595]}
    labels = {k: {s: np.repeat(np.arange(10), v[s]) for s in v} for k, v in (("m", mnist), ("s", svhn))}
    for split, dm, expected in (("train", 20, 1_121_360), ("test", 20, 200_000), ("train", 30, 1_682_040),
                                ("test", 30, 300_000)):
        assert expected_num_pairs(labels["m"][split], labels["s"][split], pairs_per_instance=dm,
                                  max_per_class=10_000) == expected


@pytest.mark.parametrize("layout, gz", [("torchvision", False), ("flat", True)])
def test_layouts_and_determinism(tmp_path, layout, gz):
    make_raw(tmp_path, layout=layout, gz=gz)

    def build(name, seed):
        m = build_mnist_svhn(tmp_path / "mnist", tmp_path / "svhn", tmp_path / name, seed=seed, pairs_per_instance=2,
                             min_shards=2, progress=False)
        return [s["sha256"] for split in m["splits"].values() for s in split["shards"]], m["extra_files"]

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first == again and not set(first[0]) & set(other[0])
    assert first[1]["pairs.npz"] != other[1]["pairs.npz"]
    assert first[1]["unique_train.npz"] == other[1]["unique_train.npz"]  # the images do not depend on the seed


def test_shard_size_limit_is_respected(tmp_path):
    make_raw(tmp_path)
    m = build_mnist_svhn(tmp_path / "mnist", tmp_path / "svhn", tmp_path / "o", pairs_per_instance=2,
                         shard_size_mb=0.02, min_shards=1, progress=False)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["bytes"] <= 0.02 * 2**20 + 10240 for s in shards)  # + tar end blocks


@pytest.mark.parametrize("breakage, message", [
    (lambda r: (r / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink(),
     "MNIST file t10k-labels-idx1-ubyte[.gz] not found in"),
    (lambda r: (r / "svhn" / "test_32x32.mat").unlink(), "SVHN file test_32x32.mat not found in"),
    (lambda r: write_idx(r / "mnist" / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), 2049, True),
     "is not an MNIST idx images file (magic 2049, expected 2051)"),
    (lambda r: (r / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">II", 2049, 40) + bytes(39))), "the file is truncated"),
    (lambda r: savemat(r / "svhn" / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}),
     "expected (32, 32, 3, N)"),
])
def test_bad_inputs_exit_2_with_one_line_naming_the_file(tmp_path, capsys, breakage, message):
    make_raw(tmp_path)
    breakage(tmp_path)
    code = _launch().main(["--mnist", str(tmp_path / "mnist"), "--svhn", str(tmp_path / "svhn"),
                           "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()   # inputs are checked before anything is written


def test_launch_builds_and_reports(tmp_path, capsys):
    make_raw(tmp_path)
    assert _launch().main(["--mnist", str(tmp_path / "mnist"), "--svhn", str(tmp_path / "svhn"), "--out",
                           str(tmp_path / "out"), "--pairs-per-instance", "2", "--seed", "3", "--min-shards", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3 and "train/train_32x32.mat" in manifest["params"]["sources"]
    assert "mnist_svhn -> " in capsys.readouterr().out
    with pytest.raises(InputError):
        build_mnist_svhn(tmp_path / "nowhere", tmp_path / "svhn", tmp_path / "x", progress=False)
