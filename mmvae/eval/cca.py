"""CUB CCA coherence (REFERENCE.md §6, ``analyse_cub``): how well image features and captions of
a feature-caption model (cubISft, shapes-features) correspond, measured in a CCA space fitted on
the train pairs.

**CCA.** Views X (image features, N x 2048) and Y (sentence vectors, N x 300) of the train pairs
(each image's feature once per caption). With covariances C_xx, C_yy, C_xy (1/(N-1), +1e-12 on
the diagonals) the paper solves the generalised eigenproblem

    [[0, C_xy], [C_yx, 0]] w = rho [[C_xx, 0], [0, C_yy]] w,    w = [a; b]

and keeps the top k = 40 eigenvectors (``cca_eig``). Here the same vectors come from whitening
and an SVD (``cca_whiten``, symmetric and well conditioned): T = C_xx^-1/2 C_xy C_yy^-1/2 =
U S V^T, a_i = C_xx^-1/2 u_i, b_i = C_yy^-1/2 v_i, rho_i = s_i. Each [a_i; b_i] is then scaled to
unit Euclidean norm as ``scipy.linalg.eig`` returns it: the scale weights canonical dimension i
in the cosine below, so it is kept for parity (tests check both routes agree).

**Score.** For a pair (f, s): cos((f - mu_f) W_img, (s - mu_s) W_emb), averaged over pairs
(``CaptionCCA.correlation``); mu are the train means (s after the principal-component removal of
``mmvae.eval.text``). The paper's four numbers:

* ``ground_truth``: test pairs (f, s);
* ``cross_feature_to_caption``: (f, caption decoded (argmax) from z ~ q_feature(z | f));
* ``cross_caption_to_feature``: (feature decoded (mean) from z ~ q_caption(z | s), s);
* ``joint``: decoded feature and caption of the same z ~ p(z) (1,000 samples).

The paper averages over full test batches of 256 (the partial last batch dropped); here every
test pair counts once. Paper (CUB, cubISft): joint 0.263.

**Artifacts** (``<shards>/cca/`` by default; fitted once, then loaded, so every run on the same
shards is scored in the same space): ``cca.npz`` (embedding table, SIF weights, principal
direction, W_img, W_emb, the means, canonical correlations), ``word_vectors.kv`` (the FastText
vectors of the vocabulary, gensim KeyedVectors) and ``info.json`` (settings, seed, sizes, the
sha256 of vocab.json). The full FastText model is not kept: its 2M-bucket n-gram table is
2.4 GB and only the vocabulary's vectors are ever used. Fitting streams the train shards twice
(captions for FastText, then features and captions into running moments), so memory stays at
a few (2048 x 2048) matrices however many pairs there are.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from mmvae.data.writer import sha256_file
from mmvae.eval import decode_mean, eval_mode, posterior_sample, text
from mmvae.eval.distributed import batch_generator, capped_batches, sum_in_order
from mmvae.ranks import SINGLE, Ranks

CCA_K = 40
RIDGE = 1e-12
ARTIFACT_SEED = 0  # the CCA space belongs to the shards, not to a run: one fixed seed
ARTIFACT_VERSION = 1
MODALITIES = ("feature", "caption")
STREAM = 7  # random streams of the CCA metric (distinct from the other metrics' stream 0)


# --- CCA ---------------------------------------------------------------------------------------

class Moments:
    """Running sums of two paired views in float64 (sum x, sum y, sum x x^T, sum y y^T,
    sum x y^T) -- enough for means and covariances without keeping the rows."""

    def __init__(self, dim_x: int, dim_y: int):
        self.n = 0
        self.sx, self.sy = np.zeros(dim_x), np.zeros(dim_y)
        self.sxx, self.syy = np.zeros((dim_x, dim_x)), np.zeros((dim_y, dim_y))
        self.sxy = np.zeros((dim_x, dim_y))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)  # (B, dx), (B, dy)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.sxy += x.T @ y

    def map_y(self, matrix: np.ndarray) -> "Moments":
        """The moments of the pairs (x, y M^T) for a linear map M of the second view."""
        out = Moments(len(self.sx), matrix.shape[0])
        out.n, out.sx, out.sxx = self.n, self.sx, self.sxx
        out.sy, out.syy, out.sxy = matrix @ self.sy, matrix @ self.syy @ matrix.T, self.sxy @ matrix.T
        return out

    def covariances(self) -> tuple[np.ndarray, ...]:
        """(mean_x, mean_y, C_xx, C_yy, C_xy) with the unbiased 1/(N-1)."""
        if self.n < 2:
            raise ValueError(f"CCA needs at least 2 pairs, got {self.n}")
        mx, my = self.sx / self.n, self.sy / self.n
        scale = 1.0 / (self.n - 1)
        cxx = (self.sxx - self.n * np.outer(mx, mx)) * scale
        cyy = (self.syy - self.n * np.outer(my, my)) * scale
        cxy = (self.sxy - self.n * np.outer(mx, my)) * scale
        return mx, my, cxx, cyy, cxy


def _inv_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    values = np.maximum(values, RIDGE)  # the ridge already lifts them; guard against rounding
    return (vectors / np.sqrt(values)) @ vectors.T


def _paper_scale(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each column pair [a_i; b_i] to unit norm and fix its sign (largest entry > 0)."""
    stacked = np.concatenate([a, b])                                        # (dx + dy, k)
    stacked = stacked / np.linalg.norm(stacked, axis=0)
    peak = stacked[np.abs(stacked).argmax(0), np.arange(stacked.shape[1])]
    stacked = stacked * np.sign(peak)
    return stacked[: a.shape[0]], stacked[a.shape[0]:]


