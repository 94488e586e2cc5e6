"""CUB CCA coherence: the CCA itself, SIF sentence vectors, FastText determinism, artifacts,
and the scores of stand-in feature-caption models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmvae.data.writer import sha256_file
import torch
from torch import nn

import mmvae
from mmvae.dists import get_family
from mmvae.eval import cca, text
from standins import StandInModel

ROOT = Path(__file__).resolve().parents[2]
PLANTED = (0.9, 0.6, 0.3)


def correlated_views(n, dx, dy, rho=PLANTED, seed=0):
    """Views x = [u, noise] A, y = [v, noise] B with corr(u_i, v_i) = rho_i, everything else
    independent, A and B random invertible mixings: the canonical correlations are rho, 0..."""
    rng = np.random.default_rng(seed)
    k = len(rho)
    u = rng.standard_normal((n, k))
    v = np.asarray(rho) * u + np.sqrt(1 - np.square(rho)) * rng.standard_normal((n, k))
    x = np.hstack([u, rng.standard_normal((n, dx - k))]) @ rng.standard_normal((dx, dx))
    y = np.hstack([v, rng.standard_normal((n, dy - k))]) @ rng.standard_normal((dy, dy))
    return x + 3.0, y - 1.0  # non-zero means: the covariances must centre


def moments_of(x, y, batch=1000):
    moments = cca.Moments(x.shape[1], y.shape[1])
    for i in range(0, len(x), batch):
        moments.update(x[i:i + batch], y[i:i + batch])
    return moments


def test_streamed_moments_are_the_sample_covariances():
    x, y = correlated_views(2500, 6, 4)
    mx, my, cxx, cyy, cxy = moments_of(x, y, batch=700).covariances()
    full = np.cov(np.hstack([x, y]).T)  # 1/(N-1)
    np.testing.assert_allclose(cxx, full[:6, :6], atol=1e-9)
    np.testing.assert_allclose(cyy, full[6:, 6:], atol=1e-9)
    np.testing.assert_allclose(cxy, full[:6, 6:], atol=1e-9)
    np.testing.assert_allclose(mx, x.mean(0)), np.testing.assert_allclose(my, y.mean(0))
    P = np.eye(4) - 0.5  # a linear map of the second view
    np.testing.assert_allclose(moments_of(x, y).map_y(P).covariances()[4],
                               moments_of(x, y @ P.T).covariances()[4], atol=1e-9)


def test_cca_recovers_the_planted_correlations():
    x, y = correlated_views(40_000, 12, 7)
    _, _, cxx, cyy, cxy = moments_of(x, y).covariances()
    w_x, w_y, rho = cca.cca_whiten(cxx, cyy, cxy, k=5)
    np.testing.assert_allclose(rho[:3], PLANTED, atol=0.015)  # sampling error ~ 1/sqrt(N)
    assert (rho[3:] < 0.03).all()
    # the projections are what CCA promises: corr(x a_i, y b_i) = rho_i, uncorrelated across i
    px, py = (x - x.mean(0)) @ w_x, (y - y.mean(0)) @ w_y
    corr = np.corrcoef(px.T, py.T)[:5, 5:]
    np.testing.assert_allclose(np.diag(corr), rho, atol=1e-6)
    assert np.abs(corr - np.diag(np.diag(corr))).max() < 1e-6
    # and each stacked direction [a_i; b_i] has unit norm, as scipy.linalg.eig returns it
    np.testing.assert_allclose(np.linalg.norm(np.vstack([w_x, w_y]), axis=0), 1.0)


def test_eig_formulation_equals_whitening():
    x, y = correlated_views(5000, 9, 6, rho=(0.95, 0.7, 0.5, 0.2), seed=3)
    _, _, cxx, cyy, cxy = moments_of(x, y).covariances()
    wx_w, wy_w, rho_w = cca.cca_whiten(cxx, cyy, cxy, k=4)
    wx_e, wy_e, rho_e = cca.cca_eig(cxx, cyy, cxy, k=4)
    np.testing.assert_allclose(rho_w, rho_e, atol=1e-10)
    np.testing.assert_allclose(wx_w, wx_e, atol=1e-8)
    np.testing.assert_allclose(wy_w, wy_e, atol=1e-8)
    with pytest.raises(ValueError, match="k must be"):
        cca.cca_whiten(cxx, cyy, cxy, k=7)


# --- sentence vectors --------------------------------------------------------------------------

TOY_VOCAB = {"itos": ["<exc>", "<pad>", "<eos>", "a", "b"], "counts": {"a": 6, "b": 3},
             "total_tokens": 10, "excluded_count": 1, "min_count": 3, "max_len": 32}


def test_sif_sentence_vectors_by_hand():
    w = text.sif_weights(TOY_VOCAB)
    a = 1e-3
    np.testing.assert_allclose(w, [a / (a + 0.1), 0, 0, a / (a + 0.6), a / (a + 0.3)])
    table = np.array([[-1, -1], [0, 0], [1, 1], [1, 0], [0, 2]], dtype=np.float32)
    ids = np.array([[3, 4, 2, 1, 1, 1],    # a b <eos>     -> (w_a a + w_b b) / 3
                    [0, 3, 2, 4, 4, 4],    # <exc> a <eos> (the b's after <eos> are ignored)
                    [4, 4, 4, 4, 4, 4]])   # no <eos>: all 6 tokens
    s = text.sentence_vectors(ids, table, w, eos=2)
    wa, wb, we = w[3], w[4], w[0]
    np.testing.assert_allclose(s, [[wa / 3, 2 * wb / 3],
                                   [(wa - we) / 3, -we / 3],
                                   [0.0, 2 * wb]])


def test_first_component_removal_by_hand():
    s = np.array([[2.0, 1.0], [-2.0, 1.0], [0.0, 1.0]])  # centred: all spread along x
    v = text.first_component(s)
    np.testing.assert_allclose(np.abs(v), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(text.remove_component(s, v), [[0, 1], [0, 1], [0, 1]], atol=1e-12)
    rng = np.random.default_rng(0)
    m = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 2.0
    u = text.component_from_moments(len(m), m.sum(0), m.T @ m)
    np.testing.assert_allclose(np.abs(u @ text.first_component(m)), 1.0, atol=1e-10)


def test_corpus_and_table():
    ids = np.array([[3, 0, 4, 2, 1], [4, 4, 1, 1, 1]])
    assert text.corpus_from_ids(ids, TOY_VOCAB["itos"]) == [["a", "<exc>", "b"], ["b", "b"]]
    table = text.embedding_table({"a": [1.0, 2.0], "b": [3.0, 4.0]}, TOY_VOCAB["itos"])
    np.testing.assert_array_equal(table, [[-1, -1], [0, 0], [1, 1], [1, 2], [3, 4]])


FASTTEXT_SCRIPT = """
import hashlib, random, sys
from mmvae.eval import text  # numpy and gensim only: no torch, fast
rng = random.Random(0)
words = [f"w{i}" for i in range(40)]
corpus = [[rng.choice(words[: rng.randint(3, 40)]) for _ in range(8)] for _ in range(400)]
model = text.train_fasttext(corpus, seed=int(sys.argv[1]), vector_size=16, bucket=5000, epochs=2)
table = text.embedding_table(model.wv, ["<exc>", "<pad>", "<eos>"] + words)
print(hashlib.sha256(table.tobytes()).hexdigest())
"""


def test_fasttext_is_deterministic_for_a_seed():
    """Same seed, other Python hash seeds (gensim 3 seeded vectors with hash()): the same
    vectors; another seed: other vectors."""
    def table_hash(seed, hashseed):
        env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
        out = subprocess.run([sys.executable, "-c", FASTTEXT_SCRIPT, str(seed)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    first = table_hash(0, 1)
    assert table_hash(0, 2) == first
    assert table_hash(1, 1) != first


# --- the caption CCA space on synthetic pairs ----------------------------------------------------

ITOS = ["<exc>", "<pad>", "<eos>"] + [f"w{i}" for i in range(30)]
NUM_CLASSES, FEATURE_DIM, L = 5, 48, 12


def class_words(c):
    return [3 + 6 * c + j for j in range(6)]  # 6 words per class


def synthetic_pairs(n, seed, dim=FEATURE_DIM, length=L):
    """(features (n, dim), captions (n, length), classes): a feature is its class's direction
    plus noise; a caption is 3-7 words of its class (some excluded), <eos> and <pad>s."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, NUM_CLASSES, n)
    centres = np.random.default_rng(99).standard_normal((NUM_CLASSES, dim)) * 3
    features = np.abs(centres[classes] + rng.standard_normal((n, dim)))
    captions = np.ones((n, length), dtype=np.int64)
    for i, c in enumerate(classes):
        length = rng.integers(3, 8)
        words = rng.choice(class_words(c), length)
        words[rng.random(length) < 0.05] = 0
        captions[i, :length], captions[i, length] = words, 2
    return features.astype(np.float32), captions, classes


