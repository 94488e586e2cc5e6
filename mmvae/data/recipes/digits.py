"""Built-in offline ``digits`` dataset: an MNIST-SVHN look-alike that needs no download.

* ``mnist``: scikit-learn's 1,797 bundled handwritten 8×8 digits, upsampled to a 20×20 box and
  centred by centre of mass in 28×28 (as MNIST was made), 1×28×28 uint8.
* ``svhn``: printed digits rendered with Pillow (DejaVu faces), 3×32×32 uint8, styled like SVHN
  crops: random colours with enough contrast, scale, offset, ±10° rotation, partly visible
  neighbouring digits, mild blur and noise.

Handwritten sources are split train/test (stratified, seeded); a pool of printed digits is
rendered per split (same count per class as the handwritten side, different seeds for train and
test); pairs come from :func:`pair_by_class`. Every step draws from its own seeded stream, so the
shards are byte-identical for a given seed (and the same library versions).
"""
from __future__ import annotations

import colorsys
import io
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mmvae.data.recipes.common import DEFAULT_ENCODING, check_encoding, encode_images, save_npz
from mmvae.data.recipes.pairing import pair_by_class
from mmvae.data.writer import MANIFEST, write_manifest, write_shards

log = logging.getLogger(__name__)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# Upright faces that look like house-number plates; obliques and ExtraLight read poorly at 32 px.
FONT_FACES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerifCondensed-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
)
SUPERSAMPLE = 2          # render at 64×64, then downsample: smooth edges like a camera crop
SVHN_SIZE = 32
MNIST_SIZE, MNIST_BOX = 28, 20
# Stream tags: each stochastic step gets its own numpy stream derived from (seed, tag).
_TAG_SPLIT, _TAG_RENDER, _TAG_PAIR, _TAG_ORDER = 1, 2, 3, 4
_SPLIT_TAG = {"train": 0, "test": 1}


# ---------------------------------------------------------------- handwritten ("mnist") side
def load_handwritten() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits as (N, 8, 8) float values 0..16 and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def to_mnist(image8: np.ndarray) -> np.ndarray:
    """One 8×8 digit (0..16) -> (1, 28, 28) uint8: bilinear upsample into a 20×20 box, then
    shift so the centre of mass sits at the image centre, which is how MNIST was normalised."""
    small = Image.fromarray(np.round(image8 * (255.0 / 16.0)).astype(np.uint8))
    box = np.asarray(small.resize((MNIST_BOX, MNIST_BOX), Image.Resampling.BILINEAR), np.float64)
    total = box.sum()
    ys, xs = np.indices(box.shape)
    cy, cx = ((ys * box).sum() / total, (xs * box).sum() / total) if total > 0 else (9.5, 9.5)
    lo, hi = 0, MNIST_SIZE - MNIST_BOX
    top = int(np.clip(round(MNIST_SIZE / 2 - 0.5 - cy), lo, hi))
    left = int(np.clip(round(MNIST_SIZE / 2 - 0.5 - cx), lo, hi))
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    out[top:top + MNIST_BOX, left:left + MNIST_BOX] = np.clip(np.round(box), 0, 255)
    return out[None]


