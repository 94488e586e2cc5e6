"""Estimators against analytic answers and against each other (DESIGN.md "Estimators")."""
import math

import pytest
import torch
from torch import distributions as td

from mmvae import objectives as O


def _xs(x):
    return x if isinstance(x, list) else [x]


def _perturb_encoders(model, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.experts:
            for p in e.enc.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["gaussian", "gaussian_pair"])
def test_iwae_approaches_exact_log_likelihood_from_below(name, request):
    model = request.getfixturevalue(name)
    x = model.sample_data(200, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model.exact_log_likelihood(x)
        gaps = {K: O.m_iwae(model, _xs(x), K) - exact for K in (1, 1000)}
    assert gaps[1000].abs().mean() < 0.05  # a few hundredths of a nat per datapoint
    se = gaps[1000].std() / math.sqrt(200)
    assert gaps[1000].mean() < 3 * se + 1e-3  # a lower bound: not above the exact value
    assert gaps[1].mean() < gaps[1000].mean() - 0.05  # tighter with more particles


def test_iwae_with_one_particle_is_the_single_sample_elbo(gaussian):
    x = gaussian.sample_data(5)
    eps = gaussian.sample_noise(1, 5)
    with torch.no_grad():
        value = O.iwae(gaussian, x, eps=eps)
        loc, scale = gaussian.posterior(x)
        z = loc + scale * eps[0][0]
        p_loc, p_scale = gaussian.prior_params()
        expected = (td.Normal(gaussian.decode(z), 0.5).log_prob(x).sum(-1)
                    + td.Normal(p_loc, p_scale).log_prob(z).sum(-1)
                    - td.Normal(loc, scale).log_prob(z).sum(-1))
    assert value.dtype == torch.float64  # log-weights and bounds are fp64 (mmvae.dists.log_sum)
    torch.testing.assert_close(value, expected.double(), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("looser", [False, True])
@pytest.mark.parametrize("variant", ["unbiased", "paper", "stl"])
def test_dreg_value_is_the_iwae_value(gaussian_pair, looser, variant):
    xs = gaussian_pair.sample_data(7)
    eps = gaussian_pair.sample_noise(10, 7)
    a = O.m_iwae(gaussian_pair, xs, looser=looser, eps=eps)
    b = O.m_dreg(gaussian_pair, xs, looser=looser, variant=variant, eps=eps)
    torch.testing.assert_close(a, b)
    assert a.shape == (7,)


def test_looser_bound_is_below_the_joint_bound(gaussian_pair):
    # Per sample by concavity of log, hence also in expectation.
    _perturb_encoders(gaussian_pair)
    xs = gaussian_pair.sample_data(50)
    eps = gaussian_pair.sample_noise(8, 50)
    with torch.no_grad():
        joint = O.m_iwae(gaussian_pair, xs, eps=eps)
        looser = O.m_iwae(gaussian_pair, xs, looser=True, eps=eps)
    assert (looser <= joint + 1e-5).all()
    assert (joint - looser).mean() > 1e-3


def _encoder_params(model):
    return [p for e in model.experts for p in e.enc.parameters()]


def _flat_grad(value, params, retain=False):
    """d value.sum() / d params, flattened; a parameter off the graph gets zeros."""
    grads = torch.autograd.grad(value.sum(), params, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])


def test_dreg_encoder_gradient_is_the_doubly_reparameterised_one(gaussian):
    """Against DReG written out by hand: sum_k w_k^2 dl/dz dz/dphi, q's parameters fixed in l.
    The paper code's hook never fires and would give sum_k w_k dl/dz dz/dphi instead."""
    _perturb_encoders(gaussian)
    x = gaussian.sample_data(4)
    eps = gaussian.sample_noise(6, 4)
    params = _encoder_params(gaussian)
    got = _flat_grad(O.dreg(gaussian, x, eps=eps), params)

    loc, scale = gaussian.posterior(x)
    z = loc + scale * eps[0]  # (K, B, D)
    p_loc, p_scale = gaussian.prior_params()
    lw = (td.Normal(gaussian.decode(z), 0.5).log_prob(x).sum(-1)
          + td.Normal(p_loc, p_scale).log_prob(z).sum(-1)
          - td.Normal(loc.detach(), scale.detach()).log_prob(z).sum(-1))
    w = torch.softmax(lw.detach(), 0)
    expected = _flat_grad((w**2 * lw).sum(0), params, retain=True)
    stl = _flat_grad((w * lw).sum(0), params)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, stl, rtol=1e-3, atol=1e-5)


def _loop_draws(model, estimators, xs, eps_list, **kw):
    """The reference: one forward and backward per draw and estimator (slow: n x len(estimators)
    passes at batch B); `eps_list` holds each draw's noise."""
    params = _encoder_params(model)
    return {key: torch.stack([_flat_grad(fn(model, xs, eps, **kw), params) for eps in eps_list])
            for key, fn in estimators.items()}