def synthetic_vocab(captions):
    tokens = captions[captions > 2]
    counts = {ITOS[t]: int((tokens == t).sum()) for t in range(3, len(ITOS))}
    excluded = int((captions == 0).sum())
    return {"itos": ITOS, "counts": counts, "excluded_count": excluded, "min_count": 3,
            "max_len": L, "total_tokens": int(tokens.size) + excluded}


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption_cca")
    train = synthetic_pairs(3000, seed=1)
    (folder / "vocab.json").write_text(json.dumps(synthetic_vocab(train[1])))
    return folder, train, synthetic_pairs(500, seed=2)


SMALL_FASTTEXT = {"vector_size": 20, "bucket": 5000}


def batches_of(features, captions, size=700):
    return lambda: ((features[i:i + size], captions[i:i + size]) for i in range(0, len(features), size))


@pytest.fixture(scope="module")
def fitted(caption_data):
    folder, (features, captions, _), _ = caption_data
    return cca.load_or_fit(folder / "cca", folder / "vocab.json", batches_of(features, captions),
                           k=4, fasttext=SMALL_FASTTEXT)


def test_fit_scores_true_pairs_above_shuffled_ones(caption_data, fitted):
    _, _, (features, captions, _) = caption_data
    space, info = fitted
    assert not info["loaded"] and info["num_train_pairs"] == 3000 and info["k"] == 4
    assert space.w_img.shape == (FEATURE_DIM, 4) and space.w_emb.shape == (20, 4)
    true = space.correlation(features, captions).mean()
    shuffled = space.correlation(features, np.roll(captions, 1, axis=0)).mean()
    assert true > 0.6 and shuffled < true - 0.5
    # the principal direction is gone from the train sentence vectors: their mean is orthogonal
    assert abs(space.mean_emb @ space.component) < 1e-8


