"""The gradient-SNR tool (mmvae/eval/gradsnr.py, launch/grad_snr.py) on the linear-Gaussian
reference models, where the answers are known."""
import json
import math
from pathlib import Path

import pytest
import torch

import mmvae
from mmvae import objectives as O
from mmvae.eval import gradsnr as G

ROOT = Path(__file__).resolve().parent.parent


def _model(name, latent_dim, exact=False, seed=0):
    torch.manual_seed(seed)
    model = mmvae.build_model(name, latent_dim=latent_dim, data_dim=3, learn_prior=True)
    if exact:
        model.set_exact_posterior()
    return model


def _data(model, n=16, seed=3):
    x = model.sample_data(n, generator=torch.Generator().manual_seed(seed))
    return x if isinstance(x, list) else [x]


def test_dreg_encoder_gradient_has_no_noise_when_the_posterior_is_exact_but_iwae_has():
    # One latent dimension: the mean-field fit is the exact posterior, so l(z) = log p(x) for
    # every z: the path terms vanish, only IWAE's score term is left, with mean 0 and real noise.
    model = _model("gaussian", 1, exact=True)
    res = G.measure(model, _data(model), 8, draws=30)
    iwae_sd = res["iwae"]["enc/x"]["rms_sd"]
    assert iwae_sd > 1e-2
    for variant in ("unbiased", "paper", "stl"):
        assert res[variant]["enc/x"]["rms_sd"] < 1e-4 * iwae_sd, variant
    # the decoders and the prior get the same gradient from every estimator
    for group in ("dec/x", "prior"):
        assert res["stl"][group] == pytest.approx(res["iwae"][group])


def test_iwae_encoder_snr_falls_with_K_while_the_decoder_snr_rises():
    # Rainforth et al. (2018): inference-network SNR O(1/sqrt(K)) for IWAE, generative O(sqrt(K));
    # DReG keeps the encoder SNR up.
    model = _model("gaussian", 2)
    xs = _data(model)
    low, high = (G.measure(model, xs, K, estimators=("iwae", "unbiased"), draws=100)
                 for K in (4, 256))
    assert high["iwae"]["enc/x"]["snr_median"] < 0.7 * low["iwae"]["enc/x"]["snr_median"]
    assert high["iwae"]["dec/x"]["snr_median"] > 1.5 * low["iwae"]["dec/x"]["snr_median"]
    assert high["unbiased"]["enc/x"]["snr_median"] > 2 * high["iwae"]["enc/x"]["snr_median"]


def test_summary_of_known_draws():
    m = G.Moments()
    for v in ([1.0, 0.0, 2.0], [3.0, 0.0, 2.0]):
        m.add(torch.tensor(v, dtype=torch.float64))
    s = G.summarise(m)
    # element 0: mean 2, sd sqrt(2) -> SNR sqrt(2); element 1 (all zero) is left out;
    # element 2: sd 0 with mean 2 -> infinite SNR, which the median keeps and the finite mean drops
    assert s["left_out"] == 1 and s["elements"] == 3
    assert s["snr_mean_finite"] == pytest.approx(math.sqrt(2))
    assert s["snr_median"] == math.inf


