"""Showing CUB modalities: captions as text, ResNet features as their nearest training image.

* `decode_captions(ids_or_logits, itos)`: argmax over the vocabulary when given logits, then the
  words up to (not including) the first ``<eos>``.
* `FeatureIndex`: the paper's "ft" retrieval (REFERENCE.md §4, ``NN_lookup``): a feature vector
  is shown as the training image whose stored feature is nearest in Euclidean distance
  sqrt(1e-5 + | |a|^2 + |b|^2 - 2 a.b |). The index lives next to the shards as two ``.npy``
  files, opened memory-mapped (`np.load(mmap_mode="r")`): only the rows a query touches are
  read, never all images at once.

      feature_index.npy         (N, 2048) float32: one row per unique training image
      feature_index_images.npy  (N, 3, 64, 64) uint8: that image

  `build_feature_index(shards_dir)` writes them once from the shards (through
  `mmvae.data.make_loader`), streaming to disk. Other splits get a ``_<split>`` suffix.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmvae.log import track
from mmvae.models.captions import EOS

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
INDEX_FILE, INDEX_IMAGES_FILE = "feature_index{suffix}.npy", "feature_index_images{suffix}.npy"


# --- captions ----------------------------------------------------------------------------------

def load_vocab(shards_dir) -> list[str] | None:
    """The ``itos`` list of ``shards_dir/vocab.json`` (None when there is none); cached."""
    path = Path(shards_dir) / VOCAB_FILE
    if not path.is_file():
        return None
    return _load_vocab(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_vocab(path: str, mtime: int) -> list[str]:
    return list(json.loads(Path(path).read_text(encoding="utf-8"))["itos"])


def caption_ids(captions: torch.Tensor) -> torch.Tensor:
    """Token ids (n, L) int64 from ids (n, L) of any dtype or logits (n, L, V) (argmax)."""
    if captions.dim() == 3:
        return captions.argmax(-1)
    return captions.round().long() if captions.is_floating_point() else captions.long()


def decode_captions(captions: torch.Tensor | np.ndarray, itos: Sequence[str] | None) -> list[str]:
    """One string per caption: the words before the first ``<eos>``, joined by spaces.

    captions: ids (n, L) or logits (n, L, V). Without a vocabulary the ids are printed.
    """
    ids = caption_ids(torch.as_tensor(captions).detach().cpu()).tolist()
    texts = []
    for row in ids:
        if EOS in row:
            row = row[:row.index(EOS)]
        words = [itos[i] if itos is not None and 0 <= i < len(itos) else str(i) for i in row]
        texts.append(" ".join(words))
    return texts


# --- nearest-neighbour images for features -----------------------------------------------------

def index_paths(directory, split: str = "train") -> tuple[Path, Path]:
    suffix = "" if split == "train" else f"_{split}"
    directory = Path(directory)
    return (directory / INDEX_FILE.format(suffix=suffix),
            directory / INDEX_IMAGES_FILE.format(suffix=suffix))


class FeatureIndex:
    """Nearest stored image by feature distance over memory-mapped ``.npy`` files."""

    def __init__(self, features: np.ndarray, images: np.ndarray, rows_per_chunk: int = 8192):
        if len(features) != len(images) or len(features) == 0:
            raise ValueError(f"feature index: {len(features)} features for {len(images)} images")
        self.features, self.images = features, images  # (N, F) float32, (N, 3, H, W) uint8
        self.rows_per_chunk = rows_per_chunk
        self._sq_norms: np.ndarray | None = None

    @classmethod
    def open(cls, directory, split: str = "train") -> "FeatureIndex | None":
        """The index stored in `directory` (memory-mapped), or None when it was never built."""
        feats, images = index_paths(directory, split)
        if not (feats.is_file() and images.is_file()):
            return None
        return cls(np.load(feats, mmap_mode="r"), np.load(images, mmap_mode="r"))

    def __len__(self) -> int:
        return len(self.features)

    def _norms(self) -> np.ndarray:
        if self._sq_norms is None:  # |b|^2 of every stored row, one pass over the file
            self._sq_norms = np.concatenate([
                np.square(np.asarray(self.features[i:i + self.rows_per_chunk], np.float64)).sum(1)
                for i in range(0, len(self), self.rows_per_chunk)])
        return self._sq_norms

    def nearest(self, queries: torch.Tensor | np.ndarray) -> np.ndarray:
        """Row of the nearest stored feature for each query (n, F) -> (n,) int64."""
        q = np.asarray(torch.as_tensor(queries).detach().float().cpu().numpy(), np.float64)
        q_sq, norms = np.square(q).sum(1), self._norms()
        best = np.zeros(len(q), np.int64)
        best_dist = np.full(len(q), np.inf)
        for start in range(0, len(self), self.rows_per_chunk):
            rows = np.asarray(self.features[start:start + self.rows_per_chunk], np.float64)
            sq = q_sq[:, None] + norms[None, start:start + len(rows)] - 2 * q @ rows.T
            dist = np.sqrt(1e-5 + np.abs(sq))  # the paper's distance (REFERENCE.md §4)
            arg = dist.argmin(1)
            d = dist[np.arange(len(q)), arg]
            better = d < best_dist
            best[better], best_dist[better] = arg[better] + start, d[better]
        return best

    def lookup(self, queries: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The nearest stored images as float32 (n, 3, H, W) in [0, 1]."""
        rows = self.nearest(queries)
        images = np.stack([np.asarray(self.images[r]) for r in rows])
        return torch.from_numpy(images.astype(np.float32) / 255)