def test_artifacts_are_reused_and_checked(caption_data, fitted):
    folder, (features, captions, _), test = caption_data
    space, _ = fitted
    never = lambda: pytest.fail("loading must not read the train pairs")  # noqa: E731
    again, info = cca.load_or_fit(folder / "cca", folder / "vocab.json", never, k=4)
    assert info["loaded"] and info["vocab_sha256"] == sha256_file(folder / "vocab.json")
    np.testing.assert_array_equal(again.correlation(*test[:2]), space.correlation(*test[:2]))
    assert (folder / "cca" / "word_vectors.kv").is_file()
    with pytest.raises(ValueError, match="cca_reset"):
        cca.load_or_fit(folder / "cca", folder / "vocab.json", never, k=3)
    refit, info = cca.load_or_fit(folder / "cca", folder / "vocab.json",
                                  batches_of(features, captions), k=4, reset=True,
                                  fasttext=SMALL_FASTTEXT)
    assert not info["loaded"]  # same seed: the same space again
    np.testing.assert_allclose(refit.correlation(*test[:2]), space.correlation(*test[:2]), atol=1e-6)


# --- scoring a model -------------------------------------------------------------------------------

class ClassExpert(nn.Module):
    """Encoder: z = 8 * onehot(class of x) + 0.1 noise; decoder: the class's typical datapoint
    of class (argmax z + shift) mod 5 (features, or caption logits)."""

    latent_dim = NUM_CLASSES

    def __init__(self, modality, typical, classify, shift=0):
        super().__init__()
        self.modality, self.typical, self.classify, self.shift = modality, typical, classify, shift
        self.posterior_family = get_family("normal")
        self.likelihood = type("Mean", (), {"mean": staticmethod(lambda out: out)})

    def posterior(self, x):
        loc = 8.0 * nn.functional.one_hot(self.classify(x), NUM_CLASSES).float()
        return loc, torch.full_like(loc, 0.1)

    def decode(self, z):
        return self.typical[(z.argmax(-1) + self.shift) % NUM_CLASSES]


class FeatureCaptionModel(StandInModel):
    """A stand-in cubISft: class-perfect encoders, decoders shifted by `shift` classes."""

    def __init__(self, shift=0):
        centres = torch.tensor(np.abs(np.random.default_rng(99).standard_normal(
            (NUM_CLASSES, FEATURE_DIM)) * 3), dtype=torch.float32)
        logits = torch.full((NUM_CLASSES, L, len(ITOS)), -5.0)
        for c in range(NUM_CLASSES):  # "w w w <eos>" with the class's first words
            for pos, word in enumerate(class_words(c)[:3] + [2]):
                logits[c, pos, word] = 5.0
        logits[:, 4:, 1] = 5.0  # then <pad>
        word_class = {w: c for c in range(NUM_CLASSES) for w in class_words(c)}

        def caption_class(ids):
            return torch.tensor([word_class.get(int(row[0]), 0) for row in ids])

        super().__init__([
            ClassExpert("feature", centres, lambda x: torch.cdist(x, centres).argmin(-1), shift),
            ClassExpert("caption", logits, caption_class, shift)], NUM_CLASSES)


