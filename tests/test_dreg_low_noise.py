"""The `cv` and `swap` mixture DReG variants (objectives._low_noise_terms, docs/estimators.md):
their gradient is the formula of the docstring (fp64, against a direct autograd computation),
their mean is the IWAE gradient, their encoder-gradient variance is below `unbiased`'s, and
K-chunks give the one-chunk gradient; for moe and mopoe (subset-product components); with
missing modalities (a presence mask) still unbiased for the masked IWAE gradient."""
import math

import pytest
import torch
from torch import distributions as td

import mmvae
from mmvae import objectives as O
from mmvae.parallel import backward_objective
from test_fusions import assert_dreg_is_the_formula, hand_particles, normal_log_q, pair, perturb
from test_objectives import (_batched_draws, _flat_grad as _flat, _gradient_draws, _loop_draws,
                             _max_z)


def _by_hand(model, xs, eps, looser, variant):
    """The variant's surrogate from the formula, with Normal components written out: the path
    terms and the own-expert alpha term of `unbiased` (explicit dl/dz and d alpha/dz at fixed
    parameters, contracted with z(psi)), then for the other experts (r != m, same k):
    cv   -(w_rk - beta) alpha_m(z_rk) log q_m(z_rk) [z fixed] - beta d alpha_r(z_mk)/dz . z_mk,
    swap -(1/M) d[alpha_r h_rk](z_mk)/dz . z_mk, h_rk(u) = e^l(u) / (sum_{j != k} e^l(z_rj)
         + e^l(u)), the leave-one-out sum taken directly (not from the normaliser)."""
    posts, S, z, zd, lq, lw = hand_particles(model, xs, eps)
    K, log_q = eps[0].shape[0], normal_log_q
    p_loc, p_scale = model.prior_params()
    alpha = (lq - torch.logsumexp(lq, 0)).exp()
    dl_dz = torch.autograd.grad(lw.sum(), zd, retain_graph=True)[0]
    idx = torch.arange(S)
    dalpha_own = torch.autograd.grad(alpha[idx, idx].sum(), zd, retain_graph=True)[0]
    lw_, alpha_ = lw.detach(), alpha.detach()
    if looser:
        w = torch.softmax(lw_, 1) / S
    else:
        w = torch.softmax(lw_.reshape(-1, lw_.shape[-1]), 0).reshape(lw_.shape)
    w_soft = w * S if looser else w
    coef = (w - w * (1 - w_soft) * alpha_[idx, idx])[..., None] * dl_dz - w[..., None] * dalpha_own
    total = (coef * z).sum((0, 1, 3))
    # the prior's own part (theta): sum w grad log p(z), z fixed
    total = total + (w * td.Normal(p_loc, p_scale).log_prob(z.detach()).sum(-1)).sum((0, 1))
    off = ~torch.eye(S, dtype=torch.bool)
    if variant == "cv":
        beta = 1 / (S * K)
        total = total - ((w - beta)[None] * alpha_ * log_q(z.detach(), posts))[off].sum((0, 1))
        for r in range(S):
            for m in range(S):
                if r != m:  # d alpha_r(u)/du at u = z_mk, contracted with the path of z_mk
                    g = torch.autograd.grad(alpha[r, m].sum(), zd, retain_graph=True)[0][m]
                    total = total - beta * (g * z[m]).sum((0, 2))
        return total
    for r in range(S):
        for m in range(S):
            if r == m:
                continue
            for k in range(K):
                others = [j for j in range(K) if j != k]
                log_a = torch.logsumexp(lw_[r, others], 0) if others else torch.full_like(
                    lw_[r, k], -math.inf)
                h = torch.exp(lw[m, k] - torch.logaddexp(log_a, lw[m, k]))  # on zd's graph
                g = torch.autograd.grad((alpha[r, m, k] * h).sum(), zd, retain_graph=True)[0]
                total = total - (g[m, k] * z[m, k]).sum(-1) / S
    return total


CASES = [("moe", 2, False, "cv"), ("moe", 2, True, "cv"), ("moe", 2, True, "swap"),
         ("mopoe", 3, False, "cv"), ("mopoe", 3, True, "cv"), ("mopoe", 3, True, "swap")]


@pytest.mark.parametrize("fusion,M,looser,variant", CASES)
def test_encoder_gradient_is_the_variants_formula_in_fp64(fusion, M, looser, variant):
    """A learned prior, so mopoe's components also depend on the prior's parameters."""
    model = pair(fusion, M=M, learn_prior=True).double()
    xs, eps = assert_dreg_is_the_formula(
        model, lambda m, xs, eps: _by_hand(m, xs, eps, looser, variant), looser, variant=variant,
        distinct_from=lambda m, xs, eps: O.m_dreg(m, xs, looser=looser, eps=eps),  # unbiased
        encoder_extra=[model.prior_raw])
    torch.testing.assert_close(O.m_dreg(model, xs, looser=looser, variant=variant, eps=eps),
                               O.m_iwae(model, xs, looser=looser, eps=eps))  # the same value


