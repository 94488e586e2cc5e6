"""Class-matched pairing of two unimodal datasets (the MMVAE MNIST-SVHN recipe, seeded).

The paper code pairs MNIST and SVHN by class without a seed and with ``dm`` hard-coded
(REFERENCE.md §4, §9.2). Here the pairing is a pure function of the labels, ``pairs_per_instance``
(dm), ``max_per_class`` and ``seed``, so the same call always gives the same pairs and the
indices (not materialised pairs) can be stored with their settings.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SeedLike = int | Sequence[int] | np.random.SeedSequence


def _class_lists(labels_a: np.ndarray, labels_b: np.ndarray, c: int, max_per_class: int | None):
    """Index lists of class ``c`` in both datasets, in ascending (sorted) order, truncated to a
    common length n = min(|I_a|, |I_b|, max_per_class): the surplus of the larger set is unused."""
    idx_a = np.flatnonzero(labels_a == c)
    idx_b = np.flatnonzero(labels_b == c)
    n = min(len(idx_a), len(idx_b))
    if max_per_class is not None:
        n = min(n, max_per_class)
    return idx_a[:n], idx_b[:n]


def expected_num_pairs(labels_a, labels_b, *, pairs_per_instance: int,
                       max_per_class: int | None = None) -> int:
    """Number of pairs ``pair_by_class`` returns: sum over classes of dm * min(n_a, n_b, max)."""
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    classes = np.union1d(labels_a, labels_b)
    return int(sum(pairs_per_instance * len(_class_lists(labels_a, labels_b, c, max_per_class)[0])
                   for c in classes))


def pair_by_class(labels_a, labels_b, *, pairs_per_instance: int = 20, seed: SeedLike = 0,
                  max_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pair items of dataset A with items of dataset B of the same class.

    For each class c (ascending): take the ascending index lists I_a, I_b of class c, truncate
    both to n = min(|I_a|, |I_b|, max_per_class), then ``pairs_per_instance`` times append an
    independent permutation of I_a to ``idx_a`` and one of I_b to ``idx_b``. Every kept item
    therefore appears exactly ``pairs_per_instance`` times on each side, paired with a random
    item of its class each time.

    Args:
        labels_a, labels_b: 1-D integer class labels of the two datasets.
        pairs_per_instance: dm, how often each kept item is used (paper: 20; its code: 30).
        seed: anything ``numpy.random.default_rng`` accepts (int, list of ints, SeedSequence).
        max_per_class: optional cap on n per class (the paper code uses 10,000).

    Returns:
        (idx_a, idx_b): int64 arrays of equal length ``expected_num_pairs(...)``; pair i is
        (A[idx_a[i]], B[idx_b[i]]) and ``labels_a[idx_a] == labels_b[idx_b]``. Pairs come
        grouped by class: shuffle them before writing shards.
    """
    if pairs_per_instance < 1:
        raise ValueError(f"pairs_per_instance must be >= 1, got {pairs_per_instance}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    if labels_a.ndim != 1 or labels_b.ndim != 1:
        raise ValueError("labels_a and labels_b must be 1-D label arrays")
    rng = np.random.default_rng(seed)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    for c in np.union1d(labels_a, labels_b):
        idx_a, idx_b = _class_lists(labels_a, labels_b, c, max_per_class)
        for _ in range(pairs_per_instance):
            out_a.append(rng.permutation(idx_a))
            out_b.append(rng.permutation(idx_b))
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_a).astype(np.int64), np.concatenate(out_b).astype(np.int64)