def test_cca_coherence_of_stand_in_models(caption_data, fitted):
    _, _, (features, captions, _) = caption_data
    space, _ = fitted
    batches = [([torch.tensor(features[i:i + 128]), torch.tensor(captions[i:i + 128])], None)
               for i in range(0, 500, 128)]
    good = cca.cca_coherence(FeatureCaptionModel(), batches, space, seed=1)
    bad = cca.cca_coherence(FeatureCaptionModel(shift=1), batches, space, seed=1)
    values = good["values"]
    assert good["num_pairs"] == 500
    assert values["ground_truth"] == pytest.approx(space.correlation(features, captions).mean())
    for key in ("cross_feature_to_caption", "cross_caption_to_feature"):
        assert values[key] > 0.6 and bad["values"][key] < 0.2, (key, values, bad["values"])
    assert cca.cca_coherence(FeatureCaptionModel(), batches, space, seed=1) == good  # seeded
    limited = cca.cca_coherence(FeatureCaptionModel(), batches, space, max_datapoints=200)
    assert limited["num_pairs"] == 200
    joint = cca.cca_joint(FeatureCaptionModel(), space, num_samples=300, batch_size=128)
    assert joint["num_samples"] == 300 and joint["values"]["joint"] > 0.6
    assert cca.cca_joint(FeatureCaptionModel(shift=1), space, num_samples=300)["values"]["joint"] > 0.6
    with pytest.raises(ValueError, match="feature and caption"):
        cca.cca_joint(mmvae.build_model("mnist_svhn", latent_dim=2), space)


# --- metric `cca` end to end ----------------------------------------------------------------------

def write_caption_shards(folder, train, test, vocab):
    """Shards as the CUB recipe writes them: feature.npy, caption.json, label.cls + vocab.json."""
    import io

    from mmvae.data.writer import write_manifest, write_shards

    def samples(features, captions, classes):
        for i, (f, c, y) in enumerate(zip(features, captions, classes)):
            buf = io.BytesIO()
            np.save(buf, f)
            yield {"__key__": f"{i:06d}", "feature.npy": buf.getvalue(),
                   "caption.json": json.dumps(c.tolist()), "label.cls": int(y)}

    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    splits = {name: write_shards(samples(*data), folder, name, total=len(data[0]), max_count=1000,
                                 progress=False) for name, data in (("train", train), ("test", test))}
    write_manifest(folder, "shapes", {}, splits, extra_files=["vocab.json"],
                   sample_keys=["caption.json", "feature.npy", "label.cls"])


def test_metric_cca_end_to_end(tmp_path, monkeypatch, caption_data):
    """evaluate_run(["cca"]): fits the space on the train shards (then reuses it), scores the
    test shards and prior samples, reports every number."""
    from mmvae.config import load_config, save_config
    from mmvae.eval import run as run_module

    _, train, test = caption_data
    shards = tmp_path / "shards"
    write_caption_shards(shards, train, test, synthetic_vocab(train[1]))
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(None, ["model.name=mnist_svhn", f"data.shards={shards}",
                                   "logging.progress=false"]), run / "config.yaml")
    monkeypatch.setattr(run_module, "load_model", lambda *a, **k: FeatureCaptionModel())
    monkeypatch.setitem(text.FASTTEXT, "vector_size", FEATURE_DIM)  # k = 40 needs >= 40 dims
    monkeypatch.setitem(text.FASTTEXT, "bucket", 5000)
    out = run_module.evaluate_run(run, ["cca"], ["eval.max_datapoints=300"])
    result = out["metrics"]["cca"]
    assert result["num_pairs"] == 300 and result["joint_samples"] == 1000
    assert result["artifacts"]["k"] == 40 and not result["artifacts"]["loaded"]
    assert (shards / "cca" / "cca.npz").is_file()
    values = result["values"]
    assert set(values) == {"ground_truth", "cross_feature_to_caption", "cross_caption_to_feature",
                           "joint"}
    assert values["ground_truth"] > 0.3 and values["cross_feature_to_caption"] > 0.3
    report = (run / "report.md").read_text()
    assert "| cca / joint |" in report and "CCA coherence" in report
    again = run_module.evaluate_run(run, ["cca"], ["eval.max_datapoints=300"])
    assert again["metrics"]["cca"]["artifacts"]["loaded"]
    assert again["metrics"]["cca"]["values"] == values
    with pytest.raises(ValueError, match="cca needs modalities feature and caption"):
        monkeypatch.setattr(run_module, "load_model",
                            lambda *a, **k: mmvae.build_model("mnist_svhn", latent_dim=2))
        run_module.evaluate_run(run, ["cca"])
