"""Fusions (mmvae.models.fusions): moe, mopoe, poe, moe_plus on the same estimators, for any M.

The estimators see each fusion as a uniform mixture of components (experts, or products of
experts over subsets); these tests check the components, every fusion's IWAE against the exact
log-likelihood of `gaussian_pair` with M modalities, the ELBOs' expectations, and the mixture
DReG over MoPoE's subset components: an fp64 formula test and z-tests against IWAE.
"""
import math

import pytest
import torch
from torch import distributions as td

import mmvae
from mmvae import objectives as O
from mmvae.config import FUSIONS as CONFIG_FUSIONS, ConfigError, load_config
from mmvae.models.fusions import FUSIONS, all_subsets, product_of_experts
from test_objectives import _flat_grad as _flat, _gradient_draws, _max_z  # the same draws and z-test as MoE


def pair(fusion, M=3, exact=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3, num_modalities=M,
                              fusion=fusion, **kw)
    if exact:
        model.set_exact_posterior()
    return model


def perturb(model, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.experts:
            for p in e.enc.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_config_lists_exactly_the_registered_fusions():
    assert CONFIG_FUSIONS == tuple(FUSIONS)


def test_unknown_fusion_is_a_one_line_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model.fusion='mvae'; choose one of moe, mopoe, poe, moe_plus") as err:
        load_config(None, ["model.fusion=mvae"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "gaussian", "cubIS"])
def test_a_fusion_on_a_model_without_one_is_a_config_error(name):
    with pytest.raises(ConfigError, match="set model.fusion=moe"):
        mmvae.build_model(name, fusion="poe", vocab_size=10)


def test_mopoe_has_one_component_per_non_empty_subset():
    model = pair("mopoe", M=4)
    assert all_subsets(4)[:4] == [(0,), (1,), (2,), (3,)] and len(all_subsets(4)) == 15
    xs = model.sample_data(5)
    lw = O.log_weights(model, xs, K=3)
    assert lw.shape == (15, 3, 5) and len(model.sample_noise(3, 5)) == 15
    assert O.log_weights(pair("poe", M=4), xs, K=3).shape == (1, 3, 5)
    assert O.log_weights(pair("moe", M=4), xs, K=3).shape == (4, 3, 5)


def test_product_of_experts_is_the_normalised_product_of_the_densities():
    """log N(z; PoE) - log p(z) - sum_m log q_m(z) is one constant for every z (the log of the
    normaliser), so the PoE is the renormalised product."""
    g = torch.Generator().manual_seed(0)
    posts = [(torch.randn(1, 3, generator=g, dtype=torch.float64),
              torch.rand(1, 3, generator=g, dtype=torch.float64) + 0.3) for _ in range(3)]
    prior = (torch.zeros(1, 3, dtype=torch.float64), torch.full((1, 3), 1.5, dtype=torch.float64))
    loc, scale = product_of_experts(posts, prior)
    z = torch.randn(50, 3, generator=g, dtype=torch.float64)
    gap = td.Normal(loc, scale).log_prob(z) - td.Normal(*prior).log_prob(z)
    for m_loc, m_scale in posts:
        gap = gap - td.Normal(m_loc, m_scale).log_prob(z)
    torch.testing.assert_close(gap, gap[:1].expand_as(gap))


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("M", [2, 3])
def test_iwae_of_every_fusion_reaches_the_exact_log_likelihood(fusion, M):
    """K=1000 particles per component: within 0.05 nats of log p(x_1..x_M) on average, not
    above it (a lower bound), and tighter than one particle."""
    model = pair(fusion, M)
    x = model.sample_data(200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model.exact_log_likelihood(x)
        gaps = {K: O.m_iwae(model, x, K) - exact for K in (1, 1000)}
    assert gaps[1000].mean().abs() < 0.05
    assert gaps[1000].mean() < 3 * gaps[1000].std() / math.sqrt(200) + 1e-3
    assert gaps[1].mean() < gaps[1000].mean() - 0.01


@pytest.mark.parametrize("fusion", ["mopoe", "poe", "moe_plus"])
@pytest.mark.parametrize("looser", [False, True])
def test_dreg_value_is_the_iwae_value_for_every_fusion(fusion, looser):
    model = pair(fusion)
    xs = model.sample_data(7)
    eps = model.sample_noise(10, 7)
    torch.testing.assert_close(O.m_dreg(model, xs, looser=looser, eps=eps),
                               O.m_iwae(model, xs, looser=looser, eps=eps))


def normal_log_q(zz, params):
    """[i, j, k, b] = log q_i(z_jk) for Normal components `params` [(loc, scale)]."""
    return torch.stack([td.Normal(loc, scale).log_prob(zz).sum(-1) for loc, scale in params])


def hand_particles(model, xs, eps):
    """The pieces every by-hand DReG formula starts from (Normal components, Normal likelihood
    of scale 0.5): components `posts`, S, the path z(psi) (S, K, B, D), a leaf copy `zd` of z,
    the components at fixed parameters, and at zd: log q matrix `lq` and log-weights `lw`."""
    posts = model.components([e.posterior(x) for e, x in zip(model.experts, xs)])
    S = len(posts)
    z = torch.stack([loc + scale * n for (loc, scale), n in zip(posts, eps)])  # (S, K, B, D)
    fixed = [(loc.detach(), scale.detach()) for loc, scale in posts]
    zd = z.detach().requires_grad_()
    p_loc, p_scale = model.prior_params()
    log_joint = td.Normal(p_loc.detach(), p_scale.detach()).log_prob(zd).sum(-1)
    for lam, e, x in zip(model.llik_scaling, model.experts, xs):
        log_joint = log_joint + lam * td.Normal(e.decode(zd), 0.5).log_prob(x).sum(-1)
    lq = normal_log_q(zd, fixed)
    lw = log_joint - (torch.logsumexp(lq, 0) - math.log(S))
    return posts, S, z, zd, lq, lw


def _dreg_by_hand(model, xs, eps, looser):
    """The unbiased mixture DReG surrogate written from DESIGN.md's formula, with the components
    (subset PoEs) in the place of the experts, without the implementation's hook and fresh copy:
    explicit dl/dz and d(alpha_r)/dz at fixed parameters, contracted with the path z(psi)."""
    posts, S, z, zd, lq, lw = hand_particles(model, xs, eps)
    log_q = normal_log_q
    dl_dz = torch.autograd.grad(lw.sum(), zd, retain_graph=True)[0]
    idx = torch.arange(S)
    alpha = (lq - torch.logsumexp(lq, 0)).exp()  # (S_m, S_r, K, B)
    dalpha_dz = torch.autograd.grad(alpha[idx, idx].sum(), zd)[0]
    lw, alpha = lw.detach(), alpha.detach()
    if looser:
        w = torch.softmax(lw, 1) / S
        w_soft = w * S
    else:
        w = torch.softmax(lw.reshape(-1, lw.shape[-1]), 0).reshape(lw.shape)
        w_soft = w
    own = alpha[idx, idx]
    coef = (w - w * (1 - w_soft) * own)[..., None] * dl_dz - w[..., None] * dalpha_dz
    path = (coef * z).sum((0, 1, 3))
    score = -(w[None] * alpha * log_q(z.detach(), posts))[~torch.eye(S, dtype=torch.bool)]
    return path + score.sum((0, 1))


def assert_dreg_is_the_formula(model, by_hand, looser, *, variant="unbiased", distinct_from=None,
                               encoder_extra=(), decoder_extra=()):
    """The fp64 formula check of a mixture DReG: on a perturbed fp64 `model`, 4 datapoints and 6
    particles, the encoder (+ `encoder_extra`) gradient of `m_dreg(variant)` equals
    `by_hand(model, xs, eps)`'s, differs from `distinct_from`'s (default IWAE: another estimator
    of the same mean), and the decoders (+ `decoder_extra`) get IWAE's gradient. Returns
    (xs, eps) for further checks on the same draw."""
    perturb(model)
    xs = [x.double() for x in model.sample_data(4)]
    eps = [n.double() for n in model.sample_noise(6, 4)]
    params = [p for e in model.experts for p in e.enc.parameters()] + list(encoder_extra)
    dreg = lambda: O.m_dreg(model, xs, looser=looser, variant=variant, eps=eps)  # noqa: E731
    iwae = lambda: O.m_iwae(model, xs, looser=looser, eps=eps)  # noqa: E731
    got = _flat(dreg(), params)
    torch.testing.assert_close(got, _flat(by_hand(model, xs, eps), params), rtol=1e-9, atol=1e-12)
    other = distinct_from(model, xs, eps) if distinct_from else iwae()
    assert not torch.allclose(got, _flat(other, params), rtol=1e-3)
    decoders = [p for e in model.experts for p in e.dec.parameters()] + list(decoder_extra)
    torch.testing.assert_close(_flat(dreg(), decoders), _flat(iwae(), decoders))
    return xs, eps


@pytest.mark.parametrize("looser", [False, True])
def test_mopoe_dreg_encoder_gradient_is_the_mixture_formula_in_fp64(looser):
    assert_dreg_is_the_formula(pair("mopoe", M=3, learn_prior=True).double(),
                               lambda m, xs, eps: _dreg_by_hand(m, xs, eps, looser), looser)


VARIANCE_RATIOS = {}


@pytest.mark.parametrize("fusion,looser", [("mopoe", False), ("mopoe", True), ("poe", False)])
def test_dreg_of_a_product_fusion_is_unbiased_for_the_iwae_gradient_with_lower_variance(
        fusion, looser):
    """Paired over 400 draws at K=5: mean(DReG - IWAE) is zero within noise for every encoder
    parameter; stl (no score terms, no reweighting) is detectably biased, which shows the test
    can catch a wrong estimator; DReG's encoder-gradient variance is below IWAE's."""
    model = pair(fusion, M=3, exact=True)
    VARIANCE_RATIOS[(fusion, looser)] = assert_dreg_is_unbiased_with_lower_variance(
        model, looser, fusion)


def assert_dreg_is_unbiased_with_lower_variance(model, looser, name, n=400):
    """The z-test of the unbiased mixture DReG, paired over n draws at K=5 on one datapoint of
    the perturbed `model`: mean(DReG - IWAE) within noise for every encoder parameter, stl
    caught (z > 6: the test has the power), IWAE/DReG encoder-gradient variance > 1.3.
    Returns that ratio."""
    torch.manual_seed(3)
    perturb(model)
    xs = model.sample_data(1)
    est = {v: (lambda m, xs, eps, v=v: O.m_dreg(m, xs, looser=looser, variant=v, eps=eps))
           for v in ("unbiased", "stl")}
    est["iwae"] = lambda m, xs, eps: O.m_iwae(m, xs, looser=looser, eps=eps)
    g = _gradient_draws(model, est, xs, K=5, n=n)
    ratio = (g["iwae"].var(0).sum() / g["unbiased"].var(0).sum()).item()
    print(f"{name} looser={looser}: IWAE/DReG encoder-gradient variance {ratio:.2f}, "
          f"max z unbiased {_max_z(g['unbiased'] - g['iwae']):.2f}, "
          f"stl {_max_z(g['stl'] - g['iwae']):.2f}")
    assert _max_z(g["unbiased"] - g["iwae"]) < 4.5
    assert _max_z(g["stl"] - g["iwae"]) > 6
    assert ratio > 1.3
    return ratio


@pytest.mark.parametrize("fusion", ["mopoe", "moe_plus"])
def test_mixture_elbo_is_the_mean_over_components_of_their_elbos(fusion):
    """E[mixture_elbo] = (1/S) sum_s [E_{q_s} sum_d log p(x_d|z) - KL(q_s || p)], each
    component's expectation estimated apart from many draws of it: mopoe's subset PoEs, and
    moe_plus's q_m(z, w_m) r(w_others) over u = (z, w_1..w_M) (the KL of r against p(w) in it)."""
    model = pair(fusion, M=3)
    perturb(model)
    xs = [x.expand(20000, -1) for x in model.sample_data(1)]
    with torch.no_grad():
        got = O.m_elbo(model, xs).mean()
        posts = model.components([e.posterior(x[:1]) for e, x in zip(model.experts, xs)])
        p = td.Normal(*model.prior_params())
        want = 0.0
        for loc, scale in posts:
            q = td.Normal(loc, scale)
            z = q.sample((20000,))[:, 0]  # (N, D)
            want += sum(e.log_likelihood(x[:1], z[:, None]).mean()
                        for e, x in zip(model.experts, xs))
            want -= td.kl_divergence(q, p).sum()
        want /= len(posts)
    assert abs(got - want) < 0.05 + 0.01 * abs(want)


def test_mvae_elbo_sums_the_joint_and_the_unimodal_elbos():
    """poe's ELBO: the ELBO of the joint PoE over all modalities plus, per modality m, the ELBO
    of PoE(prior, q_m) scoring x_m alone (Wu & Goodman's sub-sampled paths)."""
    model = pair("poe", M=2)
    perturb(model)
    xs = [x.expand(20000, -1) for x in model.sample_data(1)]
    with torch.no_grad():
        got = O.m_elbo(model, xs).mean()
        posts = [e.posterior(x[:1]) for e, x in zip(model.experts, xs)]
        p = td.Normal(*model.prior_params())
        want = 0.0
        for subset in [(0, 1), (0,), (1,)]:
            q = td.Normal(*product_of_experts([posts[m] for m in subset], model.prior_params()))
            z = q.sample((20000,))[:, 0]
            want += sum(model.experts[m].log_likelihood(xs[m][:1], z[:, None]).mean()
                        for m in subset)
            want -= td.kl_divergence(q, p).sum()
    assert abs(got - want) < 0.05 + 0.01 * abs(want)


@pytest.mark.parametrize("fusion", ["moe", "mopoe", "poe"])
def test_latents_from_a_subset_follow_that_subsets_posterior(fusion):
    """Product fusions: the PoE of the prior and the subset's experts; moe: the uniform mixture
    of the subset's experts (its mean is the mean of their means). Every subset, any size.
    (moe_plus's latents hold w too: tests/test_mmvae_plus.py.)"""
    model = pair(fusion, M=3)
    perturb(model)
    xs = model.sample_data(2)
    posts = [e.posterior(x) for e, x in zip(model.experts, xs)]
    for subset in ([1], [0, 2], [0, 1, 2]):
        z = model.latents_from_subset(xs, subset, 20000, torch.Generator().manual_seed(0))
        assert z.shape == (20000, 2, 2)
        if FUSIONS[fusion].product:
            loc, scale = product_of_experts([posts[m] for m in subset], model.prior_params())
            torch.testing.assert_close(z.std(0), scale.detach().expand(2, 2), atol=0.03, rtol=0.03)
        else:
            loc = sum(posts[m][0] for m in subset) / len(subset)
        torch.testing.assert_close(z.mean(0), loc.detach(), atol=0.05, rtol=0.05)
    subset_only = model.latents_from_subset([xs[2]], [2], 5, torch.Generator().manual_seed(0))
    assert torch.equal(subset_only, model.latents_from_subset(xs, [2], 5,
                                                              torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("fusion,S", [("moe", 5), ("mopoe", 31), ("poe", 1), ("moe_plus", 5)])
def test_polydigits_model_takes_five_images_under_any_fusion(fusion, S):
    """configs/demo_poly.yaml's model with any fusion: five 3x28x28 experts m0..m4, S components
    of K particles each, equal likelihood scaling, a finite DReG gradient at every encoder."""
    cfg = load_config("configs/demo_poly.yaml", [f"model.fusion={fusion}", "model.latent_dim=4"])
    assert (cfg.model.name, cfg.data.builtin) == ("polydigits", "polydigits")
    model = mmvae.build_model("polydigits", latent_dim=4, fusion=fusion)
    assert model.modalities == ["m0", "m1", "m2", "m3", "m4"] and model.llik_scaling == [1.0] * 5
    xs = [torch.rand(2, 3, 28, 28) for _ in range(5)]
    assert O.log_weights(model, xs, K=2).shape == (S, 2, 2)
    O.m_dreg(model, xs, K=1, looser=True).sum().backward()
    for e in model.experts:
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in e.enc.parameters())
    assert [g.shape for g in model.generate(3)] == [(3, 3, 28, 28)] * 5


@pytest.mark.parametrize("fusion", ["mopoe", "poe", "moe_plus"])
@pytest.mark.parametrize("objective", ["iwae", "dreg"])
@pytest.mark.parametrize("looser", [False, True])
def test_k_chunks_give_the_unchunked_value_and_gradient_for_every_fusion(fusion, objective,
                                                                         looser):
    """The same two-pass machinery as moe (mmvae.parallel): the components' normalisers from
    pass 1, each chunk's share of the surrogate in pass 2; fp64, learned prior included."""
    from mmvae.parallel import backward_objective

    model = pair(fusion, M=3, learn_prior=True).double()
    perturb(model)
    xs = [x.double() for x in model.sample_data(3)]
    eps = [e.double() for e in model.sample_noise(6, 3)]
    estimator = O.select(objective, True, looser=looser)
    results = []
    for k_chunk in (0, 4):  # all at once; chunks of 4 + 2
        model.zero_grad(set_to_none=True)
        value = backward_objective(estimator, model, xs, eps, looser=looser, k_chunk=k_chunk,
                                   backward=lambda loss, last: loss.backward())
        results.append((value, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (v_full, g_full), (v_chunk, g_chunk) = results
    torch.testing.assert_close(v_chunk, v_full)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in g_full)  # encoders, decoders and the prior all move


def test_building_a_model_with_an_unknown_fusion_names_the_valid_ones():
    with pytest.raises(ConfigError, match="model.fusion='mvae' is not a fusion; valid: moe, mopoe, poe, moe_plus"):
        mmvae.build_model("gaussian_pair", fusion="mvae")
