"""MMVAE+ as `model.fusion: moe_plus` (mmvae.models.mmvae_plus): shared z plus modality-specific
w_m with auxiliary priors, as a mixture of components over u = (z, w_1..w_M).

The checks of the other fusions, for the (z, w) latents: the components' blocks, the exact
log-likelihood of the linear-Gaussian reference with private latents (IWAE K=1000 and the
formula of the marginal), the unbiased mixture DReG written by hand in fp64, its z-tests against
the IWAE gradient with the variance ratio, the latents the evaluation decodes (w of a modality
not given from r), the config keys, and a checkpoint that rebuilds the same model.
(tests/test_fusions.py and test_fusions_train.py run moe_plus through the shared checks:
k_chunk, ELBO expectation, the polydigits model, launch/train.py with P=1 and P=2.)
"""
import math

import pytest
import torch
from torch import distributions as td

import mmvae
from mmvae import objectives as O
from mmvae.config import ConfigError, load_config
from mmvae.eval import posterior_sample
from mmvae.registry import load_model, save_model
from test_fusions import (_dreg_by_hand, assert_dreg_is_the_formula,
                          assert_dreg_is_unbiased_with_lower_variance, perturb)

AUX = 2.0


def plus(M=3, private=1, exact=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3, num_modalities=M,
                              fusion="moe_plus", private_dim=private, aux_scale=AUX, **kw)
    if exact:
        model.set_exact_posterior()
    return model


def test_component_m_is_encoder_m_on_z_and_w_m_and_the_auxiliary_prior_on_the_other_w():
    model = plus(M=3, private=2)
    layout = model.layout
    assert (model.latent_dim, model.shared_dim, model.private_dim) == (2 + 3 * 2, 2, 2)
    xs = model.sample_data(4)
    for m, (expert, x) in enumerate(zip(model.experts, xs)):
        loc, scale = expert.posterior(x)
        own_loc, own_raw = expert.enc(x)
        torch.testing.assert_close(layout.own(loc, m), own_loc)
        torch.testing.assert_close(layout.own(scale, m), torch.nn.functional.softplus(own_raw) + 1e-6)
        for n in range(3):
            if n != m:
                assert torch.equal(loc[:, layout.w(n)], torch.zeros(4, 2))
                assert torch.equal(scale[:, layout.w(n)], torch.full((4, 2), AUX))


def test_decoder_m_reads_z_and_w_m_only():
    model = plus(M=3, private=2)
    u = torch.randn(5, model.latent_dim)
    for m, expert in enumerate(model.experts):
        want = expert.dec(torch.cat([u[:, :2], u[:, model.layout.w(m)]], -1))
        torch.testing.assert_close(expert.decode(u), want)
        other = u.clone()
        other[:, model.layout.w((m + 1) % 3)] += 1.0  # another modality's w: no effect
        torch.testing.assert_close(expert.decode(other), want)


def test_exact_log_likelihood_is_the_marginal_of_the_sampled_data():
    """The formula N(b, W S^2 W^T + sigma^2 I) against the moments of sample_data: the mean
    and covariance of 200k draws of (x_1..x_M) (u from the prior, x_m from (z, w_m))."""
    model = plus(M=2, private=1)
    with torch.no_grad():
        x = torch.cat(model.sample_data(200_000, generator=torch.Generator().manual_seed(0)), -1)
        W, b = model._decoder_in_u()
        s2 = model.prior_params()[1].reshape(-1) ** 2
        cov = W @ torch.diag(s2) @ W.T + 0.25 * torch.eye(6)
        torch.testing.assert_close(x.mean(0), b, atol=0.02, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), cov, atol=0.03, rtol=0.02)
        assert (W[:3, 2 + 1:] == 0).all() and (W[3:, 2:3] == 0).all()  # x_1 never reads w_2