VARIANCES = {}


@pytest.mark.parametrize("fusion,M,looser,variant", CASES)
def test_variant_is_unbiased_for_the_iwae_gradient_with_less_variance_than_unbiased(
        fusion, M, looser, variant):
    """Paired over 1000 draws at K=5: mean(variant - IWAE) is zero within noise for every
    encoder parameter (stl, biased, is caught at z > 6 on the same draws: the test has the
    power), and the variant's encoder-gradient variance (trace) is below `unbiased`'s."""
    model = pair(fusion, M=M)
    torch.manual_seed(3)
    perturb(model)
    xs = model.sample_data(1)
    est = {v: (lambda m, xs, eps, v=v: O.m_dreg(m, xs, looser=looser, variant=v, eps=eps))
           for v in ("unbiased", "stl", variant)}
    est["iwae"] = lambda m, xs, eps: O.m_iwae(m, xs, looser=looser, eps=eps)
    g = _gradient_draws(model, est, xs, K=5, n=1000)
    var = {k: v.var(0).sum().item() for k, v in g.items()}
    VARIANCES[(fusion, looser, variant)] = var
    print(f"{fusion} looser={looser} {variant}: encoder-gradient variance (trace) "
          + ", ".join(f"{k} {v:.3g}" for k, v in var.items())
          + f"; max z {variant} {_max_z(g[variant] - g['iwae']):.2f}, "
            f"stl {_max_z(g['stl'] - g['iwae']):.2f}")
    assert _max_z(g[variant] - g["iwae"]) < 4.5
    assert _max_z(g["stl"] - g["iwae"]) > 6
    assert var[variant] < 0.95 * var["unbiased"]


MASKED = [("moe", False, "cv"), ("moe", True, "swap"), ("moe_plus", False, "cv"),
          ("moe_plus", True, "swap")]


@pytest.mark.parametrize("fusion,looser,variant", MASKED)
def test_variant_with_missing_modalities_is_unbiased_for_the_masked_iwae_gradient(
        fusion, looser, variant):
    """Two samples over M = 3, one lacking x2 and one x1 (zero placeholders), fp64, paired over
    1000 draws at K=4: mean(variant - masked IWAE) is zero within noise for every encoder
    parameter, while stl on the same draws is caught (z > 6)."""
    model = pair(fusion, M=3).double()
    torch.manual_seed(3)
    perturb(model)
    present = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    xs = [torch.where(present[:, m, None], x.double(), torch.zeros_like(x.double()))
          for m, x in enumerate(model.sample_data(2))]
    est = {v: (lambda m, xs, eps, present, v=v: O.m_dreg(m, xs, looser=looser, variant=v,
                                                           eps=eps, present=present))
           for v in ("stl", variant)}
    est["iwae"] = lambda m, xs, eps, present: O.m_iwae(m, xs, looser=looser, eps=eps,
                                                        present=present)
    g = _gradient_draws(model, est, xs, K=4, n=1000, present=present)
    print(f"{fusion} looser={looser} {variant} with a mask: max z "
          f"{_max_z(g[variant] - g['iwae']):.2f}, stl {_max_z(g['stl'] - g['iwae']):.2f}")
    assert _max_z(g[variant] - g["iwae"]) < 4.5
    assert _max_z(g["stl"] - g["iwae"]) > 6


BATCHED = [("gaussian", 1, False, ("unbiased", "stl"), False),
           ("moe", 2, False, ("unbiased", "stl", "cv"), False),
           ("moe", 2, True, ("paper", "swap"), False),
           ("mopoe", 3, False, ("unbiased", "stl", "cv"), False),
           ("mopoe", 3, True, ("unbiased", "swap"), False),
           ("poe", 3, False, ("unbiased", "stl"), False),
           ("moe_plus", 3, True, ("unbiased", "stl", "swap"), False),
           ("moe", 3, False, ("stl", "cv"), True), ("moe", 3, True, ("unbiased", "swap"), True),
           ("mopoe", 3, True, ("unbiased", "cv"), True), ("poe", 3, False, ("unbiased",), True),
           ("moe_plus", 3, False, ("stl", "cv"), True), ("moe_plus", 3, True, ("swap",), True)]


