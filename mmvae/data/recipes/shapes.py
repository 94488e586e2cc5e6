"""Built-in offline ``shapes`` dataset: CUB-shaped image-caption pairs that need no download.

A scene is a 64×64 RGB image of one or two coloured shapes (circle, square, triangle, star,
diamond, hexagon; seven colours; small or large; placed left/right/top/bottom/centre, or one
above/below/left of/right of the other) on a dark, unevenly lit background, drawn with Pillow
at 4× and downsampled. Each scene gets 10 lower-case English captions generated from its
attributes with synonyms and varied word order ("a small red circle above a blue square",
"on the left , there is a large green triangle", ...). Label = the shape class of the main
object (the first one described in the attributes).

Everything else is the CUB format (``captions.py``): the same tokenisation, train-only
vocabulary (``vocab.json``), 32-id captions and samples ``image.jpg``, ``caption.json``,
``caption.txt``, ``label.cls``, 10 samples per scene, so the CUB models and the CCA analysis
run end to end offline. Train and test scenes come from the same distribution (different
seeds); CUB's split is class-disjoint instead.

``simple=True`` (built-in ``shapes_simple``, the caption demo's data) draws one upright object
near the centre of a plain mid-grey canvas (radius 15-18 px small, 23-27 px large) and
describes it with three fixed phrasings and no synonyms ("a large red circle", "there is a
small blue star", "the square is large and green"; a vocabulary of ~20 words). The grey matters:
on a black canvas the paper's sigmoid-Laplace(0.01) image decoder saturates at black and learns
nothing for hundreds of steps (measured); the caption demo needs a model that learns in minutes.

``features=True`` (built-in ``shapes_ft``) adds ``feature.npy``: a fixed random ReLU projection
of the 2×2-average-pooled image to 2048 non-negative values, a stand-in with the shape of
ResNet-101 avgpool features (not a learned feature) so cubISft runs offline too.

``unique_{split}.npz`` holds per scene ``image`` (N, 3, 64, 64) uint8, ``image_labels`` and the
attributes (``shape``, ``colour``, ``size``, ``num_objects``, and ``second_shape``/
``second_colour``, -1 when absent), plus ``caption`` (10 N, 32) ids. Seeded and deterministic:
the same seed gives byte-identical shards (on the same library versions).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmvae.data.recipes import captions as cap
from mmvae.data.recipes.common import library_versions, save_npz
from mmvae.data.writer import MANIFEST, write_manifest

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box", "block"), "triangle": ("triangle",),
               "star": ("star",), "diamond": ("diamond", "rhombus"), "hexagon": ("hexagon",)}
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225), "yellow": (235, 210, 40),
           "purple": (145, 60, 190), "orange": (240, 135, 25), "white": (235, 235, 235)}
COLOUR_WORDS = {"purple": ("purple", "violet"), "white": ("white", "pale")}
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RADIUS = {"small": (6.0, 8.5), "large": (12.0, 15.0)}            # pixels at 64×64
PLACES = ("left", "right", "top", "bottom", "centre")
PLACE_WORDS = {"left": ("on the left", "to the left", "at the left side", "in the left half"),
               "right": ("on the right", "to the right", "at the right side", "in the right half"),
               "top": ("at the top", "near the top", "in the upper part"),
               "bottom": ("at the bottom", "near the bottom", "in the lower part"),
               "centre": ("in the middle", "in the center", "in the centre")}
RELATIONS = ("above", "below", "left of", "right of")
RELATION_WORDS = {"above": ("above", "over", "on top of"), "below": ("below", "under", "beneath"),
                  "left of": ("to the left of", "left of"), "right of": ("to the right of", "right of")}
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SIMPLE_RADIUS = {"small": (15.0, 18.0), "large": (23.0, 27.0)}   # shapes_simple: bigger objects
SIMPLE_BACKGROUND = 128.0   # shapes_simple: mid-grey (see the module docstring)
SIZE, SUPERSAMPLE = 64, 4
_TAG_SCENE = 6
_SPLIT_TAG = {"train": 0, "test": 1}
FEATURE_SEED = 20191106   # the projection is one fixed function, independent of the dataset seed


# ---------------------------------------------------------------- scenes
def _centre(rng, place: str, r: float) -> tuple[float, float]:
    """(x, y) in pixels for a shape of radius r in region ``place``, kept inside the canvas."""
    lo, hi = {"left": ((0.15, 0.32), (0.3, 0.7)), "right": ((0.68, 0.85), (0.3, 0.7)),
              "top": ((0.3, 0.7), (0.15, 0.32)), "bottom": ((0.3, 0.7), (0.68, 0.85)),
              "centre": ((0.44, 0.56), (0.44, 0.56))}[place]
    x, y = rng.uniform(*lo) * SIZE, rng.uniform(*hi) * SIZE
    return float(np.clip(x, r + 1, SIZE - r - 1)), float(np.clip(y, r + 1, SIZE - r - 1))


def sample_scene(rng: np.random.Generator) -> dict:
    """Attributes of one scene: a main object and, half of the time, a second one of another
    colour placed by ``relation`` (the main object is ``relation`` the second)."""
    def obj():
        return {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                "size": SIZES[rng.integers(len(SIZES))], "angle": rng.uniform(-15, 15)}

    main = obj()
    main["radius"] = rng.uniform(*RADIUS[main["size"]])
    scene = {"objects": [main], "background": rng.uniform(10, 70, 3), "light": rng.uniform(-25, 25, 2)}
    if rng.random() < 0.5:
        main["place"] = PLACES[rng.integers(len(PLACES))]
        main["xy"] = _centre(rng, main["place"], main["radius"])
        return scene
    second = obj()
    while second["colour"] == main["colour"]:
        second["colour"] = list(COLOURS)[rng.integers(len(COLOURS))]
    second["radius"] = rng.uniform(*RADIUS[second["size"]])
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    first_place, second_place = {"above": ("top", "bottom"), "below": ("bottom", "top"),
                                 "left of": ("left", "right"), "right of": ("right", "left")}[relation]
    main["xy"] = _centre(rng, first_place, main["radius"])
    second["xy"] = _centre(rng, second_place, second["radius"])
    scene["objects"].append(second)
    scene["relation"] = relation
    return scene


def sample_simple_scene(rng: np.random.Generator) -> dict:
    """``shapes_simple``: one upright, large-ish object near the centre of a plain grey canvas,
    so that shape, colour and size are all there is to see (and to say)."""
    obj = {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
           "size": SIZES[rng.integers(len(SIZES))], "angle": 0.0, "place": "centre"}
    obj["radius"] = rng.uniform(*SIMPLE_RADIUS[obj["size"]])
    obj["xy"] = tuple(float(v) for v in SIZE / 2 + rng.uniform(-3, 3, 2))
    return {"objects": [obj], "background": np.full(3, SIMPLE_BACKGROUND), "light": np.zeros(2)}


def _polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (x, y) with circumradius r, rotated by ``angle`` degrees."""
    if shape == "star":
        radii, n = [r if k % 2 == 0 else 0.45 * r for k in range(10)], 10
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        radii = [r] * n
    start = {"square": 45.0, "diamond": 0.0, "hexagon": 0.0}.get(shape, -90.0)  # triangle/star point up
    points = []
    for k in range(n):
        theta = math.radians(start + angle + 360.0 * k / n)
        stretch = 1.25 if shape == "diamond" else 1.0            # a rhombus, taller than wide
        dx, dy = radii[k] * math.cos(theta) * (0.8 if shape == "diamond" else 1.0), radii[k] * math.sin(theta) * stretch
        points.append((x + dx, y + dy))
    return points


