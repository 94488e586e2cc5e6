"""Models: shapes (B=1 included), parameterisations, registry, save/load, one decoder call."""
import pytest
import torch

import mmvae
from mmvae import objectives as O
from mmvae import registry
from mmvae.config import ConfigError, ModelConfig
from mmvae.models import digits


@pytest.mark.parametrize("B", [1, 3])
def test_mnist_svhn_shapes_at_any_batch_size(B):
    model = mmvae.build_model("mnist_svhn", latent_dim=5)
    xs = [torch.rand(B, 1, 28, 28), torch.rand(B, 3, 32, 32)]
    for expert, x in zip(model.experts, xs):
        loc, scale = expert.posterior(x)
        assert loc.shape == scale.shape == (B, 5)
        assert torch.allclose(scale.sum(-1), torch.full((B,), 5.0), atol=1e-4)  # D*softmax
    lw = O.log_weights(model, xs, K=4)
    assert lw.shape == (2, 4, B)
    grid = model.reconstruct(xs)
    assert [[g.shape[1:] for g in row] for row in grid] == [[(1, 28, 28), (3, 32, 32)]] * 2
    assert [g.shape for g in model.generate(6)] == [(6, 1, 28, 28), (6, 3, 32, 32)]


def test_defaults_follow_the_paper():
    model = mmvae.build_model("mnist_svhn")
    assert model.llik_scaling == pytest.approx([3072 / 784, 1.0])
    assert mmvae.build_model("mnist_svhn", llik_scaling=2.0).llik_scaling == [2.0, 1.0]
    loc, scale = model.prior_params()
    assert torch.equal(loc, torch.zeros(1, 20)) and torch.allclose(scale, torch.ones(1, 20))
    assert not model.prior_raw.requires_grad
    learned = mmvae.build_model("mnist_svhn", learn_prior=True)
    assert learned.prior_raw.requires_grad
    assert all(v.prior_raw is learned.prior_raw for v in learned.experts)  # one shared prior
    assert model.experts[0].likelihood.scale == 0.75
    assert model.experts[0].posterior_family.name == "laplace"


def test_every_decoder_runs_once_on_all_particles_of_all_experts():
    model = mmvae.build_model("mnist_svhn", latent_dim=4)
    calls = []
    for e in model.experts:
        e.dec.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    xs = [torch.rand(3, 1, 28, 28), torch.rand(3, 3, 32, 32)]
    O.m_dreg(model, xs, K=5, looser=True).sum().backward()
    assert calls == [2 * 5 * 3, 2 * 5 * 3]  # one call per decoder with M*K*B latents


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="valid: .*mnist_svhn"):
        mmvae.build_model("nope")


def test_a_model_built_outside_the_registry_checkpoints_with_its_config(tmp_path):
    """A builder called directly (no registry record) saves with the config it was built from
    and loads back the same model; without it the error says what to pass."""
    cfg = ModelConfig(name="mnist", latent_dim=3)
    model = digits.build_mnist(cfg)
    assert registry.spec_of(model) is None
    with pytest.raises(ValueError, match="pass spec=ModelConfig"):
        mmvae.save_model(model, tmp_path / "none")
    mmvae.save_model(model, tmp_path / "model", spec=cfg)
    again = mmvae.load_model(tmp_path / "model")
    assert registry.spec_of(again)["name"] == "mnist" and registry.spec_of(again)["latent_dim"] == 3
    for (name, want), (_, got) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mmvae.build_model("mnist_svhn", latent_dim=6, learn_prior=True)
    with torch.no_grad():
        model.prior_raw.add_(torch.randn(1, 6))
    mmvae.save_model(model, tmp_path / "model")
    again = mmvae.load_model(tmp_path / "model")
    assert registry.spec_of(again) == registry.spec_of(model) and again.latent_dim == 6
    assert not hasattr(model, "spec")  # the registry keeps the spec, not an attribute
    xs = [torch.rand(2, 1, 28, 28), torch.rand(2, 3, 32, 32)]
    eps = model.sample_noise(3, 2)
    with torch.no_grad():
        torch.testing.assert_close(O.m_iwae(again, xs, eps=eps), O.m_iwae(model, xs, eps=eps))
    with pytest.raises(FileNotFoundError, match="model.json"):
        mmvae.load_model(tmp_path / "model" / "nothing-here")


def test_svhn_decoder_fast_path_equals_the_plain_layer_stack():
    from mmvae.nets import svhn

    torch.manual_seed(0)
    dec = svhn.Decoder(7)
    z = torch.randn(5, 7)
    plain = dec.body.to(memory_format=torch.contiguous_format)(z.reshape(5, 7, 1, 1))
    torch.testing.assert_close(dec(z), plain, rtol=1e-5, atol=1e-6)