def open_or_build_index(shards_dir, split: str = "train", build: bool = True) -> FeatureIndex | None:
    """`FeatureIndex.open` (cached per file version); when the index is missing, `build` is set
    and the shards hold ``feature`` and ``image``, build it first. None when there is no index
    and none can be built (a warning says why)."""
    feats, _ = index_paths(shards_dir, split)
    if not feats.is_file() and build:
        manifest = Path(shards_dir) / "manifest.json"
        keys = (json.loads(manifest.read_text()).get("sample_keys") if manifest.is_file() else None)
        stems = {k.partition(".")[0] for k in keys or []}
        if {"feature", "image"} <= stems:
            log.info("building the feature index of %s (once)", shards_dir)
            try:
                build_feature_index(shards_dir, split)
            except OSError as err:  # e.g. a read-only shards folder
                log.warning("cannot write the feature index next to %s: %s", shards_dir, err)
        else:
            log.warning("%s holds no feature+image samples: features are not drawn", shards_dir)
    if not feats.is_file():
        return None
    return _open_cached(str(feats.resolve()), split, feats.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, split: str, mtime: int) -> FeatureIndex | None:
    return FeatureIndex.open(Path(path).parent, split)


def build_feature_index(shards_dir, split: str = "train", *, out_dir=None, batch_size: int = 256,
                        feature_key: str = "feature", image_key: str = "image") -> tuple[Path, Path]:
    """Write the nearest-neighbour index of `split` (unique images only) and return its paths.

    Reads ``feature`` and ``image`` of every sample through `mmvae.data.make_loader` in shard
    order; captions make each image appear ten times, so rows are kept once per distinct
    feature vector. Features and images are streamed to temporary raw files, then copied into
    the final ``.npy`` files, which are renamed into place (atomic; never all images in RAM).
    """
    from mmvae.data import make_loader  # eval -> data: the only data use in this module

    out_dir = Path(out_dir or shards_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = make_loader(shards_dir, split, batch_size=batch_size,
                         modalities=[feature_key, image_key], shuffle=False, drop_last=False)
    final = index_paths(out_dir, split)
    raw = [p.with_name(p.name + ".raw.tmp") for p in final]
    seen, count, shapes = set(), 0, None
    with open(raw[0], "wb") as f_out, open(raw[1], "wb") as i_out:
        # once per shards folder, a pass over the whole split: say so (and its eta)
        for batch in track(loader, f"nearest-image index of the {split} features (pictures)",
                           len(loader)):
            feats = batch[feature_key].float().numpy().astype(np.float32)
            images = np.rint(batch[image_key].numpy() * 255).astype(np.uint8)
            shapes = feats.shape[1:], images.shape[1:]
            for feat, image in zip(feats, images):
                digest = hashlib.sha1(feat.tobytes()).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                f_out.write(feat.tobytes())
                i_out.write(np.ascontiguousarray(image).tobytes())
                count += 1
    if not count:
        raise ValueError(f"split {split!r} of {shards_dir} holds no samples")
    for tmp, path, dtype, shape in zip(raw, final, (np.float32, np.uint8), shapes):
        src = np.memmap(tmp, dtype=dtype, mode="r", shape=(count, *shape))
        part = path.with_name(path.name + ".tmp.npy")
        dst = np.lib.format.open_memmap(part, mode="w+", dtype=dtype, shape=(count, *shape))
        for i in range(0, count, 4096):
            dst[i:i + 4096] = src[i:i + 4096]
        dst.flush()
        del src, dst
        os.replace(part, path)
        tmp.unlink()
    return final
