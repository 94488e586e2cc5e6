"""Metrics for M > 2 modalities: subsets, z given a subset, conditional coherence per subset,
latent accuracy per subset (template stand-ins with a known answer, the real mnist_svhn for the
M = 2 equality with cross coherence, two gloo processes for the sharding)."""
import json

import torch

import mmvae
from mmvae.eval import posterior_sample
from mmvae.eval.classifiers import DigitClassifier
from mmvae.eval.coherence import array_batches, cross_coherence
from mmvae.eval.conditional import conditional_coherence
from mmvae.eval.latent import subset_latent_accuracy
from mmvae.eval.subsets import (conditional_pairs, latent_mean_from_subset, latents_from_subset,
                                nonempty_subsets)


def batches_of(model, n=200, batch_size=64, seed=0):
    xs, labels = model.pairs(n, seed)
    return [([x[i:i + batch_size] for x in xs], labels[i:i + batch_size])
            for i in range(0, n, batch_size)]


def test_subsets_are_every_nonempty_subset_ordered_by_size():
    assert nonempty_subsets(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert nonempty_subsets(3, proper=True) == nonempty_subsets(3)[:-1]
    five = nonempty_subsets(5)
    assert len(five) == 31 == len(set(five)) and len(nonempty_subsets(5, proper=True)) == 30
    pairs = conditional_pairs(5)
    # sum_k C(5, k) (5 - k) directions S -> m, each m outside S
    assert len(pairs) == 5 * 4 + 10 * 3 + 10 * 2 + 5 * 1 == len(set(pairs))
    assert all(m not in s for s, m in pairs)
    assert conditional_pairs(2) == [((0,), 1), ((1,), 0)]


def test_z_given_one_modality_is_that_experts_posterior_sample_draw_for_draw():
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=4).eval()
    xs = [torch.rand(5, 1, 28, 28), torch.rand(5, 3, 32, 32)]
    with torch.no_grad():
        z = latents_from_subset(model, xs, (1,), 1, torch.Generator().manual_seed(3))
        ref = posterior_sample(model.experts[1], xs[1], torch.Generator().manual_seed(3))
    assert z.shape == (1, 5, 4) and torch.equal(z[0], ref)


def test_z_given_a_subset_picks_each_expert_uniformly(make_poly_template_model):
    """Experts that code a sample's class as c, c+1 and c+2: the argmax of z tells which expert
    each draw came from; the three are drawn ~1/3 each, reproducibly from the generator."""
    model = make_poly_template_model(3, enc_shifts=[0, 1, 2])
    xs, labels = model.pairs(100)
    z = latents_from_subset(model, xs, (0, 1, 2), 30, torch.Generator().manual_seed(0))
    offset = (z.argmax(-1) - labels) % 10  # (30, 100): which expert drew it
    fractions = torch.stack([(offset == j).float().mean() for j in range(3)])
    assert offset.max() <= 2 and torch.allclose(fractions, torch.full((3,), 1 / 3), atol=0.03)
    again = latents_from_subset(model, xs, (0, 1, 2), 30, torch.Generator().manual_seed(0))
    other = latents_from_subset(model, xs, (0, 1, 2), 30, torch.Generator().manual_seed(1))
    assert torch.equal(z, again) and not torch.equal(z.argmax(-1), other.argmax(-1))
    # the mixture mean averages the experts' locs
    mean = latent_mean_from_subset(model, xs, (0, 2))
    expect = 4.0 * (torch.nn.functional.one_hot(labels % 10, 10)
                    + torch.nn.functional.one_hot((labels + 2) % 10, 10))
    assert torch.allclose(mean, expect.float())


def test_a_model_that_defines_latents_from_subset_is_asked_for_them(make_poly_template_model):
    """A fusion's own posterior given S replaces the mixture rule (here: always the class after
    the true one, so nothing is coherent), and it gets the batch's generator."""
    model = make_poly_template_model(3)
    calls = []

    def own(xs, subset, K, generator=None):
        calls.append((subset, K, generator is not None))
        cls = (model.vaes[subset[0]].classifier(xs[subset[0]]).argmax(-1) + 1) % 10
        return 8.0 * torch.nn.functional.one_hot(cls, 10).float().expand(K, -1, -1)

    model.latents_from_subset = own
    out = conditional_coherence(model, batches_of(model), model.classifiers())
    assert set(out["values"].values()) == {0.0}
    assert calls[:6] == [((0,), 1, True), ((1,), 1, True), ((2,), 1, True), ((0, 1), 1, True),
                         ((0, 2), 1, True), ((1, 2), 1, True)]