@pytest.mark.parametrize("fusion,M,looser,variants,masked", BATCHED)
def test_batched_draws_equal_one_backward_per_draw_in_fp64(fusion, M, looser, variants, masked):
    """The z-tests' draws (`_gradient_draws`: the samples replicated per draw, one backward to
    the encoder outputs, then the encoders' Jacobian) are, draw by draw, the encoder gradients
    of a separate forward and backward per draw on the same noise, for every estimator family;
    with a mask, a fixed pair of samples, each lacking a modality."""
    if fusion == "gaussian":
        torch.manual_seed(0)
        model = mmvae.build_model("gaussian", latent_dim=2, data_dim=3)
        model.set_exact_posterior()
    else:
        model = pair(fusion, M=M)
    model = model.double()
    perturb(model)
    B, kw = (2, {"present": torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)}) if masked \
        else (1, {})
    data = model.sample_data(B)
    xs = [x.double() for x in (data if isinstance(data, list) else [data])]
    if masked:
        xs = [torch.where(kw["present"][:, m, None], x, torch.zeros_like(x))
              for m, x in enumerate(xs)]
    est = {v: (lambda m, xs, eps, v=v, **kw: O.m_dreg(m, xs, looser=looser, variant=v, eps=eps,
                                                      **kw)) for v in variants}
    est["iwae"] = lambda m, xs, eps, **kw: O.m_iwae(m, xs, looser=looser, eps=eps, **kw)
    eps_list = [[e.double() for e in model.sample_noise(4, B)] for _ in range(3)]
    want = _loop_draws(model, est, xs, eps_list, **kw)
    got = _batched_draws(model, est, xs, eps_list, **kw)
    for key in est:
        assert not torch.allclose(want[key][0], want[key][1])  # the draws differ
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fusion,M,looser,variant", CASES)
def test_k_chunks_give_the_unchunked_gradient(fusion, M, looser, variant):
    """Chunks of 4 + 2 particles (the normalisers from pass 1): the terms pair z_rk with z_mk of
    the same k, which a chunk holds for every component, so the sum is the one-pass gradient."""
    model = pair(fusion, M=M, learn_prior=True).double()
    perturb(model)
    xs = [x.double() for x in model.sample_data(3)]
    eps = [e.double() for e in model.sample_noise(6, 3)]
    estimator = O.select("dreg", True, looser=looser, variant=variant)
    grads = []
    for k_chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        backward_objective(estimator, model, xs, eps, looser=looser, k_chunk=k_chunk,
                           backward=lambda loss, last: loss.backward())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_swap_on_the_joint_bound_is_a_one_line_error_naming_cv():
    model = pair("moe", M=2)
    with pytest.raises(ValueError, match="needs the looser .* use variant 'cv'"):
        O.m_dreg(model, model.sample_data(2), K=3, variant="swap")


def test_one_component_has_no_other_experts_so_the_variants_are_dreg():
    """poe (one product component): nothing to replace; cv and swap give `unbiased`."""
    model = pair("poe", M=3)
    perturb(model)
    xs, eps = model.sample_data(3), model.sample_noise(5, 3)
    params = [p for e in model.experts for p in e.enc.parameters()]
    want = _flat(O.m_dreg(model, xs, looser=True, eps=eps), params)
    for variant in ("cv", "swap"):
        torch.testing.assert_close(
            _flat(O.m_dreg(model, xs, looser=True, variant=variant, eps=eps), params), want)


@pytest.mark.parametrize("variant,dtype", [("cv", torch.bfloat16), ("cv", torch.float16),
                                           ("swap", torch.bfloat16)])
def test_variants_give_finite_gradients_to_every_network_under_half_precision(variant, dtype):
    """The demo model under bf16/fp16 autocast: the swap scale of the path hook (formed in log
    space, up to 1/w) and cv's terms stay finite, and the encoder gradient is as close to its
    fp32 value on the same noise as `unbiased`'s is to its own (half-precision log-weights move
    the weights themselves by several percent). Not swap under fp16: its 1/w scale meets
    gradients fp16 has flushed to zero (14% off here), so config refuses that pair."""
    import mmvae

    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=8, learn_prior=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 1, 28, 28, generator=g), torch.rand(4, 3, 32, 32, generator=g)]
    eps = model.sample_noise(3, 4, generator=g)
    params = [p for e in model.experts for p in e.enc.parameters()]
    errors = {}
    for v in ("unbiased", variant):
        full = _flat(O.m_dreg(model, xs, looser=True, variant=v, eps=eps), params)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype):
            out = O.m_dreg(model, xs, looser=True, variant=v, eps=eps)
        out.sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads), v
        half = torch.cat([p.grad.reshape(-1) for p in params])
        errors[v] = ((half - full).norm() / full.norm()).item()
    assert errors[variant] < 1.5 * errors["unbiased"] + 0.01, errors