def cca_whiten(cxx, cyy, cxy, k: int = CCA_K, ridge: float = RIDGE):
    """Top-k canonical directions by whitening + SVD: (W_x (dx, k), W_y (dy, k), rho (k,)),
    scaled like ``cca_eig``."""
    k = _check_k(k, cxx, cyy)
    wx = _inv_sqrt(cxx + ridge * np.eye(len(cxx)))
    wy = _inv_sqrt(cyy + ridge * np.eye(len(cyy)))
    u, s, vt = np.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    a, b = _paper_scale(wx @ u[:, :k], wy @ vt[:k].T)
    return a, b, s[:k]


def cca_eig(cxx, cyy, cxy, k: int = CCA_K, ridge: float = RIDGE):
    """The paper's formulation: ``scipy.linalg.eig(A, B)``, top-k eigenvalues (the reference
    that ``cca_whiten`` is tested against; O((dx + dy)^3) on a non-symmetric problem)."""
    import scipy.linalg

    k = _check_k(k, cxx, cyy)
    dx, dy = len(cxx), len(cyy)
    zeros_x, zeros_y = np.zeros((dx, dx)), np.zeros((dy, dy))
    A = np.block([[zeros_x, cxy], [cxy.T, zeros_y]])
    B = np.block([[cxx + ridge * np.eye(dx), np.zeros((dx, dy))],
                  [np.zeros((dy, dx)), cyy + ridge * np.eye(dy)]])
    values, vectors = scipy.linalg.eig(A, B)
    top = np.argsort(-values.real)[:k]
    a, b = _paper_scale(vectors[:dx, top].real, vectors[dx:, top].real)
    return a, b, values[top].real


def _check_k(k, cxx, cyy) -> int:
    if not 1 <= k <= min(len(cxx), len(cyy)):
        raise ValueError(f"CCA k must be in 1..{min(len(cxx), len(cyy))}, got {k}")
    return k


def cosine_rows(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) cosine of matching rows (0 where a row is zero)."""
    norms = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    return np.divide((u * v).sum(1), norms, out=np.zeros(len(u)), where=norms > 0)


# --- the caption CCA space ---------------------------------------------------------------------

@dataclass
class CaptionCCA:
    """Everything that scores (feature, caption) pairs: sentence vectors and the CCA space."""

    table: np.ndarray      # (V, 300) word vectors, special rows fixed
    weights: np.ndarray    # (V,) SIF weights
    component: np.ndarray  # (300,) principal direction removed from every sentence vector
    eos: int
    w_img: np.ndarray      # (2048, k)
    w_emb: np.ndarray      # (300, k)
    mean_img: np.ndarray   # (2048,)
    mean_emb: np.ndarray   # (300,) train mean of the sentence vectors (component removed)
    correlations: np.ndarray  # (k,) canonical correlations on the train pairs

    def sentences(self, ids) -> np.ndarray:
        """(N, 300) sentence vectors of captions (N, L) of token ids."""
        raw = text.sentence_vectors(ids, self.table, self.weights, self.eos)
        return text.remove_component(raw, self.component)

    def correlation(self, features, ids) -> np.ndarray:
        """(N,) CCA-space cosine of each (feature (2048,), caption (L,)) pair."""
        features = np.asarray(features, np.float64)
        proj_img = (features - self.mean_img) @ self.w_img
        proj_emb = (self.sentences(ids) - self.mean_emb) @ self.w_emb
        return cosine_rows(proj_img, proj_emb)

    def save(self, folder, info: dict, word_vectors=None) -> None:
        """Write cca.npz, info.json (and word_vectors.kv) into `folder`, each via a temp file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in self.__dataclass_fields__}
        _atomic(folder / "cca.npz", lambda p: np.savez(p, **arrays), suffix=".npz")
        if word_vectors is not None:
            _atomic(folder / "word_vectors.kv", lambda p: word_vectors.save(str(p)))
        _atomic(folder / "info.json", lambda p: p.write_text(json.dumps(info, indent=2) + "\n"))

    @classmethod
    def load(cls, folder) -> "CaptionCCA":
        with np.load(Path(folder) / "cca.npz") as data:
            fields = {name: data[name] for name in cls.__dataclass_fields__}
        fields["eos"] = int(fields["eos"])
        return cls(**fields)


