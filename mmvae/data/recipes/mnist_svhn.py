"""MNIST-SVHN pairs (the MMVAE recipe, REFERENCE.md §4), from the files users download.

Inputs (nothing is downloaded):

* MNIST in its published idx format: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``, directly in
  ``--mnist DIR`` or in ``DIR/MNIST/raw/`` (where torchvision leaves them).
* SVHN's cropped digits ``train_32x32.mat`` and ``test_32x32.mat`` in ``--svhn DIR``
  (MATLAB v5: ``X`` is (32, 32, 3, N) uint8, ``y`` is (N, 1) with label 10 for the digit 0).

Pairing (:func:`pair_by_class`): per class, both index lists are truncated to
n = min(n_MNIST, n_SVHN, 10,000) and each kept image is used ``pairs_per_instance`` (dm) times,
paired with a random image of the same class. The paper's text says dm = 20 (the default here);
its code used dm = 30 and no seed. Train: 56,068 matched images per side → 1,121,360 pairs at
dm = 20 (1,682,040 at 30); test: 10,000 → 200,000 (300,000).

Output: ``{train,test}-NNNNNN.tar`` (samples ``mnist.npy`` 1×28×28, ``svhn.npy`` 3×32×32 -- raw
uint8 (C, H, W); ``.png`` with ``encoding="png"`` --
``label.cls``; sample key j is pair j of ``pairs.npz``), ``pairs.npz`` (``{split}_mnist``,
``{split}_svhn``: indices into the split's images; ``{split}_write_order``),
``unique_{split}.npz`` (every image of the split as uint8 (N, C, H, W) ``mnist``, ``svhn`` and
int64 ``mnist_labels``, ``svhn_labels``: the evaluation trains digit classifiers on these) and
``manifest.json`` last.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np

from mmvae.data.recipes.common import (DEFAULT_ENCODING, InputError, check_encoding, encode_images,
                                       library_versions, save_npz, shard_limits)
from mmvae.data.recipes.digits import encode_png
from mmvae.data.recipes.pairing import pair_by_class
from mmvae.data.writer import sha256_file, MANIFEST, write_manifest, write_shards

log = logging.getLogger(__name__)

PAPER_MAX_PER_CLASS = 10_000
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803 / 0x0801: unsigned bytes, 3 / 1 dims
MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (or any mirror)"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
_TAG_PAIR, _TAG_ORDER = 3, 4
_SPLIT_TAG = {"train": 0, "test": 1}


# ---------------------------------------------------------------- reading the raw files
def find_mnist_file(mnist_dir, name: str) -> Path:
    """``name`` (or ``name.gz``; Kaggle-style ``train-images.idx3-ubyte`` too) in ``mnist_dir``
    or ``mnist_dir/MNIST/raw``."""
    mnist_dir = Path(mnist_dir)
    spellings = (name, name.replace("-idx", ".idx"))
    for folder in (mnist_dir, mnist_dir / "MNIST" / "raw"):
        for spelling in spellings:
            for candidate in (folder / spelling, folder / f"{spelling}.gz"):
                if candidate.is_file():
                    return candidate
    raise InputError(f"MNIST file {name}[.gz] not found in {mnist_dir} (nor in {mnist_dir / 'MNIST' / 'raw'}); "
                     f"put the four idx files from {MNIST_URL} there")


def read_idx(path, kind: str) -> np.ndarray:
    """An idx file (plain or gzipped, detected by content) as a uint8 array, header checked:
    big-endian magic 2051 (images, 3 dims) or 2049 (labels, 1 dim), then the dimensions."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InputError(f"{path}: corrupt gzip ({exc}); download it again") from exc
    expected = IDX_MAGIC[kind]
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        raise InputError(f"{path} is not an MNIST idx {kind} file (magic {magic}, expected {expected})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    size = int(np.prod(dims))
    if len(raw) - offset != size:
        raise InputError(f"{path}: header says {dims} = {size} bytes of data but the file has "
                         f"{len(raw) - offset}; the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, count=size, offset=offset).reshape(dims)


def load_mnist(mnist_dir, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(images (N, 1, 28, 28) uint8, labels (N,) int64, the files read)."""
    image_file, label_file = (find_mnist_file(mnist_dir, name) for name in MNIST_FILES[split])
    images, labels = read_idx(image_file, "images"), read_idx(label_file, "labels")
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise InputError(f"MNIST {split}: {image_file.name} holds images of shape {images.shape} and "
                         f"{label_file.name} {len(labels)} labels; expected (N, 28, 28) and N labels")
    if labels.max(initial=0) > 9:
        raise InputError(f"{label_file}: labels must be digits 0..9, found {labels.max()}")
    return images[:, None].copy(), labels.astype(np.int64), [image_file, label_file]


def load_svhn(svhn_dir, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64 with 10 → 0, the file read)."""
    from scipy.io import loadmat

    path = Path(svhn_dir) / SVHN_FILES[split]
    if not path.is_file():
        raise InputError(f"SVHN file {SVHN_FILES[split]} not found in {svhn_dir}; put train_32x32.mat and "
                         f"test_32x32.mat (format 2, cropped digits) from {SVHN_URL} there")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # noqa: BLE001 - scipy raises many kinds for a bad file
        raise InputError(f"{path}: cannot read as a MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise InputError(f"{path}: expected variables X and y, found {found}")
    X, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.shape[3] != len(y):
        raise InputError(f"{path}: X has shape {X.shape} and y {len(y)} labels; expected (32, 32, 3, N) and N")
    labels = y.astype(np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 10:
        raise InputError(f"{path}: labels must be 1..10 (10 = digit 0), found {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(X.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)  # (N, C, H, W)
    return images, labels % 10, [path]


# ---------------------------------------------------------------- building
class _EncodedCache:
    """Encode each unique image the first time a pair uses it, then reuse the bytes."""

    def __init__(self, images: np.ndarray, encoding: str):
        self.images, self.encoding, self.cache = images, encoding, [None] * len(images)

    def __getitem__(self, i: int) -> bytes:
        data = self.cache[i]
        if data is None:
            data = self.cache[i] = encode_images(self.images[i:i + 1], self.encoding, png=encode_png)[0]
        return data


def _samples(order, idx_m, idx_s, mnist, svhn, labels, encoding: str):
    """Samples in write order; key j = pair j in pairs.npz, so any sample traces back to its
    two source images."""
    mnist_enc, svhn_enc = _EncodedCache(mnist, encoding), _EncodedCache(svhn, encoding)
    for j in order:
        yield {"__key__": f"{j:08d}", f"mnist.{encoding}": mnist_enc[idx_m[j]],
               f"svhn.{encoding}": svhn_enc[idx_s[j]], "label.cls": int(labels[idx_m[j]])}


def pair_split(mnist_labels, svhn_labels, split: str, *, seed: int, pairs_per_instance: int,
               max_per_class: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(idx_mnist, idx_svhn, write_order) of one split; seeded per (seed, split)."""
    tag = _SPLIT_TAG[split]
    idx_m, idx_s = pair_by_class(mnist_labels, svhn_labels, pairs_per_instance=pairs_per_instance,
                                 seed=[seed, _TAG_PAIR, tag], max_per_class=max_per_class)
    if not (mnist_labels[idx_m] == svhn_labels[idx_s]).all():
        raise AssertionError("pairing mixed classes")
    order = np.random.default_rng([seed, _TAG_ORDER, tag]).permutation(len(idx_m))
    return idx_m, idx_s, order


def build_mnist_svhn(mnist_dir, svhn_dir, out_dir, *, seed: int = 0, pairs_per_instance: int = 20,
                     max_per_class: int | None = PAPER_MAX_PER_CLASS, shard_size_mb: float = 256,
                     min_shards: int = 16, encoding: str = DEFAULT_ENCODING, progress: bool = True) -> dict:
    """Build the MNIST-SVHN shards in ``out_dir`` (module docstring) and return the manifest.
    ``encoding``: images as ``npy`` (raw uint8, the default: fastest to load) or ``png``.

    All inputs are read and checked before anything is written. Shards hold at most
    ``shard_size_mb`` MiB, and each split has at least ``min_shards`` shards (if it has that
    many samples) so that dp ranks × workers can read in parallel.

    Raises:
        InputError: a missing or malformed input file (one-line message naming it).
    """
    if pairs_per_instance < 1:
        raise ValueError(f"pairs_per_instance must be >= 1, got {pairs_per_instance}")
    check_encoding(encoding)
    data, sources = {}, {}
    for split in ("train", "test"):
        mnist, mnist_labels, files_m = load_mnist(mnist_dir, split)
        svhn, svhn_labels, files_s = load_svhn(svhn_dir, split)
        data[split] = (mnist, mnist_labels, svhn, svhn_labels)
        sources.update({f"{split}/{p.name}": p for p in files_m + files_s})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)   # "not built" until the manifest is back
    splits, pairs, sizes = {}, {}, {}
    for split, (mnist, mnist_labels, svhn, svhn_labels) in data.items():
        idx_m, idx_s, order = pair_split(mnist_labels, svhn_labels, split, seed=seed,
                                         pairs_per_instance=pairs_per_instance, max_per_class=max_per_class)
        samples = _samples(order, idx_m, idx_s, mnist, svhn, mnist_labels, encoding)
        splits[split] = write_shards(samples, out_dir, split, total=len(order), progress=progress,
                                     **shard_limits(len(order), shard_size_mb, min_shards))
        save_npz(out_dir / f"unique_{split}.npz", mnist=mnist, mnist_labels=mnist_labels,
                 svhn=svhn, svhn_labels=svhn_labels)
        pairs.update({f"{split}_mnist": idx_m, f"{split}_svhn": idx_s, f"{split}_write_order": order})
        sizes[split] = {"mnist_images": len(mnist), "svhn_images": len(svhn), "pairs": len(order),
                        "matched_per_side": len(order) // pairs_per_instance, "shards": len(splits[split])}
    save_npz(out_dir / "pairs.npz", **pairs)
    params = {
        "recipe": "mmvae.data.recipes.mnist_svhn", "seed": seed, "pairs_per_instance": pairs_per_instance,
        "pairs_per_instance_note": "paper text: 20 (default here); paper code: 30, unseeded",
        "max_per_class": max_per_class, "shard_size_mb": shard_size_mb, "min_shards": min_shards,
        "sizes": sizes, "encoding": encoding,
        "modalities": {"mnist": {"key": f"mnist.{encoding}", "shape": [1, 28, 28]},
                       "svhn": {"key": f"svhn.{encoding}", "shape": [3, 32, 32]}},
        "sources": {name: sha256_file(path) for name, path in sources.items()},
        "versions": library_versions("numpy", "pillow", "scipy"),
    }
    return write_manifest(out_dir, "mnist_svhn", params, splits,
                          ["pairs.npz", "unique_train.npz", "unique_test.npz"],
                          sample_keys=[f"mnist.{encoding}", f"svhn.{encoding}", "label.cls"],
                          npy_images=[f"mnist.{encoding}", f"svhn.{encoding}"] if encoding == "npy" else ())
