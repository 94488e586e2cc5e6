"""The speed levers of the training step leave its maths unchanged: values and gradients of the
fast evaluations equal the plain ones (fp64 tight, fp32 to rounding), and the arms that
benchmarks/bench_levers.py times compute the same bound and gradient."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import distributions as td

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_svhn_decoder_fast_path_has_the_plain_stacks_values_and_gradients(dtype, tol):
    from mmvae.nets import svhn

    torch.manual_seed(0)
    dec = svhn.Decoder(7).to(dtype)
    z = torch.randn(6, 7, dtype=dtype, requires_grad=True)
    g = torch.rand(6, 3, 32, 32, dtype=dtype)  # a random cotangent: every output pixel counts
    fast = dec(z)
    grads_fast = torch.autograd.grad((fast * g).sum(), [z, *dec.parameters()])
    plain = dec.body(z.reshape(6, 7, 1, 1))  # the nn.Sequential of ConvTranspose2d, NCHW
    grads_plain = torch.autograd.grad((plain * g).sum(), [z, *dec.parameters()])
    torch.testing.assert_close(fast, plain, rtol=tol, atol=tol)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_fused_likelihood_has_the_elementwise_densitys_value_and_gradient(family):
    from mmvae.models.vae import LocScaleLikelihood

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64)
    out = torch.rand(2, 5, 4, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    got = LocScaleLikelihood(family, 0.75).log_prob_sum(x, out, 3)  # (2, 5, 4)
    dist = {"laplace": td.Laplace, "normal": td.Normal}[family](out, 0.75)
    want = dist.log_prob(x).sum((-3, -2, -1))
    w = torch.rand(2, 5, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), out)[0],
                               torch.autograd.grad((want * w).sum(), out)[0], rtol=1e-12,
                               atol=1e-12)


def _bench_levers():
    spec = importlib.util.spec_from_file_location("bench_levers",
                                                  ROOT / "benchmarks" / "bench_levers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_levers_arms_compute_the_same_bound_and_gradient():
    levers = _bench_levers()
    results = {}
    for name in levers.ARMS:
        arm = levers.make_arm(name, ["objective.K=3", "data.batch_size=4", "model.latent_dim=6",
                                     "train.mixed_precision=no"])
        value = arm.estimator(arm.model, arm.xs, 3, eps=arm.eps)
        value.mean().backward()
        results[name] = (value.detach(), [p.grad for p in arm.model.parameters()
                                          if p.grad is not None])
    value0, grads0 = results["plain"]
    for name in levers.ARMS[1:]:
        value, grads = results[name]
        torch.testing.assert_close(value, value0, rtol=1e-6, atol=0)  # bounds ~ -5e3 nats
        assert len(grads) == len(grads0)
        for a, b in zip(grads, grads0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