def _atomic(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    write(tmp)
    os.replace(tmp, path)


def fit_caption_cca(train_pairs: Callable[[], Iterable[tuple]], vocab: dict, *,
                    k: int = CCA_K, seed: int = ARTIFACT_SEED, fasttext: dict | None = None,
                    log: Callable[[str], None] = lambda msg: None):
    """Fit the sentence vectors and the CCA space on train pairs.

    train_pairs: a callable returning a fresh iterable of (features (B, 2048), caption ids
    (B, L)) batches (arrays or tensors); it is read twice. fasttext: FastText setting overrides
    (tests). Returns (CaptionCCA, FastText model, info dict).
    """
    itos = vocab["itos"]
    start = time.perf_counter()
    corpus = [tokens for _, ids in train_pairs() for tokens in text.corpus_from_ids(_ids(ids), itos)]
    model = text.train_fasttext(corpus, seed=seed, **(fasttext or {}))
    table, weights = text.embedding_table(model.wv, itos), text.sif_weights(vocab)
    eos = text.special_ids(itos)[2]
    log(f"FastText on {len(corpus)} train captions: {time.perf_counter() - start:.1f} s")
    moments = None
    for features, ids in train_pairs():  # second pass: running moments of (feature, raw s)
        feats = np.asarray(_numpy(features), np.float64)
        sents = text.sentence_vectors(_ids(ids), table, weights, eos)
        moments = moments or Moments(feats.shape[1], sents.shape[1])
        moments.update(feats, sents)
    if moments is None:
        raise ValueError("fit_caption_cca got no train pairs")
    dims = len(moments.sx) + len(moments.sy)
    if moments.n < 2 * dims:  # e.g. 600 pairs of 2048-d features: every correlation ~1
        warnings.warn(f"CCA on {moments.n} train pairs of {dims} dimensions overfits (a space "
                      f"where train pairs correlate perfectly and test pairs hardly at all); "
                      f"the scores need many more pairs than dimensions", stacklevel=2)
    component = text.component_from_moments(moments.n, moments.sy, moments.syy)
    removal = np.eye(len(component)) - np.outer(component, component)  # s <- (I - v v^T) s
    mean_img, mean_emb, cxx, cyy, cxy = moments.map_y(removal).covariances()
    w_img, w_emb, rho = cca_whiten(cxx, cyy, cxy, k)
    cca = CaptionCCA(table, weights, component, eos, w_img, w_emb, mean_img, mean_emb, rho)
    info = {"version": ARTIFACT_VERSION, "k": k, "seed": seed, "num_train_pairs": moments.n,
            "num_train_captions": len(corpus), "fasttext": {**text.FASTTEXT, **(fasttext or {})},
            "sif_a": text.SIF_A, "ridge": RIDGE, "vocab_size": len(itos),
            "top_correlations": [round(float(r), 4) for r in rho[:5]],
            "seconds": round(time.perf_counter() - start, 1)}
    log(f"CCA (k={k}) on {moments.n} train pairs: top correlations {info['top_correlations']}")
    return cca, model, info


def vocabulary_vectors(model, itos):
    """gensim KeyedVectors holding only the vocabulary's words (small, unlike the n-gram table)."""
    from gensim.models import KeyedVectors

    words = [w for w in itos if w not in (text.EXC, text.PAD, text.EOS)]
    kv = KeyedVectors(vector_size=model.wv.vector_size)
    kv.add_vectors(words, np.stack([model.wv[w] for w in words]))
    return kv


def load_or_fit(folder, vocab_path, train_pairs: Callable[[], Iterable[tuple]], *,
                k: int = CCA_K, reset: bool = False, fasttext: dict | None = None,
                log: Callable[[str], None] = lambda msg: None) -> tuple[CaptionCCA, dict]:
    """The artifacts in `folder` if they exist and match (k, vocab.json), else fit and save
    them. `reset` refits. Returns (CaptionCCA, info). Raises ValueError when existing artifacts
    were fitted with another k or vocabulary (pass reset, or another folder)."""
    folder, vocab_sha = Path(folder), sha256_file(vocab_path)
    if not reset and (folder / "cca.npz").is_file() and (folder / "info.json").is_file():
        info = json.loads((folder / "info.json").read_text())
        if info.get("k") != k or info.get("vocab_sha256") != vocab_sha:
            raise ValueError(f"CCA artifacts in {folder} were fitted with k={info.get('k')} on "
                             f"another vocab.json or k than now (k={k}); set eval.cca_reset=true "
                             f"to refit them, or eval.cca_dir to keep both")
        return CaptionCCA.load(folder), {**info, "loaded": True, "dir": str(folder)}
    vocab = text.load_vocab(vocab_path)
    cca, model, info = fit_caption_cca(train_pairs, vocab, k=k, fasttext=fasttext, log=log)
    info["vocab_sha256"] = vocab_sha
    cca.save(folder, info, vocabulary_vectors(model, vocab["itos"]))
    return cca, {**info, "loaded": False, "dir": str(folder)}


# --- scoring a model -----------------------------------------------------------------------------

def _numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _ids(x) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.int64) if torch.is_tensor(x) else np.asarray(x, np.int64)


