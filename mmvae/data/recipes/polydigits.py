"""Built-in offline ``polydigits`` dataset: a PolyMNIST look-alike (five modalities) that needs
no download.

Every sample is one digit class shown in five modalities ``m0`` .. ``m4``, each a 3×28×28 uint8
image: a random 28×28 crop of that modality's procedurally generated background texture, with
the digit's pixels drawn in the *inverted* background colour (PolyMNIST's rule:
``out = (1 - a) · bg + a · (255 - bg)`` for digit intensity ``a`` in [0, 1]). The textures
differ in pattern and palette per modality (:data:`STYLES`: clouds, stripes, tiles, dots,
rings), and their palettes are all clearly dark or clearly light so that the inverted digit
stands out.

Digits are scikit-learn's 1,797 bundled handwritten 8×8 digits, made MNIST-like exactly as in
``digits`` (:func:`~mmvae.data.recipes.digits.to_mnist`) and split train/test by source
(stratified, seeded). A sample draws its class, then five *different* source digits of that
class (one per modality, without replacement: a sample never shows the same handwriting
twice), and each modality image gets its own small random rotation, scale and shift. So the
modalities share only the class, as in PolyMNIST.

Every step draws from its own seeded numpy stream (seed, tag, split, modality): the shards are
byte-identical for a given seed (and the same library versions).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from mmvae.data.recipes.common import DEFAULT_ENCODING, check_encoding, encode_images, library_versions, save_npz
from mmvae.data.recipes.digits import load_handwritten, split_train_test, to_mnist
from mmvae.data.writer import MANIFEST, write_manifest, write_shards

log = logging.getLogger(__name__)

SIZE = 28
TEXTURE_SIZE = 160       # each modality's texture; crops are 28×28 windows of it
# Stream tags: each stochastic step gets its own numpy stream derived from (seed, tag, ...).
_TAG_TEXTURE, _TAG_LABEL, _TAG_SOURCE, _TAG_WARP, _TAG_CROP = 11, 12, 13, 14, 15
_SPLIT_TAG = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Style:
    """One modality's look: a texture pattern and the two palette colours its values span."""
    pattern: str
    low: tuple[int, int, int]
    high: tuple[int, int, int]


# Dark palettes (luma < 100) and light ones (luma > 180): the inverted digit then differs from
# its background by at least ~60 luma levels everywhere.
STYLES = (
    Style("clouds", (8, 20, 64), (40, 100, 170)),       # dark blue, smooth noise
    Style("stripes", (255, 240, 175), (240, 180, 100)),  # light yellow-orange, wavy diagonals
    Style("tiles", (8, 50, 20), (50, 125, 55)),          # dark green, noisy checkerboard
    Style("dots", (250, 220, 245), (215, 160, 210)),     # light pink, random discs
    Style("rings", (55, 12, 8), (150, 65, 30)),          # dark red-brown, wood-grain rings
)
MODALITIES = tuple(f"m{i}" for i in range(len(STYLES)))


# ---------------------------------------------------------------- textures
def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random cells×cells grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC), np.float64).clip(0, 1)