@pytest.mark.parametrize("looser", [True, False])
def test_score_part_is_the_closed_form_other_expert_score_terms_in_fp64(looser):
    model = _model("gaussian_pair", 2).double()
    xs = [x.double() for x in _data(model, n=5)]
    eps = [e.double() for e in model.sample_noise(6, 5, generator=torch.Generator().manual_seed(4))]
    groups = G.parameter_groups(model)
    grads = G.gradient(model, lambda m, x, K, eps=None: O.m_dreg_score_part(
        m, x, K, looser=looser, eps=eps), xs, 6, eps, groups)
    # by hand: loss = -mean_b S, S = -sum_{m != r} sum_k w alpha_m(z_rk) log q_m(z_rk), so the
    # loss gradient w.r.t. expert m's loc bias is mean_b sum_{r != m, k} w alpha_m (z - loc_m)/s_m^2
    with torch.no_grad():
        posts = [e.posterior(x) for e, x in zip(model.experts, xs)]
        z = torch.stack([loc + s * n for (loc, s), n in zip(posts, eps)])  # (M, K, B, D)
        lw = O.log_weights(model, xs, eps=eps)
        w = torch.softmax(lw, 1) / 2 if looser else torch.softmax(lw.reshape(-1, 5), 0).reshape(lw.shape)
        log_q = torch.stack([torch.distributions.Normal(loc, s).log_prob(z).sum(-1) for loc, s in posts])
        alpha = torch.softmax(log_q, 0)  # (M_m, M_r, K, B)
    for m, expert in enumerate(model.experts):
        loc, s = posts[m]
        r = 1 - m
        expected = ((w[r] * alpha[m, r])[..., None] * (z[r] - loc) / s**2).sum(0).mean(0)  # (D,)
        got = grads[f"enc/{expert.modality}"]  # the encoder's parameters, flattened in order
        params = dict(expert.enc.named_parameters())
        names = list(params)
        start = sum(params[n].numel() for n in names[:names.index("loc.bias")])
        torch.testing.assert_close(got[start:start + expected.numel()], expected, rtol=1e-9, atol=1e-12)
    for g in ("dec/x1", "dec/x2", "prior"):
        assert grads[g].abs().max() == 0


def test_score_part_is_zero_for_one_expert():
    model = _model("gaussian", 2)
    xs = _data(model)
    out = O.m_dreg_score_part(model, xs, 4)
    grads = torch.autograd.grad(out.sum(), list(model.enc.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)


def test_variance_decomposition_adds_up_to_the_total_variance():
    model = _model("gaussian_pair", 2)
    parts = G.decompose(model, _data(model), 8, draws=40)
    for group, p in parts.items():
        assert p["total"] > 0 and 0 < p["score"] < p["total"]
        assert p["score"] + p["rest"] + p["cov2"] == pytest.approx(p["total"], rel=1e-9), group


def test_cli_writes_every_estimator_and_group_and_refuses_a_missing_checkpoint(tmp_path, capsys):
    from mmvae.cli import grad_snr

    out = tmp_path / "snr.json"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "model.name=gaussian_pair", "model.latent_dim=2",
            "model.data_dim=3", "--draws", "5", "--K", "4", "--batch-size", "8", "--out", str(out)]
    assert grad_snr.main(argv) == 0
    payload = json.loads(out.read_text())
    (row,) = payload["points"]
    assert row["point"] == "init" and set(row["snr"]) == set(G.ESTIMATORS)
    assert set(row["snr"]["iwae"]) == {"enc/x1", "enc/x2", "dec/x1", "dec/x2", "prior"}
    assert set(row["decomposition"]) == {"enc/x1", "enc/x2"}
    capsys.readouterr()
    assert grad_snr.main(argv[:-2] + ["--points", "7", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint of step 7" in err[0]
    assert not (tmp_path / "b.json").exists()
    joint = argv[:2] + ["objective.looser=false"] + argv[2:-2] + ["--out", str(tmp_path / "c.json")]
    assert grad_snr.main(joint + ["--estimators", "unbiased,swap"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "swap needs objective.looser=true" in err[0]


def test_weight_stats_see_flat_weights_at_the_exact_posterior_and_overlap_of_the_experts():
    # exact posterior: l(z) = log p(x) for every particle, all weights equal, ESS = K
    model = _model("gaussian", 1, exact=True)
    stats = G.weight_stats(model, _data(model), 8)
    assert stats["ess_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert stats["alpha_other_max"] == 0
    # two experts that see the same z from different views overlap: alpha_m(z_rk) well above 0
    pair = _model("gaussian_pair", 2, exact=True)
    stats = G.weight_stats(pair, _data(pair), 8)
    assert 0.05 < stats["alpha_other_mean"] <= 0.5 and stats["ess_fraction"] < 1
