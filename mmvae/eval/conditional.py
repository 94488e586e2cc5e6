"""Conditional coherence for any number of modalities (the MoPoE and MMVAE+ papers' metric).

For every non-empty proper subset S of the M modalities and every modality m outside it: for
a labelled test sample (x_1..x_M, y) draw one z ~ q(z | x_S) (``mmvae.eval.subsets``), decode
the mean of modality m and score 1[ argmax f_m(mean_m(z)) = y ] with m's digit classifier
f_m, averaged over the samples. The papers summarise by the number of given modalities: the
mean over every (S, m) with |S| = k (``given_k``). With M = 2 the directions are the cross
coherences (``cond_svhn_to_mnist`` = ``cross_svhn_to_mnist``, the same draws).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from mmvae.eval import eval_mode
from mmvae.eval.classifiers import predict
from mmvae.eval.distributed import batch_generator, capped_batches
from mmvae.eval.subsets import conditional_pairs, decode_target, latents_from_subset, subset_name
from mmvae.ranks import SINGLE, Ranks


COND_PREFIX = "cond_"


def pair_key(names: Sequence[str], subset: tuple[int, ...], target: int) -> str:
    """'cond_m0+m1_to_m2': the eval.json / W&B key of the direction {m0, m1} -> m2."""
    return f"{COND_PREFIX}{subset_name(names, subset)}_to_{names[target]}"


def conditional_coherence(model, batches: Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]],
                          classifiers: dict, *, seed: int = 0, max_datapoints: int | None = None,
                          ranks: Ranks = SINGLE) -> dict:
    """Coherence of every direction S -> m over labelled batches of all M modalities.

    batches: (xs, labels), xs one tensor per modality in model.modalities order.
    classifiers: modality -> module mapping images to class scores (argmax = prediction).
    Batch i draws from a generator seeded with (seed, i) (the subsets in `conditional_pairs`
    order, one z per subset and sample); with `ranks`, each process scores its share of the
    batches (``mmvae.eval.distributed``). Returns ``{"values": {"cond_<S>_to_<m>": acc, ...,
    "given_<k>": mean over |S| = k}, "by_size": {k: {"mean", "subsets": {S: mean over the
    left-out modalities}}}, "num_pairs", "seed"}``.
    """
    names, device = model.modalities, model.prior_params()[0].device
    if len(names) < 2:
        raise ValueError("conditional coherence needs a multimodal model")
    pairs = conditional_pairs(len(names))
    rows: dict[int, list] = {}
    n = 0
    with eval_mode(model):
        batches = ([labels, *xs] for xs, labels in batches)  # the count of a batch: its labels
        for index, (labels, *xs) in capped_batches(batches, max_datapoints):
            if ranks.owns(index):
                generator = batch_generator(seed, index, device)
                xs = [x.to(device) for x in xs]
                rows[index] = _correct(model, xs, labels, classifiers, pairs, generator)
            n += len(labels)
    if n == 0:
        raise ValueError("conditional_coherence got no datapoints")
    correct = torch.tensor(ranks.gather_by_index(rows)).sum(0).tolist()  # one count per pair
    scores = {pair: c / n for pair, c in zip(pairs, correct)}
    values = {pair_key(names, s, m): acc for (s, m), acc in scores.items()}
    by_size = summarise(scores, names)
    values.update({f"given_{k}": size["mean"] for k, size in by_size.items()})
    return {"values": values, "by_size": by_size, "num_pairs": n, "seed": seed}


def _correct(model, xs, labels, classifiers, pairs, generator) -> list[int]:
    """Correctly classified decodings of one batch, one count per (S, m) of `pairs`."""
    names, cache, z, current = model.modalities, {}, None, None
    counts = []
    for subset, target in pairs:
        if subset != current:  # pairs come grouped by subset: one z per subset
            z = latents_from_subset(model, xs, subset, 1, generator, cache=cache)[0]  # (B, D)
            current = subset
        mean = decode_target(model, z, target, generator).float()
        counts.append(int((predict(classifiers[names[target]], mean) == labels.cpu()).sum()))
    return counts


def summarise(scores: dict, names: Sequence[str]) -> dict[str, dict]:
    """{k: {"mean": mean over every (S, m) with |S| = k, "subsets": {S: mean over the
    modalities left out of S}}} from {(S, m): coherence}."""
    by_size: dict[int, dict] = {}
    for (subset, _), acc in scores.items():
        size = by_size.setdefault(len(subset), {"all": [], "subsets": {}})
        size["all"].append(acc)
        size["subsets"].setdefault(subset_name(names, subset), []).append(acc)
    return {str(k): {"mean": sum(s["all"]) / len(s["all"]),  # str: JSON keys
                "subsets": {name: sum(v) / len(v) for name, v in s["subsets"].items()}}
            for k, s in sorted(by_size.items())}