def _leaves(out, keep):
    """`out` (a tensor or a tuple/list of them) with each tensor cut off its graph as a new
    leaf, appended to `keep`: the encoder's parameters drop out of the estimator's graph."""
    if torch.is_tensor(out):
        leaf = out.detach().requires_grad_()
        keep.append(leaf)
        return leaf
    return type(out)(_leaves(o, keep) for o in out)


def _tensors(out):
    """The tensors of an encoder's output, in the order `_leaves` visits them."""
    return [out] if torch.is_tensor(out) else [t for o in out for t in _tensors(o)]


def _encoder_jacobians(model, xs):
    """Per expert m: (B, O_m, P_m), d enc_m(x_i) (outputs flattened) / d
    enc_m's parameters at each sample i of `xs` (O_m backward passes: a few latent sizes)."""
    jac = []
    for e, x in zip(model.experts, xs):
        params = list(e.enc.parameters())
        rows = []
        for i in range(x.shape[0]):
            flat = torch.cat([o.reshape(-1) for o in _tensors(e.enc(x[i:i + 1]))])
            rows.append(torch.stack([_flat_grad(o, params, retain=True) for o in flat]))
        jac.append(torch.stack(rows))
    return jac


def _batched_draws(model, estimators, xs, eps_list, present=None):
    """`_loop_draws` in one pass per estimator: the B samples replicated once per draw along
    the batch (draw-major), each copy with its own draw's noise. The estimators are per sample
    (their normalisers and DReG's hooks on z act within a sample), so one backward of the
    summed value to the encoders' *outputs* (cut off as leaves by forward hooks) gives every
    draw's output gradient g_b; the encoders see the same x in every copy, so the parameter
    gradient of draw b is g_b @ J with J (`_encoder_jacobians`) computed once. Exact only for
    encoder parameters (the set `_encoder_params` tests) whose sole path is enc(x); the hooks
    check that every call sees the replicated batch. `test_batched_draws_equal_...` pins it."""
    n, B = len(eps_list), xs[0].shape[0]
    big_xs = [x.repeat(n, *([1] * (x.dim() - 1))) for x in xs]
    eps = [torch.cat(parts, 1) for parts in zip(*eps_list)]  # (K, n B, D), draw-major
    kw = {} if present is None else {"present": present.repeat(n, 1)}
    jac = _encoder_jacobians(model, xs)
    calls = []

    def capture(m):
        def hook(module, inputs, out):
            assert torch.equal(inputs[0], big_xs[m]), "an encoder saw other than the batch"
            if not torch.is_grad_enabled():
                return None  # a call off the graph (no_grad) gives the parameters nothing
            keep = []
            out = _leaves(out, keep)
            calls.append((m, keep))
            return out
        return hook

    handles = [e.enc.register_forward_hook(capture(m)) for m, e in enumerate(model.experts)]
    draws = {}
    try:
        for key, fn in estimators.items():
            calls.clear()
            value = fn(model, big_xs, eps, **kw)
            leaves = [t for _, keep in calls for t in keep]
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
            per_expert = [torch.zeros(n, B, j.shape[1], dtype=j.dtype) for j in jac]
            at = 0
            for m, keep in calls:  # an encoder may be called more than once: sum its calls
                flat = [(g if g is not None else torch.zeros_like(t)).reshape(n, B, -1)
                        for g, t in zip(grads[at:at + len(keep)], keep)]
                per_expert[m] += torch.cat(flat, -1).to(per_expert[m].dtype)
                at += len(keep)
            draws[key] = torch.cat([torch.einsum("nbo,bop->np", g, j)
                                    for g, j in zip(per_expert, jac)], 1)
    finally:
        for h in handles:
            h.remove()
    return draws


def _gradient_draws(model, estimators, xs, K, n, present=None):
    """n paired draws of each estimator's encoder gradient (n, P) on the samples `xs` (one, or a
    fixed tiny batch whose gradient sums over it), every estimator on the same noise per draw."""
    eps_list = [model.sample_noise(K, xs[0].shape[0]) for _ in range(n)]
    return _batched_draws(model, estimators, xs, eps_list, present)


def _max_z(diff):
    return (diff.mean(0) / (diff.std(0) / math.sqrt(diff.shape[0]) + 1e-12)).abs().max().item()


@pytest.mark.parametrize("name,looser", [("gaussian", False), ("gaussian_pair", False),
                                         ("gaussian_pair", True)])
def test_dreg_is_unbiased_for_the_iwae_gradient_with_lower_variance(name, looser, request):
    """Paired over 1000 draws: mean(DReG - IWAE) is zero within noise for every encoder
    parameter; the paper code's effective estimator (stl) is detectably biased, which shows the
    test has the power to catch a wrong estimator."""
    model = request.getfixturevalue(name)
    torch.manual_seed(3)
    _perturb_encoders(model)
    xs = _xs(model.sample_data(1))
    estimators = {v: (lambda m, xs, eps, v=v: O.m_dreg(m, xs, looser=looser, variant=v, eps=eps))
                  for v in ("unbiased", "stl")}
    estimators["iwae"] = lambda m, xs, eps: O.m_iwae(m, xs, looser=looser, eps=eps)
    g = _gradient_draws(model, estimators, xs, K=5, n=1000)
    assert _max_z(g["unbiased"] - g["iwae"]) < 4.5
    assert _max_z(g["stl"] - g["iwae"]) > 6
    assert g["iwae"].var(0).sum() > 1.3 * g["unbiased"].var(0).sum()


