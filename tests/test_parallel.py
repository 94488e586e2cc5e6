"""K-chunking gives the unchunked value and gradient; noise shards tile the one-process draw."""
import pytest
import torch

import mmvae
from mmvae import objectives as O
from mmvae.parallel import backward_objective, shard_noise


def _grads_after(model, estimator, xs, eps, looser, k_chunk):
    model.zero_grad(set_to_none=True)
    value = backward_objective(estimator, model, xs, eps, looser=looser, k_chunk=k_chunk,
                               backward=lambda loss, last: loss.backward())
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for p in model.parameters() if p.requires_grad]
    return value, grads


@pytest.mark.parametrize("name", ["gaussian_pair", "mnist_svhn"])
@pytest.mark.parametrize("objective", ["iwae", "dreg"])
@pytest.mark.parametrize("looser", [False, True])
def test_chunked_gradient_equals_unchunked(name, objective, looser):
    torch.manual_seed(0)
    kwargs = {"latent_dim": 2, "data_dim": 3} if name == "gaussian_pair" else {"latent_dim": 4}
    model = mmvae.build_model(name, learn_prior=True, **kwargs)
    model.double() if name == "gaussian_pair" else None
    if name == "gaussian_pair":
        xs = [x.double() for x in model.sample_data(3)]
    else:
        xs = [torch.rand(3, 1, 28, 28), torch.rand(3, 3, 32, 32)]
    eps = [e.to(xs[0].dtype) for e in model.sample_noise(6, 3)]
    estimator = O.select(objective, True, looser=looser)
    v_full, g_full = _grads_after(model, estimator, xs, eps, looser, k_chunk=0)
    v_chunk, g_chunk = _grads_after(model, estimator, xs, eps, looser, k_chunk=4)  # 4 + 2
    torch.testing.assert_close(v_chunk, v_full)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_full)


def test_noise_shards_tile_the_full_draw():
    model = mmvae.build_model("mnist_svhn", latent_dim=4)
    eps = model.sample_noise(6, 2, generator=torch.Generator().manual_seed(0))
    shards = [shard_noise(eps, i, 3) for i in range(3)]
    for m in range(2):
        torch.testing.assert_close(torch.cat([s[m] for s in shards]), eps[m])
    with pytest.raises(ValueError, match="cannot be split"):
        shard_noise(eps, 0, 4)