def render_scene(scene: dict, rng: np.random.Generator) -> np.ndarray:
    """The scene as (3, 64, 64) uint8."""
    s = SUPERSAMPLE
    ys, xs = np.mgrid[0:SIZE * s, 0:SIZE * s] / (SIZE * s) - 0.5
    shade = scene["light"][0] * xs + scene["light"][1] * ys
    canvas = np.clip(scene["background"][None, None] + shade[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        colour = tuple(int(c) for c in np.clip(np.asarray(COLOURS[obj["colour"]]) + rng.normal(0, 10, 3), 0, 255))
        x, y, r = obj["xy"][0] * s, obj["xy"][1] * s, obj["radius"] * s
        if obj["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.polygon(_polygon(obj["shape"], x, y, r, obj["angle"]), fill=colour)
    small = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small).transpose(2, 0, 1).copy()


# ---------------------------------------------------------------- captions
def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _words(rng, obj: dict, with_size: bool = True) -> tuple[str, str, str]:
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    size = pick(SIZE_WORDS[obj["size"]]) if with_size else ""
    return size, pick(COLOUR_WORDS.get(obj["colour"], (obj["colour"],))), pick(SHAPE_WORDS[obj["shape"]])


def _phrase(size: str, colour: str, shape: str) -> str:
    """'a small red circle' / 'an orange star' (article agrees with the next word)."""
    words = " ".join(w for w in (size, colour, shape) if w)
    return f"{_a(words)} {words}"


SINGLE_TEMPLATES = (
    lambda s, c, n, p: f"{_phrase(s, c, n)} {p}",
    lambda s, c, n, p: f"there is {_phrase(s, c, n)} {p}",
    lambda s, c, n, p: f"{p} , {_phrase(s, c, n)}",
    lambda s, c, n, p: f"{_phrase('', c, n)} that is {s}",
    lambda s, c, n, p: f"this picture shows {_phrase(s, '', n)} . it is {c}",
    lambda s, c, n, p: f"the {n} is {c} and {s}",
    lambda s, c, n, p: f"{_phrase(s, '', n)} , colored {c} , {p}",
    lambda s, c, n, p: f"one {c} {n} {p} on a dark background",
    lambda s, c, n, p: f"{s} {c} {n}",
    lambda s, c, n, p: f"the image contains {_phrase(s, c, n)} placed {p}",
    lambda s, c, n, p: f"you can see {_phrase('', c, n)} {p} .",
)
PAIR_TEMPLATES = (
    lambda a, b, rel, inv: f"{_phrase(*a)} {rel} {_phrase(*b)}",
    lambda a, b, rel, inv: f"there is {_phrase(*a)} {rel} {_phrase(*b)}",
    lambda a, b, rel, inv: f"{_phrase(*b)} {inv} {_phrase(*a)}",
    lambda a, b, rel, inv: f"two shapes : {_phrase(*a)} and {_phrase(*b)}",
    lambda a, b, rel, inv: f"{_phrase(*a)} and {_phrase(*b)} , the {a[1]} one is {rel} the {b[1]} one",
    lambda a, b, rel, inv: f"the {a[1]} {a[2]} is {rel} the {b[1]} {b[2]} .",
    lambda a, b, rel, inv: f"{rel} {_phrase(*b)} there is {_phrase(*a)}",
    lambda a, b, rel, inv: f"{_phrase(*a)} sits {rel} {_phrase(*b)}",
    lambda a, b, rel, inv: f"this image shows {_phrase(*a)} . there is {_phrase(*b)} {inv} it",
)


# shapes_simple: three fixed phrasings, no synonyms (the first word of each synonym list).
SIMPLE_TEMPLATES = (
    lambda s, c, n: f"{_phrase(s, c, n)}",
    lambda s, c, n: f"there is {_phrase(s, c, n)}",
    lambda s, c, n: f"the {n} is {s} and {c}",
)


def simple_captions(scene: dict, rng: np.random.Generator, n: int = cap.CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` captions of a ``shapes_simple`` scene, cycling through `SIMPLE_TEMPLATES` from a
    random start."""
    obj = scene["objects"][0]
    words = (SIZE_WORDS[obj["size"]][0], COLOUR_WORDS.get(obj["colour"], (obj["colour"],))[0],
             SHAPE_WORDS[obj["shape"]][0])
    start = rng.integers(len(SIMPLE_TEMPLATES))
    return [SIMPLE_TEMPLATES[(start + i) % len(SIMPLE_TEMPLATES)](*words) for i in range(n)]


def scene_captions(scene: dict, rng: np.random.Generator, n: int = cap.CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` captions of the scene: templates in a random order (each at most once per cycle),
    fresh synonym draws for each."""
    objects = scene["objects"]
    templates = SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES
    order = np.concatenate([rng.permutation(len(templates)) for _ in range(-(-n // len(templates)))])[:n]
    out = []
    for t in order:
        if len(objects) == 1:
            place = PLACE_WORDS[objects[0]["place"]]
            text = templates[t](*_words(rng, objects[0]), place[rng.integers(len(place))])
        else:
            relation = scene["relation"]
            rel, inv = RELATION_WORDS[relation], RELATION_WORDS[INVERSE[relation]]
            a = _words(rng, objects[0], with_size=rng.random() < 0.6)
            b = _words(rng, objects[1], with_size=rng.random() < 0.4)
            text = templates[t](a, b, rel[rng.integers(len(rel))], inv[rng.integers(len(inv))])
        out.append(" ".join(text.split()))
    return out


# ---------------------------------------------------------------- features (shapes_ft)
@lru_cache(maxsize=1)
def _projection() -> np.ndarray:
    return np.random.default_rng(FEATURE_SEED).standard_normal((2048, 3 * 32 * 32)) / math.sqrt(3 * 32 * 32)


def project_features(images: np.ndarray) -> np.ndarray:
    """(N, 3, 64, 64) uint8 -> (N, 2048) float32: ReLU of a fixed random projection of the
    2×2-average-pooled image in [0, 1] (computed in float64 so the bytes are stable)."""
    x = images.astype(np.float64).reshape(len(images), 3, 32, 2, 32, 2).mean(axis=(3, 5)) / 255.0
    return np.maximum(x.reshape(len(images), -1) @ _projection().T, 0.0).astype(np.float32)


# ---------------------------------------------------------------- building
def scenes(split: str, num: int, seed: int, simple: bool = False):
    """(images (N, 3, 64, 64), captions (10 N), attribute arrays); scene j draws from its own
    stream (seed, split, j)."""
    sample, describe = (sample_simple_scene, simple_captions) if simple else (sample_scene, scene_captions)
    images, captions = np.empty((num, 3, SIZE, SIZE), np.uint8), []
    attrs = {k: np.full(num, -1, np.int64) for k in ("shape", "colour", "size", "num_objects",
                                                     "second_shape", "second_colour")}
    for j in range(num):
        rng = np.random.default_rng([seed, _TAG_SCENE, _SPLIT_TAG[split], j])
        scene = sample(rng)
        images[j] = render_scene(scene, rng)
        captions += describe(scene, rng)
        main = scene["objects"][0]
        attrs["shape"][j], attrs["colour"][j] = SHAPES.index(main["shape"]), list(COLOURS).index(main["colour"])
        attrs["size"][j], attrs["num_objects"][j] = SIZES.index(main["size"]), len(scene["objects"])
        if len(scene["objects"]) == 2:
            second = scene["objects"][1]
            attrs["second_shape"][j] = SHAPES.index(second["shape"])
            attrs["second_colour"][j] = list(COLOURS).index(second["colour"])
    return images, captions, attrs


def build_shapes(out_dir, *, seed: int = 0, train_scenes: int = 3000, test_scenes: int = 1000,
                 features: bool = False, simple: bool = False, shard_size_mb: float = 64, min_shards: int = 8,
                 progress: bool = True) -> dict:
    """Build the ``shapes`` (or, with ``features``, ``shapes_ft``) shards in ``out_dir`` and
    return the manifest; see the module docstring. ``simple`` builds ``shapes_simple`` instead
    (one centred object on grey, three fixed phrasings). ~10 s for the defaults on one core."""
    if train_scenes < 1 or test_scenes < 1:
        raise ValueError(f"train_scenes and test_scenes must be >= 1 (got {train_scenes}, {test_scenes})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    data = {split: scenes(split, num, seed, simple) for split, num in (("train", train_scenes), ("test", test_scenes))}
    vocab = cap.build_vocab([cap.tokenize(c) for c in data["train"][1]])
    splits, sizes = {}, {}
    for split, (images, captions, attrs) in data.items():
        ids = cap.encode_all(captions, vocab)
        feats = project_features(images) if features else None
        jpegs = [cap.encode_jpeg(Image.fromarray(im.transpose(1, 2, 0))) for im in images]
        splits[split] = cap.write_caption_shards(out_dir, split, images_jpg=jpegs, labels=attrs["shape"],
                                                 captions=captions, ids=ids, features=feats, seed=seed,
                                                 shard_size_mb=shard_size_mb, min_shards=min_shards, progress=progress)
        unique = {"image": images, "image_labels": attrs["shape"], **attrs, "caption": ids}
        if feats is not None:
            unique["feature"] = feats
        save_npz(out_dir / f"unique_{split}.npz", **unique)
        sizes[split] = {"images": len(images), "captions": len(captions), "shards": len(splits[split])}
    cap.write_json(out_dir / "vocab.json", vocab)
    params = {
        "recipe": "mmvae.data.recipes.shapes", "seed": seed, "simple": simple, "train_scenes": train_scenes,
        "test_scenes": test_scenes, "captions_per_image": cap.CAPTIONS_PER_IMAGE,
        "classes": list(SHAPES), "colours": list(COLOURS), "sizes_attr": list(SIZES),
        "image": {"size": [3, SIZE, SIZE], "jpeg_quality": cap.JPEG_QUALITY},
        "tokenizer": cap.TOKENIZER, "min_count": vocab["min_count"], "max_len": vocab["max_len"],
        "vocab_size": len(vocab["itos"]),
        "features": ({"arch": "fixed random ReLU projection of the 2x2-pooled image (stand-in for ResNet-101)",
                      "projection_seed": FEATURE_SEED, "dim": 2048} if features else None),
        "shard_size_mb": shard_size_mb, "min_shards": min_shards, "sizes": sizes,
        "versions": library_versions("numpy", "pillow", "nltk"),
    }
    keys = cap.CAPTION_KEYS + (["feature.npy"] if features else [])
    name = "shapes" + ("_simple" if simple else "") + ("_ft" if features else "")
    return write_manifest(out_dir, name, params, splits,
                          ["vocab.json", "unique_train.npz", "unique_test.npz"], sample_keys=keys)