def test_a_model_that_carries_the_class_through_is_fully_coherent_from_every_subset(
        make_poly_template_model):
    model = make_poly_template_model(4)
    out = conditional_coherence(model, batches_of(model), model.classifiers(), seed=5)
    assert len([k for k in out["values"] if k.startswith("cond_")]) == 4 * 3 + 6 * 2 + 4 * 1
    assert set(out["values"].values()) == {1.0} and out["num_pairs"] == 200
    assert {k: v["mean"] for k, v in out["by_size"].items()} == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert set(out["by_size"]["3"]["subsets"]) == {"m0+m1+m2", "m0+m1+m3", "m0+m2+m3", "m1+m2+m3"}


def test_a_model_that_ignores_its_input_is_at_chance(make_poly_template_model):
    model = make_poly_template_model(3, blind=(0, 1, 2))
    out = conditional_coherence(model, batches_of(model, n=600), model.classifiers())["values"]
    assert all(0.02 <= v <= 0.2 for v in out.values()), out  # 10 balanced classes
    assert abs(out["given_1"] - 0.1) < 0.04 and abs(out["given_2"] - 0.1) < 0.04


def test_a_broken_encoder_spoils_exactly_the_subsets_it_is_drawn_from(make_poly_template_model):
    """m1's encoder codes the wrong class: alone it is never coherent, in a pair with a good
    encoder it is drawn half of the time; a decoder shift spoils only generation into it."""
    model = make_poly_template_model(3, enc_shifts=[0, 1, 0])
    v = conditional_coherence(model, batches_of(model, n=400), model.classifiers())["values"]
    assert v["cond_m1_to_m0"] == v["cond_m1_to_m2"] == 0.0
    assert v["cond_m0_to_m1"] == v["cond_m2_to_m1"] == v["cond_m0+m2_to_m1"] == 1.0
    assert 0.4 < v["cond_m0+m1_to_m2"] < 0.6 and 0.4 < v["cond_m1+m2_to_m0"] < 0.6
    singles = [v[k] for k in ("cond_m0_to_m1", "cond_m0_to_m2", "cond_m1_to_m0", "cond_m1_to_m2",
                              "cond_m2_to_m0", "cond_m2_to_m1")]
    assert v["given_1"] == sum(singles) / 6
    model = make_poly_template_model(3, shifts=[0, 0, 3])
    v = conditional_coherence(model, batches_of(model), model.classifiers())["values"]
    assert {k for k, acc in v.items() if acc == 0.0} == {"cond_m0_to_m2", "cond_m1_to_m2",
                                                          "cond_m0+m1_to_m2"}


def test_for_two_modalities_conditional_coherence_is_cross_coherence():
    """The same draws: an untrained mnist_svhn and random classifiers, whose scores depend on
    the noise (another seed changes them), give the cross coherences exactly."""
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=8)
    classifiers = {"mnist": DigitClassifier(1, 28), "svhn": DigitClassifier(3, 32)}
    labels = torch.arange(300) % 10
    xs = [torch.rand(300, 1, 28, 28), torch.rand(300, 3, 32, 32)]

    def both(seed):
        cross = cross_coherence(model, array_batches(xs, labels, 64), classifiers, seed=seed,
                                max_datapoints=250)
        cond = conditional_coherence(model, array_batches(xs, labels, 64), classifiers,
                                     seed=seed, max_datapoints=250)
        return cross["values"], cond["values"]

    cross, cond = both(0)
    assert cond["cond_mnist_to_svhn"] == cross["cross_mnist_to_svhn"]
    assert cond["cond_svhn_to_mnist"] == cross["cross_svhn_to_mnist"]
    assert cond["given_1"] == (cross["cross_mnist_to_svhn"] + cross["cross_svhn_to_mnist"]) / 2
    other, _ = both(1)
    assert other != cross  # the draws matter, so the equality above is not a coincidence


def test_latent_accuracy_per_subset(make_poly_template_model):
    model = make_poly_template_model(3)
    train, test = batches_of(model, 200, seed=0), batches_of(model, 100, seed=1)
    out = subset_latent_accuracy(model, train, test, seed=0)
    assert len([k for k in out["values"] if not k.startswith("latent_given")]) == 7
    assert set(out["values"].values()) == {1.0} and out["num_train"] == 200
    g = torch.Generator().manual_seed(0)
    shuffled = [(xs, y[torch.randperm(len(y), generator=g)]) for xs, y in test]
    out = subset_latent_accuracy(model, train, shuffled, seed=0)
    assert all(v < 0.3 for v in out["values"].values())
    capped = subset_latent_accuracy(model, train, test, max_datapoints=70)
    assert capped["num_train"] == capped["num_test"] == 70


