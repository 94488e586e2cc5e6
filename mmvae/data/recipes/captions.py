"""Captions: tokenisation, the vocabulary (``vocab.json``) and image-caption shards, shared by
the CUB recipe and the built-in ``shapes`` dataset (REFERENCE.md §4, "Sentences").

* Tokens: nltk's ``word_tokenize(s, preserve_line=True)`` tokenizer (``NLTKWordTokenizer``),
  which needs no downloaded data. One caption per line; a line is never split into several
  captions, but sentence ends inside a line (``"... belly. it has ..."``) are cut by an
  untrained Punkt model first, so that ``belly .`` is tokenised as the paper's
  ``sent_tokenize`` + ``word_tokenize`` did. No lower-casing (CUB captions already are).
* Vocabulary, from the train captions only: ``<exc>`` = 0 (out of vocabulary), ``<pad>`` = 1,
  ``<eos>`` = 2, then every word whose train count is > ``min_count`` (3, the paper's
  ``min_occ``), in order of first appearance.
* Ids: the first ``max_len - 1`` (31) tokens, then ``<eos>``, padded with ``<pad>`` to
  ``max_len`` (32); unknown words -> ``<exc>``.
* Samples (one per (image, caption) pair, key = caption index i; image = i // 10):
  ``image.jpg`` (64×64 RGB), ``caption.json`` (32 ids), ``caption.txt`` (the raw caption),
  ``label.cls`` and optionally ``feature.npy`` (float32 vector).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mmvae.data.recipes.common import npy_bytes, shard_limits
from mmvae.data.writer import write_shards

SPECIALS = {"<exc>": 0, "<pad>": 1, "<eos>": 2}
EXC, PAD, EOS = 0, 1, 2
MIN_COUNT = 3
MAX_LEN = 32
CAPTIONS_PER_IMAGE = 10
IMAGE_SIZE = 64
JPEG_QUALITY = 95
TOKENIZER = ("nltk NLTKWordTokenizer (word_tokenize, preserve_line=True) per caption line; sentence "
             "ends inside a line split first by an untrained PunktSentenceTokenizer; no lower-casing")
CAPTION_KEYS = ["image.jpg", "caption.json", "caption.txt", "label.cls"]
# A sentence end followed by more text inside one line: only then is Punkt needed (2.5× slower).
_INNER_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+\S")


@lru_cache(maxsize=1)
def _tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return NLTKWordTokenizer(), PunktSentenceTokenizer()


@lru_cache(maxsize=1 << 16)
def tokenize(caption: str) -> tuple[str, ...]:
    """One caption line -> word tokens (punctuation kept, case kept); cached, as generated
    captions repeat."""
    words, sentences = _tokenizers()
    caption = caption.strip()
    parts = sentences.tokenize(caption) if _INNER_SENTENCE_END.search(caption) else [caption]
    return tuple(token for part in parts for token in words.tokenize(part))


def build_vocab(token_lists: Iterable[Sequence[str]], *, min_count: int = MIN_COUNT,
                max_len: int = MAX_LEN) -> dict:
    """The ``vocab.json`` content from the (train) tokenised captions.

    ``counts`` holds the train count of every kept word, ``total_tokens`` the number of train
    word tokens (before truncation, without ``<eos>``/``<pad>``) and ``excluded_count`` how many
    of them are out of vocabulary (map to ``<exc>``): what SIF weights a / (a + p(w)) need.
    """
    counts: Counter = Counter()
    for tokens in token_lists:
        counts.update(tokens)           # Counter keeps first-appearance order
    words = [w for w, n in counts.items() if n > min_count and w not in SPECIALS]
    total = sum(counts.values())
    return {
        "itos": list(SPECIALS) + words,
        "specials": dict(SPECIALS),
        "min_count": min_count,
        "min_count_rule": "a word is kept when its train count is > min_count (the paper's min_occ)",
        "max_len": max_len,
        "counts": {w: counts[w] for w in words},
        "total_tokens": total,
        "excluded_count": total - sum(counts[w] for w in words),
    }


def encode(tokens: Sequence[str], stoi: dict, max_len: int = MAX_LEN) -> list[int]:
    """Tokens -> ``max_len`` ids: the first ``max_len - 1`` tokens, ``<eos>``, ``<pad>``s."""
    ids = [stoi.get(token, EXC) for token in tokens[: max_len - 1]] + [EOS]
    return ids + [PAD] * (max_len - len(ids))


def encode_all(captions: Sequence[str], vocab: dict) -> np.ndarray:
    """(N, max_len) int64 ids of every caption."""
    stoi = {w: i for i, w in enumerate(vocab["itos"])}
    ids = np.empty((len(captions), vocab["max_len"]), np.int64)
    for i, caption in enumerate(captions):
        ids[i] = encode(tokenize(caption), stoi, vocab["max_len"])
    return ids


def decode(ids: Iterable[int], itos: Sequence[str]) -> str:
    """Ids -> text up to (not including) the first ``<eos>``."""
    words = []
    for i in ids:
        if int(i) == EOS:
            break
        words.append(itos[int(i)])
    return " ".join(words)


def write_json(path, obj) -> None:
    """Atomic, deterministic JSON (the manifest records its sha256)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def encode_jpeg(image, quality: int = JPEG_QUALITY) -> bytes:
    """A PIL RGB image -> JPEG bytes (4:4:4 chroma: at 64×64, 4:2:0 visibly blurs colours)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _caption_samples(order, images_jpg, labels, captions, ids, features):
    feature_bytes = [None] * len(images_jpg)
    for i in order:
        image = int(i) // CAPTIONS_PER_IMAGE
        sample = {"__key__": f"{i:08d}", "image.jpg": images_jpg[image],
                  "caption.json": json.dumps(ids[i].tolist(), separators=(",", ":")),
                  "caption.txt": captions[i], "label.cls": int(labels[image])}
        if features is not None:
            if feature_bytes[image] is None:  # serialise each image's feature once
                feature_bytes[image] = npy_bytes(features[image].astype(np.float32))
            sample["feature.npy"] = feature_bytes[image]
        yield sample


def write_caption_shards(out_dir, split: str, *, images_jpg: Sequence[bytes], labels, captions: Sequence[str],
                         ids: np.ndarray, features: np.ndarray | None, seed: int, shard_size_mb: float,
                         min_shards: int, progress: bool) -> list[dict]:
    """One split's image-caption samples, in a seeded random order (shards then mix classes);
    caption i belongs to image i // 10 and is written under key ``f"{i:08d}"``."""
    if len(captions) != CAPTIONS_PER_IMAGE * len(images_jpg) or len(ids) != len(captions):
        raise ValueError(f"{split}: {len(captions)} captions / {len(ids)} ids for {len(images_jpg)} images "
                         f"(need {CAPTIONS_PER_IMAGE} per image)")
    order = np.random.default_rng([seed, 5, {"train": 0, "test": 1}.get(split, 2)]).permutation(len(captions))
    samples = _caption_samples(order, images_jpg, labels, captions, ids, features)
    return write_shards(samples, out_dir, split, total=len(order), progress=progress,
                        **shard_limits(len(order), shard_size_mb, min_shards))
