"""CUB models: nets at B=1, tied weights, the caption likelihood, estimators, training, pictures
and the nearest-neighbour feature index."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmvae
from mmvae import objectives as O
from mmvae.config import ConfigError
from mmvae.eval.display import FeatureIndex, build_feature_index, decode_captions
from mmvae.models.captions import CaptionLikelihood, fused_token_log_prob, token_weights
from mmvae.nets import cub_feature, cub_image, cub_sentence

V = 23
ITOS = ["<exc>", "<pad>", "<eos>"] + [f"w{i}" for i in range(V - 3)]


def captions(B, length=10, generator=None):
    """(B, 32) ids: `length` real tokens, <eos>, then <pad>."""
    ids = torch.randint(3, V, (B, 32), generator=generator)
    ids[:, length] = 2
    ids[:, length + 1:] = 1
    return ids


def batch(name, B, generator=None):
    first = (torch.rand(B, 3, 64, 64, generator=generator) if name == "cubIS"
             else torch.rand(B, 2048, generator=generator) * 3)
    return [first, captions(B, generator=generator)]


# --- nets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", ["cub_sentence", "cub_sentence_ft"])
def test_sentence_net_shapes_follow_the_reference(width):
    enc = cub_sentence.Encoder(6, V, width)
    dec = cub_sentence.Decoder(6, enc.embedding, width)
    sizes = []
    for layer in list(enc.body) + list(dec.body):
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:])))
    loc, raw = enc(captions(1))  # B = 1
    assert loc.shape == raw.shape == (1, 6)
    assert dec(torch.randn(4 * 1, 6)).shape == (4, 32, V)  # K = 4 particles
    assert sizes == [(16, 64), (8, 32), (4, 16), (4, 8), (4, 4),                   # encoder
                     (4, 4), (4, 8), (4, 16), (8, 32), (16, 64), (32, 128)]  # decoder
    assert dec(torch.randn(4, 6), logits=False).shape == (4, 32, 128)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all((m.bias is None) == (width == "cub_sentence") for m in convs)
    top = max(m.out_channels for m in convs[:-2])
    assert top == (128 if width == "cub_sentence" else 512)


def test_image_and_feature_nets_at_B1_and_many_particles():
    enc, dec = cub_image.Encoder(5), cub_image.Decoder(5)
    loc, raw = enc(torch.rand(1, 3, 64, 64))
    assert loc.shape == raw.shape == (1, 5)
    z = torch.randn(3, 5)
    out = dec(z)
    assert out.shape == (3, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    plain = dec.body.to(memory_format=torch.contiguous_format)(z.reshape(3, 5, 1, 1))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)  # the fast path is the same net
    enc, dec = cub_feature.Encoder(5), cub_feature.Decoder(5)
    loc, raw = enc(torch.rand(1, 2048))
    assert loc.shape == raw.shape == (1, 5)
    assert dec(torch.randn(3, 5)).shape == (3, 2048)


# --- models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cub_image", "cub_image_ft", "cub_sentence", "cubIS", "cubISft"])
def test_every_model_at_B1_and_K_particles(name):
    torch.manual_seed(0)
    model = mmvae.build_model(name, latent_dim=4, vocab_size=V)
    data = {"image": torch.rand(1, 3, 64, 64), "feature": torch.rand(1, 2048),
            "caption": captions(1)}
    xs = [data[m] for m in model.modalities]
    lw = O.log_weights(model, xs, K=3)
    assert lw.shape == (len(xs), 3, 1) and lw.dtype == torch.float64 and torch.isfinite(lw).all()
    shapes = {"image": (3, 64, 64), "feature": (2048,), "caption": (32, V)}
    for row in model.reconstruct(xs):
        assert [tuple(g.shape[1:]) for g in row] == [shapes[m] for m in model.modalities]
    assert [tuple(g.shape) for g in model.generate(2)] == [(2, *shapes[m]) for m in model.modalities]


def test_paper_defaults():
    cubIS = mmvae.build_model("cubIS", vocab_size=V, learn_prior=True)
    assert cubIS.modalities == ["image", "caption"] and cubIS.latent_dim == 20
    assert cubIS.llik_scaling == pytest.approx([32 / 12288, 1.0])
    assert [e.posterior_family.name for e in cubIS.experts] == ["laplace", "normal"]  # mixed
    loc, scale = cubIS.prior_params()
    assert cubIS.prior_family.name == "laplace"
    assert torch.allclose(scale, torch.full_like(scale, 1 + 1e-6))  # D softmax(0) + eta
    assert all(v.prior_raw is cubIS.prior_raw for v in cubIS.experts)  # one shared prior
    assert [e.likelihood.scale for e in cubIS.experts[:1]] == [0.01]
    ft = mmvae.build_model("cubISft", vocab_size=V, llik_scaling=0.002)
    assert ft.modalities == ["feature", "caption"] and ft.llik_scaling == [0.002, 1.0]
    assert mmvae.build_model("cubISft", vocab_size=V).llik_scaling == pytest.approx([32 / 2048, 1])
    assert ft.prior_family.name == "normal"
    assert torch.allclose(ft.prior_params()[1], torch.full((1, 20), np.log(2) + 1e-6))
    assert [e.posterior_family.name for e in ft.experts] == ["normal", "normal"]
    assert ft.experts[0].likelihood.family == "laplace" and ft.experts[0].likelihood.scale == 0.01
    # the wider cubSft caption net in cubISft
    assert ft.experts[1].enc.loc.in_channels == 512 and cubIS.experts[1].enc.loc.in_channels == 128


def test_vocabulary_size_is_required():
    with pytest.raises(ConfigError, match="vocab.json.*model.vocab_size"):
        mmvae.build_model("cubIS")


def test_output_layer_is_tied_to_the_embedding_and_stays_tied(tmp_path):
    torch.manual_seed(0)
    model = mmvae.build_model("cubIS", latent_dim=4, vocab_size=V, learn_prior=True)
    sentence = model.experts[1]
    assert sentence.dec.out.weight is sentence.enc.embedding.weight  # one Parameter
    assert sentence.dec.out.bias is not None
    params = list(model.parameters())
    assert sum(p is sentence.enc.embedding.weight for p in params) == 1  # optimised once
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = sentence.enc.embedding.weight.detach().clone()
    (-O.m_dreg(model, batch("cubIS", 2), K=2, looser=True).mean()).backward()
    assert sentence.enc.embedding.weight.grad[0].abs().sum() > 0  # <exc> row learns via the head
    opt.step()
    assert sentence.dec.out.weight is sentence.enc.embedding.weight
    assert not torch.equal(sentence.enc.embedding.weight, before)
    mmvae.save_model(model, tmp_path / "m")
    again = mmvae.load_model(tmp_path / "m").experts[1]
    assert again.dec.out.weight is again.enc.embedding.weight
    torch.testing.assert_close(again.dec.out.weight, sentence.enc.embedding.weight)


# --- the caption likelihood --------------------------------------------------------------------

def test_padding_rule_in_both_modes_against_hand_computed_cross_entropy():
    torch.manual_seed(0)
    tokens = torch.tensor([[5, 0, 3, 2, 1, 1], [4, 2, 1, 1, 1, 1]])  # <exc>=0 <pad>=1 <eos>=2
    logits = torch.randn(2, 6, 7)
    ce = F.cross_entropy(logits.reshape(-1, 7), tokens.reshape(-1), reduction="none").reshape(2, 6)
    ours = CaptionLikelihood(paper_token_loss=False)
    # real tokens (<exc> included) and the first <eos>; no <pad>
    assert token_weights(tokens).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    expected = -torch.stack([ce[0, :4].sum(), ce[1, :2].sum()])
    torch.testing.assert_close(ours.log_prob_sum(tokens, logits), expected.double())
    paper = CaptionLikelihood(paper_token_loss=True)  # cross_entropy(ignore_index=0)
    reference = -F.cross_entropy(logits.reshape(-1, 7), tokens.reshape(-1), reduction="none",
                                 ignore_index=0).reshape(2, 6).sum(-1)
    torch.testing.assert_close(paper.log_prob_sum(tokens, logits), reference.double())
    torch.testing.assert_close(reference, -torch.stack([ce[0].sum() - ce[0, 1], ce[1].sum()]))


@pytest.mark.parametrize("paper", [False, True])
def test_fused_chunked_likelihood_equals_naive_log_softmax(paper):
    torch.manual_seed(0)
    R, E = 50, 8
    h = torch.randn(R, E, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, E, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (R,))
    row_weight = (torch.rand(R) > 0.3).double()
    fused = fused_token_log_prob(h, weight, bias, target, row_weight, chunk=7)  # 8 chunks
    naive = F.log_softmax(h @ weight.T + bias, -1).gather(1, target[:, None]).squeeze(1) * row_weight
    torch.testing.assert_close(fused.double(), naive, rtol=1e-5, atol=1e-5)
    g = torch.randn(R, dtype=torch.float64)
    grads = torch.autograd.grad((fused.double() * g).sum(), (h, weight, bias))
    expected = torch.autograd.grad((naive * g).sum(), (h, weight, bias))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # through the model: (M, K, B) from the fused path equals the full-logits path
    model = mmvae.build_model("cub_sentence", latent_dim=4, vocab_size=V, paper_token_loss=paper)
    model.eval()  # batch-norm statistics must not differ between the two decodes
    x = captions(3)
    x[0, 4] = 0  # an <exc> token
    z = torch.randn(2, 5, 3, 4)
    fused = model.log_likelihood(x, z)
    naive = model.likelihood.log_prob_sum(x, model.decode(z))
    assert fused.shape == (2, 5, 3) and fused.dtype == torch.float64
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-3)


def test_likelihood_stays_fp32_or_wider_under_bf16_autocast():
    torch.manual_seed(0)
    model = mmvae.build_model("cub_sentence", latent_dim=4, vocab_size=V)
    x, z = captions(2), torch.randn(3, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model.log_likelihood(x, z)
    assert lp.dtype == torch.float64 and torch.isfinite(lp).all()  # fp32 terms, fp64 sum
    lp.sum().backward()
    assert torch.isfinite(model.enc.embedding.weight.grad).all()


# --- estimators and training -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cubIS", "cubISft"])
@pytest.mark.parametrize("estimator", ["m_dreg", "m_iwae"])
def test_estimators_give_finite_values_and_gradients(name, estimator):
    torch.manual_seed(0)
    model = mmvae.build_model(name, latent_dim=6, vocab_size=V, learn_prior=True)
    calls = []
    for e in model.experts:
        e.dec.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    out = getattr(O, estimator)(model, batch(name, 3), K=4, looser=True)
    assert out.shape == (3,) and torch.isfinite(out).all()
    (-out.mean()).backward()
    assert calls == [2 * 4 * 3, 2 * 4 * 3]  # one decoder call on all M*K*B particles
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_a_short_training_on_a_fixed_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = mmvae.build_model("cubIS", latent_dim=8, vocab_size=V, learn_prior=True)
    xs = batch("cubIS", 2, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = -O.m_dreg(model, xs, K=2, looser=True).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 50, losses


# --- tiny image-caption(-feature) shards -------------------------------------------------------

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230),
           "yellow": (230, 230, 30)}
SHAPES_ITOS = ["<exc>", "<pad>", "<eos>", "a", "red", "green", "blue", "yellow", "square", "."]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(out, n_train=32, n_test=16, with_features=True):
    """Coloured squares captioned 'a <colour> square .'; features = a one-hot colour code plus
    a per-image offset (unique per image); two captions per image."""
    from mmvae.data.writer import write_manifest, write_shards

    rng = np.random.default_rng(0)
    stoi = {w: i for i, w in enumerate(SHAPES_ITOS)}
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        samples = []
        for i in range(n):
            label = i % 4
            colour = list(COLOURS)[label]
            image = np.full((64, 64, 3), 245, np.uint8)
            top, left = rng.integers(4, 28, 2)
            image[top:top + 32, left:left + 32] = COLOURS[colour]
            ids = [stoi["a"], stoi[colour], stoi["square"], stoi["."], 2] + [1] * 27
            feature = np.zeros(2048, np.float32)
            feature[label * 8:(label + 1) * 8] = 5.0
            feature[100 + i] = 1.0
            for c in range(2):
                sample = {"__key__": f"{i:06d}{c}", "image.png": _png(image),
                          "caption.json": json.dumps(ids), "label.cls": label}
                if with_features:
                    buf = io.BytesIO()
                    np.save(buf, feature)
                    sample["feature.npy"] = buf.getvalue()
                samples.append(sample)
        splits[split] = write_shards(samples, out, split, total=len(samples), max_count=32,
                                     progress=False)
    (out / "vocab.json").write_text(json.dumps({"itos": SHAPES_ITOS}))
    keys = ["image.png", "caption.json", "label.cls"] + (["feature.npy"] if with_features else [])
    write_manifest(out, "tiny_cub", {}, splits, ["vocab.json"], sample_keys=keys)
    return out


@pytest.fixture(scope="module")
def tiny_cub(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("tiny_cub"))


def test_nearest_neighbour_lookup_returns_the_right_image(tiny_cub, tmp_path):
    paths = build_feature_index(tiny_cub, "train", out_dir=tmp_path)
    index = FeatureIndex.open(tmp_path)
    assert isinstance(index.features, np.memmap) and isinstance(index.images, np.memmap)
    assert len(index) == 32  # two captions per image: each image once
    assert index.images.dtype == np.uint8 and index.images.shape == (32, 3, 64, 64)
    rows = [5, 17, 30]
    queries = torch.from_numpy(np.asarray(index.features[rows])) + 0.01 * torch.randn(3, 2048)
    assert index.nearest(queries).tolist() == rows
    looked_up = index.lookup(queries)
    assert looked_up.shape == (3, 3, 64, 64)
    torch.testing.assert_close(looked_up, torch.from_numpy(index.images[rows] / 255).float())
    small = FeatureIndex(np.asarray(index.features), np.asarray(index.images), rows_per_chunk=5)
    assert small.nearest(queries).tolist() == rows  # across chunks of the stored rows
    assert FeatureIndex.open(tmp_path / "nothing") is None
    assert all(p.is_file() for p in paths)


def test_decoded_text_stops_at_eos():
    ids = torch.tensor([[3, 4, 2, 5, 1], [5, 5, 5, 5, 5]])
    assert decode_captions(ids, ITOS) == ["w0 w1", "w2 w2 w2 w2 w2"]
    logits = F.one_hot(ids, V).float()  # (n, L, V): argmax gives the ids back
    assert decode_captions(logits, ITOS) == ["w0 w1", "w2 w2 w2 w2 w2"]
    assert decode_captions(ids.float(), None) == ["3 4", "5 5 5 5 5"]


def test_pictures_of_caption_and_feature_models(tiny_cub, tmp_path):
    from mmvae.eval.pictures import picture_resources, save_prior_samples, save_reconstructions

    gen = torch.Generator().manual_seed(0)
    for name in ("cubIS", "cubISft"):
        model = mmvae.build_model(name, latent_dim=4, vocab_size=len(SHAPES_ITOS))
        res = picture_resources(tiny_cub, model)
        assert res["vocab"] == SHAPES_ITOS
        assert (res.get("feature_index") is not None) == (name == "cubISft")  # built once, here
        assert (tiny_cub / "feature_index.npy").is_file() == (name == "cubISft")
        ids = torch.tensor([[3, 4, 8, 9, 2] + [1] * 27] * 5)
        xs = [torch.rand(5, 3, 64, 64) if name == "cubIS" else torch.rand(5, 2048), ids]
        out = save_reconstructions(model, xs, tmp_path / f"{name}_recon_001.png", n=4, **res)
        assert [p.name for p in out] == [f"{name}_recon_001{s}" for s in (".png", ".txt", "_captions.json",
                                                                          "_pairs.png")]
        png = np.asarray(Image.open(out[0]))
        assert png.shape == (3 * 66 + 2, 4 * 66 + 2, 3)  # input image + 2 decoded image rows
        text = out[1].read_text()
        assert "input caption:\n  0: a red square .\n" in text
        assert text.count("caption decoded from") == 2
        table = json.loads(out[2].read_text())  # the W&B caption table: one row per item
        assert table["columns"] == ["item", "caption decoded from q_image(z|x_image)" if name == "cubIS" else
                                    "caption decoded from q_feature(z|x_feature)", "input caption",
                                    "caption decoded from q_caption(z|x_caption)"]
        assert len(table["data"]) == 4 and table["data"][0][:1] + table["data"][0][2:3] == [0, "a red square ."]
        prior = save_prior_samples(model, tmp_path / f"{name}_prior_001.png", n=9, generator=gen,
                                   **res)
        first = "image" if name == "cubIS" else "feature"
        assert [p.name for p in prior] == [f"{name}_prior_001_{first}.png",
                                           f"{name}_prior_001_caption.txt",
                                           f"{name}_prior_001_captions.json",
                                           f"{name}_prior_001_pairs.png"]
        assert len(prior[1].read_text().splitlines()) == 9
        assert json.loads(prior[2].read_text())["columns"] == ["item", "caption"]
        assert len(json.loads(prior[2].read_text())["data"]) == 9
    sentence = mmvae.build_model("cub_sentence", latent_dim=4, vocab_size=len(SHAPES_ITOS))
    out = save_reconstructions(sentence, [ids], tmp_path / "s.png", vocab=SHAPES_ITOS)
    assert [p.name for p in out] == ["s.txt", "s_captions.json"]  # text only: no image grid


def test_fit_on_tiny_caption_shards_lowers_the_loss_and_draws_captions(tiny_cub, tmp_path, monkeypatch):
    from pathlib import Path

    from mmvae.config import load_config
    from mmvae.train.loop import fit

    monkeypatch.setenv("WANDB_MODE", "offline")
    root = Path(__file__).resolve().parent.parent
    run_dir = tmp_path / "run"
    cfg = load_config(root / "configs" / "demo_cub.yaml", [
        f"data.shards={tiny_cub}", "data.builtin=", f"run.dir={run_dir}", "logging.wandb=offline",
        "logging.progress=false", "data.batch_size=16", "model.latent_dim=8", "objective.K=2",
        "train.epochs=3", "train.lr=2e-3", "train.test_batches=1"])
    out_dir, status = fit(cfg)
    assert status == "done"
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tests = [e["bound"] for e in events if e["split"] == "test"]
    assert len(tests) == 3 and tests[-1] > tests[0] + 20, tests
    names = {p.name for p in (run_dir / "images").iterdir()}
    assert {"recon_003.png", "recon_003.txt", "recon_003_pairs.png", "prior_003_image.png",
            "prior_003_caption.txt", "prior_003_pairs.png", "recon_003_captions.json"} <= names
    # the captions also went to W&B as tables (offline run files), one per epoch and kind
    tables = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*/files/media/table/captions/*.table.json"))
    assert len([t for t in tables if t.startswith("recon_")]) == 3 and len(tables) == 6, tables
    logged = json.loads(next((run_dir / "wandb").glob("offline-run-*/files/media/table/captions/prior_*.table.json")).read_text())
    assert logged["columns"] == ["item", "caption"] and len(logged["data"]) > 0
    model = mmvae.load_model(run_dir / "model")
    assert model.modalities == ["image", "caption"] and model.experts[1].enc.embedding.num_embeddings == 10