def test_paper_dreg_variant_is_biased_for_the_looser_mixture_bound(gaussian_pair):
    torch.manual_seed(3)
    _perturb_encoders(gaussian_pair)
    xs = gaussian_pair.sample_data(1)
    g = _gradient_draws(gaussian_pair, {
        "paper": lambda m, xs, eps: O.m_dreg(m, xs, looser=True, variant="paper", eps=eps),
        "iwae": lambda m, xs, eps: O.m_iwae(m, xs, looser=True, eps=eps)}, xs, K=20, n=1000)
    assert _max_z(g["paper"] - g["iwae"]) > 6


def test_elbo_matches_monte_carlo_elbo_in_expectation(gaussian):
    _perturb_encoders(gaussian)
    x = gaussian.sample_data(1).expand(20000, -1)
    with torch.no_grad():
        analytic = O.elbo(gaussian, x).mean()
        mc = O.iwae(gaussian, x, K=1).mean()  # single-sample log-weights: the same expectation
    assert abs(analytic - mc) < 0.05


def test_m_elbo_cross_terms_are_importance_sampled_expectations(gaussian_pair):
    """E[m_elbo] = (1/M) sum_r [sum_d lambda_d E_{q_r} log p_d(x_d|z) - KL(q_r||p)]."""
    _perturb_encoders(gaussian_pair)
    model = gaussian_pair
    xs = [x.expand(40000, -1) for x in model.sample_data(1)]
    with torch.no_grad():
        got = O.m_elbo(model, xs).mean()
        p_loc, p_scale = model.prior_params()
        expected = 0.0
        for expert, x in zip(model.experts, xs):
            loc, scale = expert.posterior(x)
            z = td.Normal(loc, scale).sample()
            expected += sum(lam * e.log_likelihood(xd, z).mean()
                            for lam, e, xd in zip(model.llik_scaling, model.experts, xs))
            expected -= td.kl_divergence(td.Normal(loc, scale),
                                         td.Normal(p_loc, p_scale)).sum(-1).mean()
        expected /= 2
    assert abs(got - expected) < 0.1 + 0.02 * abs(expected)


@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_fixed_scale_likelihood_matches_torch_distributions(family):
    from mmvae.models.vae import LocScaleLikelihood

    x, out = torch.rand(4, 3, 5, 5), torch.rand(2, 4, 3, 5, 5)
    lik = LocScaleLikelihood(family, 0.75)
    dist = {"laplace": td.Laplace, "normal": td.Normal}[family](out.double(), 0.75)
    got = lik.log_prob_sum(x, out, 3)
    assert got.dtype == torch.float64  # summed in fp64 from fp32 terms
    torch.testing.assert_close(got, dist.log_prob(x.double()).sum((-3, -2, -1)), rtol=1e-6,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_weights_stay_fp64_under_half_precision_autocast(dtype):
    """bf16/fp16 networks: the bound is still summed in fp64, finite, within 1% of fp32, and its
    (DReG) gradient reaches every network finite."""
    import mmvae

    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=8, learn_prior=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 1, 28, 28, generator=g), torch.rand(4, 3, 32, 32, generator=g)]
    eps = model.sample_noise(3, 4, generator=g)
    with torch.no_grad():
        full = O.m_iwae(model, xs, eps=eps)
    with torch.autocast("cpu", dtype=dtype):
        half = O.m_dreg(model, xs, looser=True, eps=eps)
        joint = O.m_iwae(model, xs, eps=eps)
    assert half.dtype == joint.dtype == torch.float64
    assert ((joint.detach() - full).abs() / full.abs()).max() < 0.01
    half.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("n", [20, 784, 3072])
def test_log_sum_is_the_fp64_sum_of_the_fp32_terms(n):
    """Short sums in fp64 directly, long ones as fp32 blocks accumulated in fp64: both within
    1e-7 relative of the exact sum (an fp32 ulp at ~-5e3 nats is 1e-7 relative), fp64 out, and
    the gradient reaches the terms in their own dtype."""
    from mmvae.dists import log_sum

    terms = (-4 * torch.rand(2, 5, n, generator=torch.Generator().manual_seed(n))).requires_grad_()
    got = log_sum(terms)
    exact = terms.detach().double().sum(-1)
    assert got.dtype == torch.float64 and got.shape == (2, 5)
    assert ((got.detach() - exact).abs() / exact.abs()).max() < 1e-7
    got.sum().backward()
    assert terms.grad.dtype == torch.float32 and torch.equal(terms.grad, torch.ones_like(terms))