@pytest.mark.parametrize("M,private", [(2, 1), (4, 1)])  # M = 2, 3 at w size 2: test_fusions
def test_iwae_reaches_the_exact_log_likelihood_with_private_latents(M, private):
    """K=1000 particles per component over u: within 0.05 nats of log p(x_1..x_M) on average,
    not above it (a lower bound), and tighter than one particle; the looser (stratified)
    bound is below the joint one."""
    model = plus(M=M, private=private)
    x = model.sample_data(200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model.exact_log_likelihood(x)
        gaps = {K: O.m_iwae(model, x, K) - exact for K in (1, 1000)}
        looser = O.m_iwae(model, x, 1000, looser=True) - exact
    assert gaps[1000].mean().abs() < 0.05
    assert gaps[1000].mean() < 3 * gaps[1000].std() / math.sqrt(200) + 1e-3
    assert gaps[1].mean() < gaps[1000].mean() - 0.01
    assert looser.mean() < gaps[1000].mean()


@pytest.mark.parametrize("looser", [False, True])
def test_dreg_encoder_gradient_is_the_mixture_formula_over_z_and_w_in_fp64(looser):
    """The unbiased mixture DReG by hand over u = (z, w_1..w_M) (explicit dl/du and d(alpha_r)/du,
    the path through each component's (z, w_r), the score terms of the other components at the
    r-drawn w), against the implementation, in fp64; the decoders get IWAE's gradient."""
    model = plus(M=3, private=2, learn_prior=True).double()
    assert_dreg_is_the_formula(model, lambda m, xs, eps: _dreg_by_hand(m, xs, eps, looser), looser,
                               decoder_extra=[model.prior_raw])


VARIANCE_RATIOS = {}


@pytest.mark.parametrize("looser", [False, True])
def test_dreg_is_unbiased_for_the_iwae_gradient_with_lower_variance(looser):
    """Paired over 400 draws at K=5, M=3, w of size 1: mean(DReG - IWAE) is zero within noise for
    every encoder parameter (z and w heads); stl is detectably biased (the test can catch a
    wrong estimator); DReG's encoder-gradient variance is below IWAE's."""
    VARIANCE_RATIOS[looser] = assert_dreg_is_unbiased_with_lower_variance(
        plus(M=3, private=1), looser, "moe_plus")


def test_latents_given_a_subset_draw_w_of_the_modalities_not_given_from_the_auxiliary_prior():
    """Given {x_2}: z and w_2 from encoder 2's posterior, w_1 and w_3 from r = N(0, aux^2);
    given {x_1, x_3}: z from the mixture of the two (mean of their means), w_2 from r. The
    evaluation's cross draw (posterior_sample of expert 1) decodes x_2 with w_2 from r too."""
    model = plus(M=3, private=2)
    perturb(model)
    xs = model.sample_data(2)
    layout, g = model.layout, torch.Generator().manual_seed(0)
    locs = [layout.own(e.posterior(x)[0], m) for m, (e, x) in enumerate(zip(model.experts, xs))]
    scale_1 = layout.own(model.experts[1].posterior(xs[1])[1], 1)
    u = model.latents_from_subset(xs, [1], 40000, g)
    torch.testing.assert_close(layout.own(u, 1).mean(0), locs[1].detach(), atol=0.03, rtol=0.03)
    torch.testing.assert_close(layout.own(u, 1).std(0), scale_1.detach(), atol=0.03, rtol=0.03)
    for n in (0, 2):
        torch.testing.assert_close(u[..., layout.w(n)].mean(0), torch.zeros(2, 2), atol=0.05, rtol=0)
        torch.testing.assert_close(u[..., layout.w(n)].std(0), torch.full((2, 2), AUX), atol=0.05, rtol=0.03)
    u = model.latents_from_subset(xs, [0, 2], 40000, g)
    z_mean = (locs[0][:, :2] + locs[2][:, :2]) / 2
    torch.testing.assert_close(u[..., :2].mean(0), z_mean.detach(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(u[..., layout.w(1)].std(0), torch.full((2, 2), AUX), atol=0.05, rtol=0.03)
    cross = torch.stack([posterior_sample(model.experts[0], xs[0], g) for _ in range(20000)])
    torch.testing.assert_close(cross[..., layout.w(1)].std(0), torch.full((2, 2), AUX), atol=0.06, rtol=0.03)


def test_private_dim_zero_means_latent_dim_and_bad_values_are_one_line_config_errors():
    model = mmvae.build_model("gaussian_pair", fusion="moe_plus", latent_dim=5)  # M = 2
    assert (model.private_dim, model.latent_dim) == (5, 5 + 2 * 5)
    for bad, key in (("model.private_dim=-1", "model.private_dim"), ("model.aux_scale=0", "model.aux_scale")):
        with pytest.raises(ConfigError, match=key) as err:
            load_config(None, ["model.fusion=moe_plus", bad])
        assert "\n" not in str(err.value)


def test_a_saved_moe_plus_model_is_rebuilt_with_its_private_latents(tmp_path):
    """model.json carries private_dim and aux_scale: load_model gives the same log-weights."""
    model = mmvae.build_model("mnist_svhn", latent_dim=4, fusion="moe_plus", private_dim=3,
                              aux_scale=1.5)
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    assert (again.private_dim, again.experts[1].aux_scale) == (3, 1.5)
    xs = [torch.rand(2, 1, 28, 28), torch.rand(2, 3, 32, 32)]
    eps = model.sample_noise(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(O.log_weights(again, xs, eps=eps), O.log_weights(model, xs, eps=eps))


def test_moe_plus_bounds_are_finite_and_close_under_bf16_autocast():
    """Mixed precision: the networks in bf16, the densities in fp32 with fp64 sums; the bound
    stays within bf16's rounding of the fp32 one, with finite DReG gradients."""
    model = mmvae.build_model("polydigits", latent_dim=4, fusion="moe_plus", private_dim=2)
    xs = [torch.rand(2, 3, 28, 28) for _ in range(5)]
    eps = model.sample_noise(2, 2)
    want = O.m_dreg(model, xs, eps=eps).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = O.m_dreg(model, xs, eps=eps)
    got.sum().backward()
    assert torch.allclose(got.detach(), want, rtol=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@torch.no_grad()
def test_the_likelihood_metric_evaluates_moe_plus_with_its_components_as_the_proposal():
    """The evaluation's IWAE estimates (mmvae.eval.likelihoods) under moe_plus: the joint reaches
    log p(x_1..x_3) and equals m_iwae on the same noise; 'x_d from e' (proposal q_e(u), whose
    w_d is from r_d when e != d) is a valid bound on the exact marginal log p(x_d), tight for
    e = d (component d fits p(z, w_d | x_d))."""
    from mmvae.eval.likelihoods import batch_log_likelihoods

    model = plus(M=3, private=1)
    xs = model.sample_data(200, torch.Generator().manual_seed(1))
    est = batch_log_likelihoods(model, xs, K=1000, generator=torch.Generator().manual_seed(2))
    assert abs(est["joint_no_lambda"].mean() - model.exact_log_likelihood(xs).mean()) < 0.05
    W, b = model._decoder_in_u()
    s2 = model.prior_params()[1].reshape(-1) ** 2
    for d, name in enumerate(model.modalities):
        rows = slice(3 * d, 3 * d + 3)
        cov = W[rows] @ torch.diag(s2) @ W[rows].T + 0.25 * torch.eye(3)
        marginal = td.MultivariateNormal(b[rows], cov).log_prob(xs[d]).mean()
        for other in model.modalities:
            assert est[f"x_{name}_from_{other}"].mean() < marginal + 0.05
        assert abs(est[f"x_{name}_from_{name}"].mean() - marginal) < 0.05
    eps = model.sample_noise(50, 200, torch.Generator().manual_seed(3))
    torch.testing.assert_close(batch_log_likelihoods(model, xs, eps=eps)["joint_with_lambda"],
                               O.m_iwae(model, xs, eps=eps))
