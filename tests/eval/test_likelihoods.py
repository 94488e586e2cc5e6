"""IWAE log-likelihood estimates against exact values on the linear-Gaussian references."""
import pytest
import torch

import mmvae
from mmvae.eval.likelihoods import batch_log_likelihoods, calculate_likelihoods
from mmvae.models.toy import SIGMA_X
from mmvae.objectives import m_iwae


def exact_marginal(model, d, x):
    """log p(x_d) = log N(x_d; b_d, W_d S^2 W_d^T + sigma^2 I) of expert d."""
    expert = model.experts[d]
    W, b = expert.dec.linear.weight, expert.dec.linear.bias
    s2 = model.prior_params()[1].reshape(-1) ** 2
    cov = W @ torch.diag(s2) @ W.T + SIGMA_X**2 * torch.eye(W.shape[0])
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


@pytest.fixture
def pair_lambda():
    """gaussian_pair with lambda_1 = 2, so the scaled and the unscaled joint bounds differ."""
    torch.manual_seed(0)
    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3, llik_scaling=2.0)
    model.set_exact_posterior()
    return model


@torch.no_grad()
def test_joint_and_marginals_match_exact_log_likelihood(pair_lambda):
    model = pair_lambda
    gen = torch.Generator().manual_seed(1)
    xs = model.sample_data(200, gen)
    est = batch_log_likelihoods(model, xs, K=1000, generator=gen)
    exact = model.exact_log_likelihood(xs).mean().item()
    assert abs(est["joint_no_lambda"].mean().item() - exact) < 0.05
    for d, name in enumerate(model.modalities):
        marginal = exact_marginal(model, d, xs[d]).mean().item()
        assert abs(est[f"x_{name}_from_mixture"].mean().item() - marginal) < 0.05
        # q_d fits p(z | x_d): its own encoder is a good proposal for log p(x_d) too
        assert abs(est[f"x_{name}_from_{name}"].mean().item() - marginal) < 0.05
        # another encoder's proposal gives a valid but looser bound
        other = model.modalities[1 - d]
        assert est[f"x_{name}_from_{other}"].mean().item() < marginal + 0.05
    # lambda_1 = 2 weights log p(x_1|z) twice: the scaled "joint" is far from log p(x1, x2)
    assert abs(est["joint_with_lambda"].mean().item() - exact) > 1.0


@torch.no_grad()
def test_joint_with_lambda_is_m_iwae_on_the_same_noise(pair_lambda):
    model = pair_lambda
    gen = torch.Generator().manual_seed(2)
    xs = model.sample_data(16, gen)
    eps = model.sample_noise(50, 16, gen)
    est = batch_log_likelihoods(model, xs, eps=eps)
    torch.testing.assert_close(est["joint_with_lambda"], m_iwae(model, xs, eps=eps))


@torch.no_grad()
def test_chunked_equals_unchunked(gaussian_pair):
    model = gaussian_pair
    gen = torch.Generator().manual_seed(3)
    xs = model.sample_data(32, gen)
    eps = model.sample_noise(100, 32, gen)
    whole = batch_log_likelihoods(model, xs, eps=eps, k_chunk=0)
    chunked = batch_log_likelihoods(model, xs, eps=eps, k_chunk=7)  # 7 does not divide 100
    assert whole.keys() == chunked.keys() and len(whole) == 2 + 2 + 4
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], atol=1e-4, rtol=0)


@torch.no_grad()
def test_calculate_likelihoods_averages_seeds_and_limits(gaussian_pair):
    model = gaussian_pair
    xs = model.sample_data(30, torch.Generator().manual_seed(4))
    batches = [[x[i:i + 8] for x in xs] for i in range(0, 30, 8)]
    a = calculate_likelihoods(model, batches, K=20, k_chunk=6, seed=5)
    b = calculate_likelihoods(model, batches, K=20, k_chunk=20, seed=5)
    assert a["num_datapoints"] == 30 and a["K"] == 20 and a["seed"] == 5
    for key, value in a["values"].items():  # same seed, other chunking: same numbers
        assert value == pytest.approx(b["values"][key], abs=1e-4)
    limited = calculate_likelihoods(model, batches, K=20, seed=5, max_datapoints=12)
    assert limited["num_datapoints"] == 12


@torch.no_grad()
def test_unimodal_model_reports_iwae(gaussian):
    xs = gaussian.sample_data(100, torch.Generator().manual_seed(6))
    out = calculate_likelihoods(gaussian, [[xs]], K=500, k_chunk=128)
    assert list(out["values"]) == ["iwae"]
    assert out["values"]["iwae"] == pytest.approx(
        gaussian.exact_log_likelihood(xs).mean().item(), abs=0.05)


@pytest.mark.parametrize("fusion", ["mopoe", "poe"])
@torch.no_grad()
def test_product_fusions_evaluate_with_their_own_posterior_as_proposal(fusion):
    """Under poe / mopoe the joint estimates use the model's components (products of experts)
    as the proposal: the joint reaches log p(x_1..x_3) and equals m_iwae on the same noise; each
    'from e' estimate (proposal: the product of the prior and expert e) is a valid bound on the
    exact marginal; chunking changes nothing."""
    torch.manual_seed(0)
    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3, num_modalities=3,
                              fusion=fusion)
    model.set_exact_posterior()
    gen = torch.Generator().manual_seed(1)
    xs = model.sample_data(200, gen)
    est = batch_log_likelihoods(model, xs, K=1000, generator=torch.Generator().manual_seed(2))
    exact = model.exact_log_likelihood(xs).mean().item()
    assert abs(est["joint_no_lambda"].mean().item() - exact) < 0.05
    for d, name in enumerate(model.modalities):
        marginal = exact_marginal(model, d, xs[d]).mean().item()
        # valid bounds whatever the proposal (poe's joint posterior is a narrow one for x_d)
        assert est[f"x_{name}_from_mixture"].mean().item() < marginal + 0.05
        for other in model.modalities:
            assert est[f"x_{name}_from_{other}"].mean().item() < marginal + 0.05
        # the prior times expert d fits p(z | x_d) (set_exact_posterior): a tight proposal
        assert abs(est[f"x_{name}_from_{name}"].mean().item() - marginal) < 0.05
    eps = model.sample_noise(50, 200, torch.Generator().manual_seed(3))
    assert len(eps) == (7 if fusion == "mopoe" else 1)  # one noise tensor per component
    same = batch_log_likelihoods(model, xs, eps=eps)
    torch.testing.assert_close(same["joint_with_lambda"], m_iwae(model, xs, eps=eps))
    chunked = batch_log_likelihoods(model, xs, K=40, k_chunk=7,
                                    generator=torch.Generator().manual_seed(4))
    whole = batch_log_likelihoods(model, xs, K=40, generator=torch.Generator().manual_seed(4))
    for key, value in whole.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-5, atol=1e-5, msg=key)
