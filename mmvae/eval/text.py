"""Caption vectors of the CUB CCA coherence (REFERENCE.md §6, ``analyse_cub``): FastText word
vectors, SIF weights and first-principal-component removal (Arora et al. 2017).

For a caption of token ids t_1..t_32 (``<exc>`` = 0, ``<pad>`` = 1, ``<eos>`` = 2 in the
shards' ``vocab.json``), truncated after its first ``<eos>`` to length L (32 if none):

    s = (1/L) sum_{i<=L} w(t_i) e(t_i)                      (sentence_vectors)
    w(t) = a / (a + p(t)),  p(t) = count(t) / total_tokens,  a = 1e-3      (sif_weights)

with ``w(<exc>)`` from the train count of the excluded (out-of-vocabulary) words and
``w(<pad>) = w(<eos>) = 0``; e(t) is the FastText vector of word t, and the specials have fixed
rows ``e(<exc>) = -1``, ``e(<pad>) = 0``, ``e(<eos>) = +1`` (all 300 components). Finally the
first principal direction v of the *centred train* sentence matrix is removed from every
sentence vector: s <- s - v v^T s (``remove_component``).

FastText (gensim 4: ``vector_size=300, window=3, min_count=3``, CBOW, 10 epochs) is trained on
the train captions as token lists rebuilt from their ids (``corpus_from_ids``): in-vocabulary
words as they are and every excluded word as the token ``<exc>``. The paper trained on the raw
tokens, so its rare words (count <= 3, ~1% of tokens) had their own n-gram-based vectors that
never reached a sentence vector anyway (they map to ``<exc>`` = -1 in the table); only the
contexts of their neighbours differ. One worker thread and a seed make the vectors
reproducible (tested across Python hash seeds).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

EXC, PAD, EOS = "<exc>", "<pad>", "<eos>"
SIF_A = 1e-3
# gensim 4 FastText settings of the paper (others: gensim defaults, CBOW, n-grams 3-6); bucket is
# gensim's default n-gram table size, written out so that tests can shrink it.
FASTTEXT = {"vector_size": 300, "window": 3, "min_count": 3, "epochs": 10, "bucket": 2_000_000}


def load_vocab(path) -> dict:
    """``vocab.json`` of caption shards: {"itos", "counts", "total_tokens", "excluded_count",
    ...}; raises ValueError when the specials are missing."""
    vocab = json.loads(Path(path).read_text())
    missing = [k for k in ("itos", "counts", "total_tokens", "excluded_count") if k not in vocab]
    if missing:
        raise ValueError(f"{path}: vocab.json lacks {', '.join(missing)}")
    absent = [t for t in (EXC, PAD, EOS) if t not in vocab["itos"]]
    if absent:
        raise ValueError(f"{path}: itos lacks the special tokens {', '.join(absent)}")
    return vocab


def special_ids(itos: Sequence[str]) -> tuple[int, int, int]:
    """(<exc>, <pad>, <eos>) ids."""
    index = {t: i for i, t in enumerate(itos)}
    return index[EXC], index[PAD], index[EOS]


def truncation_mask(ids: np.ndarray, eos: int) -> np.ndarray:
    """(N, L) bool: positions up to and including each row's first <eos> (all L if none)."""
    ids = np.asarray(ids)
    is_eos = ids == eos
    first = np.where(is_eos.any(1), is_eos.argmax(1), ids.shape[1] - 1)  # (N,)
    return np.arange(ids.shape[1])[None, :] <= first[:, None]


def corpus_from_ids(ids: np.ndarray, itos: Sequence[str]) -> list[list[str]]:
    """Token lists of captions (N, L) for FastText: the words before the first <eos>, excluded
    words as ``<exc>``, no <pad>/<eos>."""
    _, pad, eos = special_ids(itos)
    mask = truncation_mask(ids, eos) & (ids != eos) & (ids != pad)
    return [[itos[t] for t in row[keep]] for row, keep in zip(np.asarray(ids), mask)]


def train_fasttext(corpus: Sequence[Sequence[str]], *, seed: int = 0, **overrides):
    """gensim 4 FastText on token lists, one worker (deterministic for a seed); settings
    ``FASTTEXT`` unless overridden."""
    from gensim.models import FastText

    settings = {**FASTTEXT, **overrides}
    epochs = settings.pop("epochs")
    model = FastText(**settings, workers=1, seed=seed)
    model.build_vocab(corpus_iterable=corpus)
    model.train(corpus_iterable=corpus, total_examples=len(corpus), epochs=epochs)
    return model


def embedding_table(word_vectors, itos: Sequence[str]) -> np.ndarray:
    """(V, dim) float32: FastText vectors in vocabulary order; rows <exc> = -1, <pad> = 0,
    <eos> = +1. ``word_vectors``: gensim KeyedVectors (``wv``) or a word -> vector mapping."""
    exc, pad, eos = special_ids(itos)
    dim = len(word_vectors[next(w for w in itos if w not in (EXC, PAD, EOS))])
    table = np.empty((len(itos), dim), dtype=np.float32)
    for i, word in enumerate(itos):
        if i not in (exc, pad, eos):
            table[i] = word_vectors[word]
    table[exc], table[pad], table[eos] = -1.0, 0.0, 1.0
    return table


def sif_weights(vocab: dict, a: float = SIF_A) -> np.ndarray:
    """(V,) float64 SIF weights a / (a + count / total_tokens) in vocabulary order; <exc> from
    the excluded words' count, <pad> and <eos> 0."""
    itos, counts, total = vocab["itos"], vocab["counts"], float(vocab["total_tokens"])
    exc, pad, eos = special_ids(itos)
    freq = np.array([counts.get(w, 0) for w in itos], dtype=np.float64) / total
    freq[exc] = vocab["excluded_count"] / total
    weights = a / (a + freq)
    weights[[pad, eos]] = 0.0
    return weights


def sentence_vectors(ids, table: np.ndarray, weights: np.ndarray, eos: int) -> np.ndarray:
    """(N, dim) float64 weighted averages over each caption up to its first <eos> (inclusive).

    ids: (N, L) token ids (ints, or anything ``np.asarray`` turns into them)."""
    ids = np.asarray(ids, dtype=np.int64)
    mask = truncation_mask(ids, eos)                                       # (N, L)
    w = np.where(mask, weights[ids], 0.0)                                  # (N, L)
    total = np.einsum("nl,nld->nd", w, table[ids].astype(np.float64))     # (N, dim)
    return total / mask.sum(1, keepdims=True)


def first_component(sentences: np.ndarray) -> np.ndarray:
    """(dim,) unit top right singular vector of the centred matrix (N, dim)."""
    centred = sentences - sentences.mean(0)
    return np.linalg.svd(centred, full_matrices=False)[2][0]


def component_from_moments(n: int, total: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """`first_component` from streamed moments: sum_n s_n (dim,) and sum_n s_n s_n^T (dim, dim)
    -- the top eigenvector of the scatter matrix of the centred rows."""
    scatter = outer - np.outer(total, total) / n
    return np.linalg.eigh(scatter)[1][:, -1]


def remove_component(sentences: np.ndarray, v: np.ndarray) -> np.ndarray:
    """s <- s - v v^T s for every row (v a unit vector)."""
    return sentences - np.outer(sentences @ v, v)

