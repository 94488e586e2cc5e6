"""Cross and joint coherence of a multimodal model on labelled digits (REFERENCE.md §6).

With per-modality digit classifiers f_d (``mmvae.eval.classifiers``):

* cross coherence e -> d: for a test pair (x_1..x_M, y) draw one z ~ q_e(z | x_e), decode the
  mean of modality d and score  1[ argmax f_d(mean_d(z)) = y ], averaged over pairs. The paper
  reports svhn -> mnist (classify the MNIST decoded from the SVHN encoder) and mnist -> svhn.
  The diagonal e = d ("self") is the same score for reconstructions.
* joint coherence: z_n ~ p(z), n = 1..N (paper: N = 10,000), decode every modality's mean and
  score  1[ all argmax f_d(mean_d(z_n)) agree ].

Test pairs: the paper scores all 300k *duplicated* test pairs (each image in ~30 pairs); the
default here pairs every unique test image of the smaller side once with a random unique image
of the same class (``unique_pairs``), and the result says which was used (``test_pairs``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from mmvae.data.recipes.pairing import pair_by_class
from mmvae.eval import decode_mean, eval_mode, posterior_sample
from mmvae.eval.classifiers import as_float_images, predict
from mmvae.eval.distributed import batch_generator, capped_batches
from mmvae.ranks import SINGLE, Ranks


def unique_pairs(unique: dict[str, tuple[np.ndarray, np.ndarray]], modalities: Sequence[str],
                 seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Class-matched pairs of two modalities' unique images, each image used at most once.

    unique: modality -> (images (N, C, H, W), labels (N,)). Returns ([images per modality], labels).
    """
    if len(modalities) != 2:
        raise ValueError(f"unique pairs are built for two modalities, got {list(modalities)}")
    (xa, ya), (xb, yb) = (unique[m] for m in modalities)
    ia, ib = pair_by_class(ya, yb, pairs_per_instance=1, seed=seed)
    return [xa[ia], xb[ib]], ya[ia]


def array_batches(images: Sequence, labels, batch_size: int = 256):
    """Yield ([float tensors in [0, 1] per modality], labels) batches from aligned arrays."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    for i in range(0, len(labels), batch_size):
        yield [as_float_images(x[i:i + batch_size]) for x in images], labels[i:i + batch_size]


def cross_coherence(model, batches: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]],
                    classifiers: dict, *, seed: int = 0, max_datapoints: int | None = None,
                    ranks: Ranks = SINGLE) -> dict:
    """Cross (e -> d, e != d) and self (e = d) coherence over labelled paired batches.

    batches: (xs, labels), xs one (B, C, H, W) tensor per modality in model.modalities order.
    classifiers: modality -> module mapping images to class scores (argmax = prediction).
    Batch i draws z from a generator seeded with (seed, i); with `ranks`, each process scores
    its share of the batches (``mmvae.eval.distributed``).
    Returns ``{"values": {"cross_{e}_to_{d}": acc, "self_{d}": acc}, "num_pairs", "seed"}``.
    """
    names, device = model.modalities, model.prior_params()[0].device
    rows: dict[int, list] = {}
    n = 0
    with eval_mode(model):
        # labels first: the count of a batch is its number of labels
        batches = ([labels, *xs] for xs, labels in batches)
        for index, (labels, *xs) in capped_batches(batches, max_datapoints):
            if ranks.owns(index):
                generator = batch_generator(seed, index, device)
                rows[index] = _correct(model, xs, labels, classifiers, generator).tolist()
            n += len(labels)
    if n == 0:
        raise ValueError("cross_coherence got no datapoints")
    correct = torch.tensor(ranks.gather_by_index(rows)).sum(0)  # [e, d]
    values = {}
    for e, name_e in enumerate(names):
        for d, name_d in enumerate(names):
            key = f"self_{name_d}" if e == d else f"cross_{name_e}_to_{name_d}"
            values[key] = correct[e, d].item() / n
    return {"values": values, "num_pairs": n, "seed": seed}


def _correct(model, xs, labels, classifiers, generator) -> torch.Tensor:
    """(M, M) counts of correctly classified decodings, [encoder e, decoder d]."""
    names, experts = model.modalities, model.experts
    device = model.prior_params()[0].device
    correct = torch.zeros(len(names), len(names), dtype=torch.long)
    for e, (enc, x) in enumerate(zip(experts, xs)):
        z = posterior_sample(enc, x.to(device), generator)  # (B, D): one sample per pair
        for d, dec in enumerate(experts):
            mean = decode_mean(dec, z).float()
            correct[e, d] += (predict(classifiers[names[d]], mean) == labels.cpu()).sum()
    return correct


def joint_coherence(model, classifiers: dict, *, num_samples: int = 10_000, batch_size: int = 1000,
                    seed: int = 0, ranks: Ranks = SINGLE) -> dict:
    """Fraction of prior samples whose decoded modalities all get the same predicted class.

    Chunk i of `batch_size` samples is drawn with a generator seeded with (seed, i) and scored
    by rank i % world. Returns ``{"values": {"joint": frac}, "num_samples", "seed",
    "class_counts"}`` where class_counts[m] is the histogram of modality m's predictions (a
    collapsed generator that always draws one digit scores joint coherence 1 while its
    histogram shows the collapse).
    """
    if len(model.experts) < 2:
        raise ValueError("joint coherence needs a multimodal model")
    device = model.prior_params()[0].device
    starts = range(0, num_samples, batch_size)
    rows: dict[int, list] = {}
    with eval_mode(model):
        for index, start in ranks.mine(starts):
            generator = batch_generator(seed, index, device)
            means = model.generate(min(batch_size, num_samples - start), generator)
            preds = torch.stack([predict(classifiers[m], x) for m, x in zip(model.modalities, means)])
            counts = [torch.bincount(p, minlength=10)[:10].tolist() for p in preds]  # preds: (M, n)
            rows[index] = [(preds == preds[:1]).all(0).sum().item(), counts]
    gathered = ranks.gather_by_index(rows)
    agree = sum(row[0] for row in gathered)
    counts = torch.tensor([row[1] for row in gathered]).sum(0)  # (M, 10)
    return {"values": {"joint": agree / num_samples}, "num_samples": num_samples, "seed": seed,
            "class_counts": {m: c.tolist() for m, c in zip(model.modalities, counts)}}