def token_ids(decoded: torch.Tensor) -> np.ndarray:
    """Caption ids (N, L) from a caption decoder's output: logits (N, L, V) -> argmax, or ids."""
    if decoded.is_floating_point() and decoded.dim() == 3:
        decoded = decoded.argmax(-1)
    return _ids(decoded)


def _experts(model) -> tuple[int, int]:
    """Indices of the feature and caption experts; ValueError if the model lacks one."""
    names = list(model.modalities)
    missing = [m for m in MODALITIES if m not in names]
    if missing:
        raise ValueError(f"CCA coherence needs modalities {' and '.join(MODALITIES)}; "
                         f"the model has {', '.join(names)}")
    return names.index("feature"), names.index("caption")


def cca_coherence(model, batches: Iterable, cca: CaptionCCA, *, seed: int = 0,
                  max_datapoints: int | None = None, ranks: Ranks = SINGLE) -> dict:
    """Ground-truth and cross CCA correlations over paired test batches.

    batches: (xs, labels) with xs one tensor per modality in model.modalities order (features
    (B, 2048), caption ids (B, L)); labels are ignored. Batch i draws z from a generator seeded
    with (seed, i) and is scored by rank i % world. Returns ``{"values": {"ground_truth",
    "cross_feature_to_caption", "cross_caption_to_feature"}, "num_pairs", "seed"}``.
    """
    f, c = _experts(model)
    experts, device = model.experts, model.prior_params()[0].device
    rows: dict[int, dict[str, float]] = {}
    n = 0
    with eval_mode(model):
        for index, xs in capped_batches((xs for xs, _ in batches), max_datapoints):
            if ranks.owns(index):
                generator = batch_generator(seed, index, device, stream=STREAM)
                feats, caps = xs[f].to(device), xs[c].to(device)
                z_feat = posterior_sample(experts[f], feats, generator)
                z_cap = posterior_sample(experts[c], caps, generator)
                captions = token_ids(decode_mean(experts[c], z_feat))
                features = _numpy(decode_mean(experts[f], z_cap))
                rows[index] = {
                    "ground_truth": cca.correlation(_numpy(feats), _ids(caps)).sum(),
                    "cross_feature_to_caption": cca.correlation(_numpy(feats), captions).sum(),
                    "cross_caption_to_feature": cca.correlation(features, _ids(caps)).sum()}
            n += xs[0].shape[0]
    if n == 0:
        raise ValueError("cca_coherence got no datapoints")
    sums = sum_in_order(ranks.gather_by_index(rows))
    return {"values": {key: float(s) / n for key, s in sums.items()}, "num_pairs": n, "seed": seed}


def cca_joint(model, cca: CaptionCCA, *, num_samples: int = 1000, batch_size: int = 250,
              seed: int = 0, ranks: Ranks = SINGLE) -> dict:
    """Mean CCA correlation of the decoded feature and caption of the same z ~ p(z). Chunk i
    is drawn with a generator seeded with (seed, i) and scored by rank i % world."""
    f, c = _experts(model)
    device = model.prior_params()[0].device
    rows: dict[int, dict[str, float]] = {}
    with eval_mode(model):
        for index, start in ranks.mine(range(0, num_samples, batch_size)):
            generator = batch_generator(seed, index, device, stream=STREAM + 1)
            means = model.generate(min(batch_size, num_samples - start), generator)
            rows[index] = {"joint": cca.correlation(_numpy(means[f]), token_ids(means[c])).sum()}
    total = sum_in_order(ranks.gather_by_index(rows))["joint"]
    return {"values": {"joint": float(total) / num_samples}, "num_samples": num_samples,
            "seed": seed}
