"""The optimiser matches the paper code's (REFERENCE.md §5) and takes train.adam_eps."""
import pytest
import torch

from mmvae.config import ConfigError, load_config
from mmvae.train.optim import make_optimizer


def test_optimizer_is_amsgrad_adam_with_the_given_eps_over_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    opt = make_optimizer(model, 1e-3, load_config(None, ["train.adam_eps=7.8125e-11"]).train.adam_eps)
    (group,) = opt.param_groups
    assert (group["lr"], group["eps"], group["amsgrad"]) == (1e-3, 7.8125e-11, True)
    assert len(group["params"]) == 3  # the frozen bias is not optimised
    assert make_optimizer(model, 1e-3).param_groups[0]["eps"] == load_config(None).train.adam_eps == 1e-8


def test_adam_sum_loss_equals_mean_loss_with_eps_over_batch():
    # the audit's claim (docs/estimators.md): a loss B times larger under Adam(eps) takes the
    # same steps as the original loss under Adam(eps / B)
    B = 128
    torch.manual_seed(0)
    w0 = torch.randn(5) * 1e-3
    grads = [torch.randn(5) * 1e-7 for _ in range(4)]  # small: where eps matters
    finals = []
    for scale, eps in ((B, 1e-8), (1, 1e-8 / B), (1, 1e-8)):
        w = torch.nn.Parameter(w0.clone())
        opt = torch.optim.Adam([w], lr=1e-3, eps=eps, amsgrad=True)
        for g in grads:
            w.grad = scale * g
            opt.step()
        finals.append(w.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-6, atol=0)
    assert not torch.allclose(finals[0], finals[2], rtol=1e-3, atol=0)


def test_adam_eps_must_be_positive():
    with pytest.raises(ConfigError, match="train.adam_eps must be > 0"):
        load_config(None, ["train.adam_eps=0"])