# --- end to end on tiny polydigits shards ---------------------------------------------------------

def _poly_model(cfg):
    """An untrained MMVAE over five small MLP VAEs of 3x28x28 images (registered for the test:
    the polydigits model itself belongs to the models package)."""
    from torch import nn

    from mmvae.models.mmvae import MMVAE
    from mmvae.models.vae import VAE

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 2 * cfg.latent_dim))

        def forward(self, x):
            return self.body(x).chunk(2, -1)

    def decoder():
        return nn.Sequential(nn.Linear(cfg.latent_dim, 3 * 28 * 28), nn.Sigmoid(),
                             nn.Unflatten(1, (3, 28, 28)))

    vaes = [VAE(modality=f"m{i}", encoder=Encoder(), decoder=decoder(), data_shape=(3, 28, 28),
                latent_dim=cfg.latent_dim) for i in range(5)]
    return MMVAE(vaes, latent_dim=cfg.latent_dim, llik_scaling=[1.0] * 5)


def test_polydigits_run_gets_every_subset_in_eval_json_and_a_compact_report(tmp_path, monkeypatch):
    """Tiny polydigits shards: the digit classifiers of m0..m4 are trained and cached with their
    test accuracy, 75 directions S -> m and 31 latent subsets are in eval.json, report.md has one
    row per number of given modalities (the directions stay out of the main table)."""
    from mmvae import registry
    from mmvae.config import load_config, save_config
    from mmvae.data.recipes.polydigits import build_polydigits
    from mmvae.eval.context import EvalContext
    from mmvae.eval.metrics import inapplicable
    from mmvae.eval.run import evaluate_run

    shards, run = tmp_path / "poly", tmp_path / "run"
    build_polydigits(shards, sources_per_class=30, train_samples=200, test_samples=60,
                     train_shards=2, test_shards=1, progress=False)
    monkeypatch.setitem(registry.MODELS, "poly_test", _poly_model)
    torch.manual_seed(0)
    overrides = ["model.name=poly_test", "model.latent_dim=6", f"data.shards={shards}",
                 "logging.progress=false"]
    run.mkdir()
    save_config(load_config(None, overrides), run / "config.yaml")
    model = mmvae.build_model("poly_test", latent_dim=6)
    mmvae.save_model(model, run / "model")
    ctx = EvalContext(run, load_config(None, overrides), model, load_config(None).eval, 0,
                      torch.device("cpu"))
    assert "needs digit modalities" in inapplicable("coherence", ctx)  # the two-modality metric
    assert inapplicable("subset_coherence", ctx) is None  # classifiers trainable: unique files
    out = evaluate_run(run, ["subset_coherence", "subset_latent"], classifier_epochs=1,
                       coherence_samples=50, batch_size=16)
    coh, lat = out["metrics"]["subset_coherence"], out["metrics"]["subset_latent"]
    assert coh["num_pairs"] == 60 and coh["joint_samples"] == 50
    cond = [k for k in coh["values"] if k.startswith("cond_")]
    assert len(cond) == 75 and "cond_m0+m1+m3+m4_to_m2" in cond
    assert [k for k in coh["values"] if k.startswith("given_")] == [f"given_{k}" for k in range(1, 5)]
    assert all(0.0 <= v <= 1.0 for v in coh["values"].values())
    assert all(coh["values"][f"given_{k}"] < 0.35 for k in range(1, 5))  # untrained: near chance
    for i in range(5):  # cached like the digit classifiers, their test accuracy reported
        cached = json.loads((shards / "classifiers" / f"m{i}.json").read_text())
        assert (shards / "classifiers" / f"m{i}.pt").is_file() and cached["test_images"] == 60
        assert coh["values"][f"classifier_m{i}"] == cached["test_accuracy"]
    assert len([k for k in lat["values"] if not k.startswith("latent_given")]) == 31
    assert lat["num_train"] == 200 and lat["num_test"] == 60
    report = (run / "report.md").read_text()
    assert "### Coherence by number of given modalities" in report
    assert "### Latent accuracy by number of given modalities" in report
    assert "| 4 | " in report and "m0+m1+m2+m3" in report
    assert "| subset_coherence / given_2 |" in report and "| subset_coherence / cond_" not in report
    saved = json.loads((run / "eval.json").read_text())
    assert saved["metrics"]["subset_coherence"]["values"] == coh["values"]