def _pattern(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The scalar field (size, size) in [0, 1] of one texture pattern."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    warp = _noise(rng, size, 6) - 0.5
    if name == "clouds":
        field = 0.5 * _noise(rng, size, 5) + 0.3 * _noise(rng, size, 11) + 0.2 * _noise(rng, size, 23)
    elif name == "stripes":
        field = 0.5 + 0.5 * np.sin(2 * np.pi * (xs + ys) / 14.0 + 5.0 * warp)
    elif name == "tiles":
        checker = ((xs // 10 + ys // 10) % 2).astype(np.float64)
        field = 0.75 * checker + 0.25 * _noise(rng, size, 40)
    elif name == "dots":
        field = np.zeros((size, size))
        for cy, cx, r in zip(rng.uniform(0, size, 90), rng.uniform(0, size, 90), rng.uniform(2.5, 6.0, 90)):
            # wrap-around distance: dots crossing the border stay round in every crop
            dy = np.minimum(abs(ys - cy), size - abs(ys - cy))
            dx = np.minimum(abs(xs - cx), size - abs(xs - cx))
            field = np.maximum(field, np.clip(r + 0.5 - np.hypot(dy, dx), 0, 1))
    elif name == "rings":
        cy, cx = rng.uniform(-size, 2 * size, 2)
        field = 0.5 + 0.5 * np.sin(np.hypot(ys - cy, xs - cx) / 2.2 + 6.0 * warp)
    else:
        raise ValueError(f"unknown texture pattern {name!r}")
    lo, hi = field.min(), field.max()
    return (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)


def make_texture(style: Style, rng: np.random.Generator, size: int = TEXTURE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: the style's pattern mapped linearly from ``low`` to ``high``."""
    field = _pattern(style.pattern, rng, size)[..., None]
    low, high = np.asarray(style.low, np.float64), np.asarray(style.high, np.float64)
    return np.round(low + field * (high - low)).astype(np.uint8)


def random_crops(texture: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 28, 28) uint8 crops of ``texture`` (T, T, 3) at uniform random positions."""
    windows = np.lib.stride_tricks.sliding_window_view(texture, (SIZE, SIZE), axis=(0, 1))  # (T', T', 3, S, S)
    ys = rng.integers(0, windows.shape[0], n)
    xs = rng.integers(0, windows.shape[1], n)
    return np.ascontiguousarray(windows[ys, xs])


# ---------------------------------------------------------------- digits
def warp_digit(digit: np.ndarray, angle: float, scale: float, dx: float, dy: float) -> np.ndarray:
    """A (28, 28) uint8 digit rotated by ``angle`` degrees and scaled about the centre, then
    shifted by (dx, dy) pixels (bilinear)."""
    theta = np.deg2rad(angle)
    c, s = np.cos(theta) / scale, np.sin(theta) / scale
    centre = (SIZE - 1) / 2
    # PIL's AFFINE maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    ox, oy = centre + dx, centre + dy
    matrix = (c, s, centre - c * ox - s * oy, -s, c, centre + s * ox - c * oy)
    image = Image.fromarray(digit).transform((SIZE, SIZE), Image.Transform.AFFINE, matrix,
                                             resample=Image.Resampling.BILINEAR)
    return np.asarray(image)


def warped_digits(digits28: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every (28, 28) digit with its own rotation (±12°), scale (0.85..1.1) and shift (±2 px)."""
    n = len(digits28)
    angles, scales = rng.uniform(-12, 12, n), rng.uniform(0.85, 1.1, n)
    shifts = rng.uniform(-2, 2, (n, 2))
    return np.stack([warp_digit(d, a, s, dx, dy) for d, a, s, (dx, dy) in zip(digits28, angles, scales, shifts)])


@lru_cache(maxsize=1)
def _compose_table() -> np.ndarray:
    """(256, 256) uint8: [a, bg] -> round(((255 - a) bg + a (255 - bg)) / 255), exact integers."""
    a, bg = np.arange(256)[:, None], np.arange(256)[None]
    return ((bg * (255 - a) + a * (255 - bg) + 127) // 255).astype(np.uint8)


def compose(background: np.ndarray, digit: np.ndarray) -> np.ndarray:
    """PolyMNIST's rule: digit pixels take the inverted background colour.

    background (N, 3, S, S) uint8, digit (N, S, S) uint8 intensity -> (N, 3, S, S) uint8."""
    # a 256×256 table of every (a, bg) result: one uint8 gather instead of int/float temporaries
    # of the whole batch (20× faster for 10,000 images)
    index = (digit[:, None].astype(np.uint16) << 8) | background     # (N, 3, S, S): a * 256 + bg
    return _compose_table().reshape(-1)[index]


def draw_sources(labels: np.ndarray, sources: np.ndarray, num_samples: int, num_modalities: int,
                 rng_label: np.random.Generator, rng_source: np.random.Generator):
    """(sample labels (N,), source indices (M, N)): each sample's class is that of a uniformly
    drawn source (so classes keep the split's proportions); its M sources are distinct digits
    of that class, drawn without replacement."""
    sample_labels = labels[sources[rng_label.integers(0, len(sources), num_samples)]]
    chosen = np.zeros((num_modalities, num_samples), np.int64)
    for c in np.unique(sample_labels):
        pool = sources[labels[sources] == c]
        if len(pool) < num_modalities:
            raise ValueError(f"class {c} has {len(pool)} source digits in this split, fewer than the "
                             f"{num_modalities} modalities; raise sources_per_class or test_fraction")
        rows = np.flatnonzero(sample_labels == c)
        # argsort of uniform keys = a random permutation per row; its first M are distinct
        picks = rng_source.random((len(rows), len(pool))).argsort(axis=1)[:, :num_modalities]
        chosen[:, rows] = pool[picks].T
    return sample_labels.astype(np.int64), chosen


# ---------------------------------------------------------------- building
def render_split(split: str, sources: np.ndarray, digits28: np.ndarray, labels: np.ndarray,
                 textures: list[np.ndarray], *, num_samples: int, seed: int) -> dict:
    """The images of one split: {"m0": (N, 3, 28, 28) uint8, ..., "labels": (N,),
    "m0_source": (N,) source index, ...}."""
    tag = _SPLIT_TAG[split]
    sample_labels, chosen = draw_sources(labels, sources, num_samples, len(textures),
                                         np.random.default_rng([seed, _TAG_LABEL, tag]),
                                         np.random.default_rng([seed, _TAG_SOURCE, tag]))
    out = {"labels": sample_labels}
    for m, (name, texture) in enumerate(zip(MODALITIES, textures)):
        digits = warped_digits(digits28[chosen[m]], np.random.default_rng([seed, _TAG_WARP, tag, m]))
        crops = random_crops(texture, np.random.default_rng([seed, _TAG_CROP, tag, m]), num_samples)
        out[name], out[f"{name}_source"] = compose(crops, digits), chosen[m]
    return out


def _samples(images: dict, encoding: str, chunk: int = 1024):
    """Sample j of the split is row j of ``unique_{split}.npz``: key = j. Images are encoded
    a chunk at a time (batched encoding, bounded memory)."""
    for start in range(0, len(images["labels"]), chunk):
        encoded = {m: encode_images(images[m][start:start + chunk], encoding) for m in MODALITIES}
        for i, label in enumerate(images["labels"][start:start + chunk]):
            sample = {"__key__": f"{start + i:08d}"}
            sample.update({f"{m}.{encoding}": encoded[m][i] for m in MODALITIES})
            sample["label.cls"] = int(label)
            yield sample


def build_polydigits(out_dir, *, seed: int = 0, train_samples: int = 10_000, test_samples: int = 2_000,
                     test_fraction: float = 0.2, sources_per_class: int | None = None,
                     train_shards: int = 16, test_shards: int = 8, encoding: str = DEFAULT_ENCODING,
                     progress: bool = True) -> dict:
    """Build the ``polydigits`` shards in ``out_dir`` and return the manifest.

    Writes ``train-*.tar`` / ``test-*.tar`` (samples ``m0.npy`` .. ``m4.npy`` 3×28×28 raw
    uint8 (C, H, W) -- ``.png`` with ``encoding="png"`` -- and
    ``label.cls``; sample key j is row j of the split's unique file), ``unique_{split}.npz``
    (uint8 ``m0`` .. ``m4`` (N, 3, 28, 28), int64 ``m{i}_labels`` (all equal: one class per
    sample) and ``m{i}_source`` (the handwritten source digit of each image), for the digit
    classifiers) and ``manifest.json`` last. ``sources_per_class`` keeps the first k
    handwritten digits of each class (tiny builds); None uses all 1,797.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if min(train_samples, test_samples, train_shards, test_shards) < 1:
        raise ValueError("train_samples, test_samples, train_shards and test_shards must be >= 1")
    check_encoding(encoding)
    images8, labels = load_handwritten()
    keep = np.arange(len(labels)) if sources_per_class is None else np.sort(np.concatenate(
        [np.flatnonzero(labels == c)[:sources_per_class] for c in np.unique(labels)]))
    split_sources = split_train_test(labels, keep, test_fraction, seed)
    fewest = min(np.bincount(labels[sources]).min() for sources in split_sources)
    if fewest < len(STYLES):   # checked before anything in out_dir changes
        raise ValueError(f"a class has only {fewest} source digits in a split, fewer than the {len(STYLES)} "
                         f"modalities; raise sources_per_class or test_fraction")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)   # "not built" until the manifest is back
    digits28 = np.stack([to_mnist(image)[0] for image in images8])
    textures = [make_texture(style, np.random.default_rng([seed, _TAG_TEXTURE, m])) for m, style in enumerate(STYLES)]
    splits, sizes = {}, {}
    for split, sources, count, shards in zip(("train", "test"), split_sources, (train_samples, test_samples),
                                             (train_shards, test_shards)):
        images = render_split(split, sources, digits28, labels, textures, num_samples=count, seed=seed)
        splits[split] = write_shards(_samples(images, encoding), out_dir, split, total=count, progress=progress,
                                     max_count=max(1, -(-count // shards)), max_bytes=2**40)
        save_npz(out_dir / f"unique_{split}.npz", **{key: value for m in MODALITIES for key, value in (
            (m, images[m]), (f"{m}_labels", images["labels"]), (f"{m}_source", images[f"{m}_source"]))})
        sizes[split] = {"samples": count, "sources": len(sources), "shards": len(splits[split])}
    keys = [f"{m}.{encoding}" for m in MODALITIES]
    return write_manifest(out_dir, "polydigits", _params(seed, test_fraction, sources_per_class, sizes, encoding),
                          splits, ["unique_train.npz", "unique_test.npz"], sample_keys=keys + ["label.cls"],
                          npy_images=keys if encoding == "npy" else ())


def _params(seed, test_fraction, sources_per_class, sizes, encoding) -> dict:
    """Recipe parameters recorded in the manifest: everything the bytes depend on."""
    return {
        "recipe": "mmvae.data.recipes.polydigits", "seed": seed, "test_fraction": test_fraction,
        "sources_per_class": sources_per_class, "sizes": sizes, "texture_size": TEXTURE_SIZE,
        "encoding": encoding,
        "modalities": {m: {"key": f"{m}.{encoding}", "shape": [3, SIZE, SIZE], "texture": style.pattern,
                           "palette": [list(style.low), list(style.high)]}
                       for m, style in zip(MODALITIES, STYLES)},
        "versions": library_versions("numpy", "pillow", "scikit-learn"),
    }
