"""Tiny hand-made shards for the data tests (a few KB, written in tmp_path)."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmvae.data.writer import write_manifest, write_shards

SAMPLE_KEYS = ["mnist.png", "svhn.png", "label.cls"]


def png(array_chw: np.ndarray) -> bytes:
    array = array_chw[0] if array_chw.shape[0] == 1 else array_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def tiny_images(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-sample images, so a test can check decoded pixels exactly."""
    rng = np.random.default_rng(index)
    return (rng.integers(0, 256, (1, 28, 28), dtype=np.uint8),
            rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))


def tiny_sample(index: int) -> dict:
    mnist, svhn = tiny_images(index)
    return {"__key__": f"{index:08d}", "mnist.png": png(mnist), "svhn.png": png(svhn), "label.cls": index % 10}


def make_tiny_shards(out_dir, counts_by_split: dict[str, list[int]]) -> dict:
    """Shards whose sizes are exactly ``counts_by_split[split]``; sample keys are global
    indices (train first), label = index % 10."""
    splits, start = {}, 0
    for split, counts in counts_by_split.items():
        total = sum(counts)
        samples = (tiny_sample(start + i) for i in range(total))
        shards = []
        # write_shards rolls over at max_count: write shard by shard to get uneven sizes
        for n in counts:
            shards += _write_one(out_dir, split, [next(samples) for _ in range(n)], len(shards))
        splits[split], start = shards, start + total
    return write_manifest(out_dir, "tiny", {"seed": 0}, splits, sample_keys=SAMPLE_KEYS)


def _write_one(out_dir, split, samples, index):
    """One shard with a given index (write_shards numbers from 0: rename afterwards)."""
    tmp = out_dir / f"_tmp_{split}"
    tmp.mkdir(exist_ok=True)
    (entry,) = write_shards(samples, tmp, split, total=len(samples), progress=False)
    name = f"{split}-{index:06d}.tar"
    (tmp / entry["file"]).rename(out_dir / name)
    tmp.rmdir()
    return [{**entry, "file": name}]


@pytest.fixture
def tiny():
    """The helpers above, as a fixture: test modules never import conftest (which breaks
    under pytest's importlib mode or when tests/conftest.py also exists)."""
    return SimpleNamespace(png=png, images=tiny_images, sample=tiny_sample, make_shards=make_tiny_shards)


@pytest.fixture
def tiny_dir(tmp_path):
    """train: 4 shards × 8 samples; test: 4 shards of 5, 5, 5, 3."""
    out = tmp_path / "tiny"
    out.mkdir()
    make_tiny_shards(out, {"train": [8, 8, 8, 8], "test": [5, 5, 5, 3]})
    return out