def split_train_test(labels: np.ndarray, sources: np.ndarray, test_fraction: float, seed: int):
    """Stratified split of the source indices ``sources``: per class, a seeded permutation,
    the first round(test_fraction * n_c) go to test. Disjoint by construction; both sorted."""
    rng = np.random.default_rng([seed, _TAG_SPLIT])
    test = []
    for c in np.unique(labels[sources]):
        idx = rng.permutation(sources[labels[sources] == c])
        test.append(idx[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(sources, test_idx)
    return train_idx, test_idx


# ---------------------------------------------------------------- printed ("svhn") side
def available_fonts() -> tuple[str, ...]:
    """The DejaVu faces present on this machine (the image set depends on them: recorded in
    the manifest). Empty means Pillow's built-in font is used instead."""
    return tuple(f for f in FONT_FACES if (FONT_DIR / f).is_file())


@lru_cache(maxsize=512)
def _font(face: str | None, size: int) -> ImageFont.FreeTypeFont:
    """Cached font objects: opening a TrueType file per image would dominate rendering time."""
    if face is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(FONT_DIR / face), size)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _hsv_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour with mostly low saturation: house-number plates and walls are greys, whites,
    browns and dark paints far more often than neon."""
    h, s, v = rng.random(), rng.beta(1.2, 3.0), rng.uniform(0.05, 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _colours(rng: np.random.Generator, min_contrast: float = 80.0):
    """Background and text colours whose luma differs by at least ``min_contrast`` (0..255),
    so the digit stays legible."""
    while True:
        bg, fg = _hsv_colour(rng), _hsv_colour(rng)
        if abs(_luma(bg) - _luma(fg)) >= min_contrast:
            return bg, fg


def _background(rng: np.random.Generator, bg, size: int) -> Image.Image:
    """A flat colour with a gentle linear gradient (uneven lighting of a real photo)."""
    shade = rng.uniform(-40, 40, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)[..., None]  # (S, S, 1) in [-0.7, 0.7]
    arr = np.clip(np.asarray(bg, np.float64) + ramp * shade, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _glyph_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def _text_layer(rng: np.random.Generator, digit: int, face, fg, canvas: int) -> Image.Image:
    """RGBA layer with the centre digit in the middle and, like SVHN crops of a multi-digit
    number, neighbouring digits to the left/right that the crop cuts partly off."""
    size = int(rng.uniform(0.7, 1.05) * canvas)  # DejaVu digit height ≈ 0.73 × size
    font = _font(face, size)
    layer = Image.new("RGBA", (canvas * 2, canvas * 2), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    cx = canvas + rng.uniform(-0.06, 0.06) * canvas
    cy = canvas + rng.uniform(-0.06, 0.06) * canvas
    gap = rng.uniform(0.0, 0.12) * size
    width = _glyph_width(font, str(digit))
    draw.text((cx, cy), str(digit), font=font, fill=fg + (255,), anchor="mm")
    if rng.random() < 0.75:  # left neighbour
        d = str(int(rng.integers(0, 10)))
        x = cx - width / 2 - gap - _glyph_width(font, d) / 2
        draw.text((x, cy), d, font=font, fill=fg + (255,), anchor="mm")
    if rng.random() < 0.75:  # right neighbour
        d = str(int(rng.integers(0, 10)))
        x = cx + width / 2 + gap + _glyph_width(font, d) / 2
        draw.text((x, cy), d, font=font, fill=fg + (255,), anchor="mm")
    # Rotate only the part that can reach the crop (radius canvas/√2 < 0.75·canvas): 2× faster.
    reach = (3 * canvas) // 4
    layer = layer.crop((canvas - reach, canvas - reach, canvas + reach, canvas + reach))
    layer = layer.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC)
    return layer.crop((reach - canvas // 2, reach - canvas // 2, reach + canvas // 2, reach + canvas // 2))


def render_printed(digit: int, rng: np.random.Generator, fonts: tuple[str, ...]) -> np.ndarray:
    """One SVHN-like crop of ``digit`` as (3, 32, 32) uint8; all randomness comes from ``rng``."""
    canvas = SVHN_SIZE * SUPERSAMPLE
    face = fonts[int(rng.integers(len(fonts)))] if fonts else None
    bg, fg = _colours(rng)
    image = _background(rng, bg, canvas)
    layer = _text_layer(rng, digit, face, fg, canvas)
    image.paste(layer, (0, 0), mask=layer)
    image = image.resize((SVHN_SIZE, SVHN_SIZE), Image.Resampling.LANCZOS)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.9)))
    arr = np.asarray(image, np.float64) + rng.normal(0.0, rng.uniform(1.0, 6.0), (SVHN_SIZE, SVHN_SIZE, 3))
    return np.clip(np.round(arr), 0, 255).astype(np.uint8).transpose(2, 0, 1)


# ---------------------------------------------------------------- encoding and building
def encode_png(image_chw: np.ndarray) -> bytes:
    """(1|3, H, W) uint8 -> PNG bytes; grayscale stays one channel ("L")."""
    array = image_chw[0] if image_chw.shape[0] == 1 else image_chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def printed_pool(labels: np.ndarray, split: str, seed: int, fonts: tuple[str, ...]):
    """Render as many printed digits per class as ``labels`` has handwritten ones; image j
    draws from its own stream (seed, split, j), so the pool does not depend on render order."""
    classes, counts = np.unique(labels, return_counts=True)
    pool_labels = np.repeat(classes, counts).astype(np.int64)
    images = np.stack([render_printed(int(d), np.random.default_rng([seed, _TAG_RENDER, _SPLIT_TAG[split], j]), fonts)
                       for j, d in enumerate(pool_labels)])
    return images, pool_labels


def _pair_samples(order, idx_m, idx_s, mnist_enc, svhn_enc, labels, encoding: str):
    """Samples in write order; the key is the pair's index in the recipe (pairs.npz) order, so
    any sample can be traced back to its two source images."""
    for j in order:
        yield {"__key__": f"{j:08d}", f"mnist.{encoding}": mnist_enc[idx_m[j]],
               f"svhn.{encoding}": svhn_enc[idx_s[j]], "label.cls": int(labels[idx_m[j]])}


def _build_split(out_dir: Path, split: str, sources: np.ndarray, images8, labels, *, seed: int,
                 pairs_per_instance: int, max_per_class, num_shards: int, fonts, encoding: str, progress: bool):
    """Unique images of one split -> pairs -> shards. Returns (shards, unique arrays, pairs)."""
    mnist = np.stack([to_mnist(images8[i]) for i in sources])
    mnist_labels = labels[sources]
    svhn, svhn_labels = printed_pool(mnist_labels, split, seed, fonts)
    tag = _SPLIT_TAG[split]
    idx_m, idx_s = pair_by_class(mnist_labels, svhn_labels, pairs_per_instance=pairs_per_instance,
                                 seed=[seed, _TAG_PAIR, tag], max_per_class=max_per_class)
    assert (mnist_labels[idx_m] == svhn_labels[idx_s]).all(), "pairing mixed classes"
    order = np.random.default_rng([seed, _TAG_ORDER, tag]).permutation(len(idx_m))
    mnist_enc = encode_images(mnist, encoding, png=encode_png)  # encode each unique image once,
    svhn_enc = encode_images(svhn, encoding, png=encode_png)    # reuse the bytes in all its pairs
    samples = _pair_samples(order, idx_m, idx_s, mnist_enc, svhn_enc, mnist_labels, encoding)
    shards = write_shards(samples, out_dir, split, total=len(order), progress=progress,
                          max_count=max(1, -(-len(order) // num_shards)), max_bytes=2**40)
    unique = dict(mnist=mnist, mnist_labels=mnist_labels, mnist_source=sources.astype(np.int64),
                  svhn=svhn, svhn_labels=svhn_labels)
    pairs = {f"{split}_mnist": idx_m, f"{split}_svhn": idx_s, f"{split}_write_order": order}
    return shards, unique, pairs


def build_digits(out_dir, *, seed: int = 0, pairs_per_instance: int = 20, test_fraction: float = 0.2,
                 max_per_class: int | None = None, train_shards: int = 16, test_shards: int = 8,
                 sources_per_class: int | None = None, encoding: str = DEFAULT_ENCODING,
                 progress: bool = True) -> dict:
    """Build the ``digits`` shards in ``out_dir`` and return the manifest.

    Writes ``train-*.tar`` and ``test-*.tar`` (samples ``mnist.npy``, ``svhn.npy`` -- raw
    uint8 (C, H, W); ``.png`` with ``encoding="png"`` -- and ``label.cls``), ``unique_{split}.npz`` (the unique source images and labels per modality,
    for training digit classifiers without duplicates), ``pairs.npz`` (``{split}_mnist`` and
    ``{split}_svhn`` index into the unique arrays; shard sample key ``j`` is pair j;
    ``{split}_write_order`` is the order pairs were written in) and ``manifest.json`` last.

    ``sources_per_class`` keeps only the first k handwritten digits of each class (tiny builds
    for tests and smoke runs); None uses all 1,797. Default shard counts (16 train, 8 test)
    let up to 2 ranks × 4 workers (train: 4 × 4) read in parallel.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if train_shards < 1 or test_shards < 1:
        raise ValueError("train_shards and test_shards must be >= 1")
    check_encoding(encoding)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)   # "not built" until the manifest is back
    images8, labels = load_handwritten()
    if sources_per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:sources_per_class] for c in np.unique(labels)]))
    else:
        keep = np.arange(len(labels))
    fonts = available_fonts()
    if not fonts:
        log.warning("no DejaVu fonts in %s: printed digits use Pillow's default font", FONT_DIR)
    splits, pairs, sizes = {}, {}, {}
    for split, sources, shards in zip(("train", "test"), split_train_test(labels, keep, test_fraction, seed),
                                      (train_shards, test_shards)):
        splits[split], unique, split_pairs = _build_split(
            out_dir, split, sources, images8, labels, seed=seed, pairs_per_instance=pairs_per_instance,
            max_per_class=max_per_class, num_shards=shards, fonts=fonts, encoding=encoding, progress=progress)
        save_npz(out_dir / f"unique_{split}.npz", **unique)
        pairs.update(split_pairs)
        sizes[split] = {"mnist_unique": len(unique["mnist"]), "svhn_unique": len(unique["svhn"]),
                        "pairs": len(split_pairs[f"{split}_mnist"]), "shards": len(splits[split])}
    save_npz(out_dir / "pairs.npz", **pairs)
    params = _params(seed, pairs_per_instance, test_fraction, max_per_class, sources_per_class, sizes, fonts,
                     encoding)
    images = [f"mnist.{encoding}", f"svhn.{encoding}"]
    return write_manifest(out_dir, "digits", params,
                          splits, ["pairs.npz", "unique_train.npz", "unique_test.npz"],
                          sample_keys=images + ["label.cls"], npy_images=images if encoding == "npy" else ())


def _params(seed, pairs_per_instance, test_fraction, max_per_class, sources_per_class, sizes, fonts,
            encoding) -> dict:
    """Recipe parameters recorded in the manifest: everything the bytes depend on."""
    import PIL
    import sklearn

    return {
        "recipe": "mmvae.data.recipes.digits", "seed": seed, "pairs_per_instance": pairs_per_instance,
        "test_fraction": test_fraction, "max_per_class": max_per_class,
        "sources_per_class": sources_per_class, "sizes": sizes, "encoding": encoding,
        "modalities": {"mnist": {"key": f"mnist.{encoding}", "shape": [1, MNIST_SIZE, MNIST_SIZE]},
                       "svhn": {"key": f"svhn.{encoding}", "shape": [3, SVHN_SIZE, SVHN_SIZE]}},
        "fonts": list(fonts) or ["pillow-default"],
        "versions": {"numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__},
    }
