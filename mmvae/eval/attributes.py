"""Attribute coherence of image–caption models on the built-in ``shapes`` datasets.

The shapes scenes are generated from known attributes (``mmvae.data.recipes.shapes``), so
whether a cross-generation is right can be read off directly, as the digit coherence does for
MNIST-SVHN (REFERENCE.md §6), instead of through the CUB CCA proxy:

* a generated **caption** names colour c if c (or a synonym) is the first colour word of its
  argmax decoding up to ``<eos>``, and shape s likewise (`caption_attributes`);
* a generated **image** shows the colour / shape that two classifiers trained on the unique
  train images (the paper's digit-classifier net, labels ``colour`` and ``shape`` of
  ``unique_train.npz``) predict.

Scores, each a fraction (chance: 1/7 for colour, 1/6 for shape, 1/42 for both):

* ``cross_image_to_caption_{colour,shape,both}``: z ~ q(z | image) of a test scene, decode the
  caption, compare with the scene's attributes;
* ``cross_caption_to_image_{...}``: z ~ q(z | caption), decode the image, classify it;
* ``self_image_*`` / ``self_caption_*``: the same for reconstructions;
* ``joint_{colour,shape,both}``: z ~ p(z), decode both; the caption's words agree with the
  image's predicted attributes.

Test scenes: every one-object test scene of ``unique_test.npz`` (two-object scenes of
``shapes`` describe two colours) with its caption number ``j mod 10``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmvae.data.recipes.shapes import COLOUR_WORDS, COLOURS, SHAPE_WORDS, SHAPES
from mmvae.eval import decode_mean, eval_mode, posterior_sample
from mmvae.eval.cca import token_ids
from mmvae.eval.classifiers import as_float_images, predict
from mmvae.eval.distributed import batch_generator, sum_in_order
from mmvae.ranks import SINGLE, Ranks

ATTRIBUTES = ("colour", "shape")
STREAM = 7  # generator stream of this metric (others: mmvae.eval.distributed.batch_seed)
_WORD_TO = {
    "colour": {w: i for i, c in enumerate(COLOURS) for w in COLOUR_WORDS.get(c, (c,))},
    "shape": {w: i for i, s in enumerate(SHAPES) for w in SHAPE_WORDS[s]},
}


def caption_attributes(ids: np.ndarray, itos: Sequence[str], eos: int) -> dict[str, np.ndarray]:
    """{"colour", "shape"} -> (N,) index of the first colour / shape word of each caption (ids
    (N, L), read up to its first ``eos``), -1 where the caption names none."""
    out = {a: np.full(len(ids), -1, np.int64) for a in ATTRIBUTES}
    for row, caption in enumerate(np.asarray(ids)):
        for token in caption:
            if token == eos:
                break
            word = itos[token]
            for attr in ATTRIBUTES:
                if out[attr][row] < 0 and word in _WORD_TO[attr]:
                    out[attr][row] = _WORD_TO[attr][word]
    return out


def one_object_scenes(unique: dict) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(images (N, 3, 64, 64) uint8, caption ids (N, L), {"colour", "shape"} (N,)) of the
    one-object scenes of a shapes ``unique_{split}.npz`` (as a dict of arrays)."""
    scenes = np.flatnonzero(unique["num_objects"] == 1)
    per_scene = len(unique["caption"]) // len(unique["image"])
    captions = unique["caption"][scenes * per_scene + scenes % per_scene]
    return unique["image"][scenes], captions, {a: unique[a][scenes] for a in ATTRIBUTES}


def _image_attributes(classifiers: dict, images: torch.Tensor) -> dict[str, np.ndarray]:
    return {a: predict(classifiers[a], images.float()).numpy() for a in ATTRIBUTES}


def _hits(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    ok = {a: pred[a] == truth[a] for a in ATTRIBUTES}
    return {"colour": float(ok["colour"].sum()), "shape": float(ok["shape"].sum()),
            "both": float((ok["colour"] & ok["shape"]).sum())}


def attribute_coherence(model, images, captions, truth: dict[str, np.ndarray], classifiers: dict,
                        itos: Sequence[str], eos: int, *, seed: int = 0, batch_size: int = 256,
                        joint_samples: int = 1000, ranks: Ranks = SINGLE) -> dict:
    """Attribute coherence (module docstring) of an MMVAE with ``image`` and ``caption``
    experts. images (N, 3, 64, 64) uint8 or [0, 1]; captions (N, L) ids; truth: attribute ->
    (N,). classifiers: {"colour", "shape"} -> image classifier. Batch i draws its z with a
    generator seeded with (seed, i) and is scored by rank i % world. Returns ``{"values",
    "num_scenes", "joint_samples", "seed"}``."""
    names = list(model.modalities)
    if not {"image", "caption"} <= set(names):
        raise ValueError(f"attribute coherence needs image and caption experts; the model has {', '.join(names)}")
    image_expert, caption_expert = model.experts[names.index("image")], model.experts[names.index("caption")]
    device = model.prior_params()[0].device
    n = len(captions)
    rows: dict[int, dict[str, float]] = {}
    with eval_mode(model):
        for index, start in ranks.mine(range(0, n, batch_size)):
            generator = batch_generator(seed, index, device, stream=STREAM)
            x = as_float_images(images[start:start + batch_size]).to(device)
            c = torch.as_tensor(np.asarray(captions[start:start + batch_size])).long().to(device)
            t = {a: truth[a][start:start + batch_size] for a in ATTRIBUTES}
            z_img = posterior_sample(image_expert, x, generator)
            z_cap = posterior_sample(caption_expert, c, generator)

            def said(z):  # attributes named by the caption decoded from z
                return caption_attributes(token_ids(decode_mean(caption_expert, z)), itos, eos)

            def shown(z):  # attributes the classifiers see in the image decoded from z
                return _image_attributes(classifiers, decode_mean(image_expert, z).cpu())

            scores = {"cross_image_to_caption": said(z_img), "cross_caption_to_image": shown(z_cap),
                      "self_caption": said(z_cap), "self_image": shown(z_img)}
            rows[index] = {f"{key}_{k}": v for key, pred in scores.items() for k, v in _hits(pred, t).items()}
        joint_rows: dict[int, dict[str, float]] = {}
        for index, start in ranks.mine(range(0, joint_samples, batch_size)):
            generator = batch_generator(seed, index, device, stream=STREAM + 1)
            means = model.generate(min(batch_size, joint_samples - start), generator)
            said = caption_attributes(token_ids(means[names.index("caption")]), itos, eos)
            shown = _image_attributes(classifiers, means[names.index("image")].cpu())
            joint_rows[index] = {f"joint_{k}": v for k, v in _hits(said, shown).items()}
    values = {k: v / n for k, v in sum_in_order(ranks.gather_by_index(rows)).items()} if n else {}
    if joint_samples:
        values.update({k: v / joint_samples for k, v in sum_in_order(ranks.gather_by_index(joint_rows)).items()})
    return {"values": values, "num_scenes": n, "joint_samples": joint_samples, "seed": seed}
