"""Missing modalities in the estimators: with a (B, M) presence mask, every fusion and objective
(every DReG variant) is, sample by sample, the full-data objective of the model restricted to the
present modalities (value and gradient, fp64), and k-chunks / particle shards give the same with
masks. For moe_plus the restricted model is MMVAE+ over the present modalities: an absent
modality's w is integrated out (mmvae.models.mmvae_plus, "Missing modalities")."""
import copy
import math

import pytest
import torch

import mmvae
from mmvae import objectives as O
from mmvae.models.mmvae import MMVAE
from mmvae.models.mmvae_plus import with_private_latents
from mmvae.models.vae import VAE
from mmvae.parallel import backward_objective, normalisers, shard_noise
from test_objectives import _flat_grad

# Mixed masks over M = 3: all, two, one (each position), never none.
MASK = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
OBJECTIVES = [("elbo", False, "unbiased"), ("iwae", False, "unbiased"), ("iwae", True, "unbiased"),
              ("dreg", False, "unbiased"), ("dreg", True, "unbiased"), ("dreg", False, "paper"),
              ("dreg", True, "paper"), ("dreg", False, "stl"), ("dreg", False, "cv"),
              ("dreg", True, "cv"), ("dreg", True, "swap")]
FUSIONS = ["moe", "mopoe", "poe", "moe_plus"]


def pair(fusion, M=3, seed=0):
    torch.manual_seed(seed)
    model = mmvae.build_model("gaussian_pair", latent_dim=2, data_dim=3, num_modalities=M,
                              fusion=fusion, learn_prior=True).double()
    model.set_exact_posterior()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the exact posterior: every gradient term is non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def restricted(model, keep: list[int]):
    """The model over the modalities `keep` only, how to give it `model`'s noise of a sample
    (eps -> its eps) and how to read its gradient in `model`'s parameters (value -> flat)."""
    if model.fusion.private:
        return restricted_plus(model, keep)
    sub = restricted_shared(model, keep)
    params = [p for p in model.parameters() if p.requires_grad]
    return (sub, lambda eps: [eps[j] for j in component_map(model, keep)],
            lambda value: _flat_grad(value, params))


def restricted_shared(model, keep: list[int]) -> MMVAE:
    """The model over the modalities `keep` only, sharing every parameter with `model`."""
    sub = MMVAE([model.vaes[i] for i in keep], latent_dim=model.latent_dim, prior="normal",
                prior_scale="softplus", learn_prior=True,
                llik_scaling=[model.llik_scaling[i] for i in keep], fusion=model.fusion)
    sub.prior_raw = model.prior_raw  # the constructor gave the shared experts a new prior
    for vae in sub.vaes:
        vae.prior_raw = model.prior_raw
    return sub


def restricted_plus(model, keep: list[int]):
    """MMVAE+ over `keep` (u = (z, w_keep)): copies of those experts re-laid out, the prior the
    (z, w_keep) blocks of `model`'s. Its gradient is read back into `model`'s parameters: the
    copies' into their originals, the prior's into its blocks, zero for everything else."""
    vaes = []
    for i in keep:
        vae = copy.deepcopy(model.vaes[i])
        vae.__class__, vae.latent_dim = VAE, model.shared_dim + model.private_dim
        vaes.append(vae)
    sub = with_private_latents(vaes, shared=model.shared_dim, private=model.private_dim,
                               aux_scale=model.experts[0].aux_scale, fusion=model.fusion,
                               prior="normal", prior_scale="softplus", learn_prior=True,
                               llik_scaling=[model.llik_scaling[i] for i in keep]
                               ).to(model.prior_raw.dtype)
    cols = torch.cat([torch.arange(model.shared_dim)] + [
        torch.arange(model.layout.w(i).start, model.layout.w(i).stop) for i in keep])
    with torch.no_grad():
        sub.prior_raw.copy_(model.prior_raw[:, cols])
    names = {f"vaes.{j}.{rest}": f"vaes.{i}.{rest}" for j, i in enumerate(keep)
             for rest, _ in model.vaes[i].named_parameters() if rest != "prior_raw"}
    names["prior_raw"] = "prior_raw"
    sub_params = dict(sub.named_parameters())

    def grad_of(value):
        got = dict(zip(names, _flat_grad_list(value, [sub_params[n] for n in names])))
        back = {full: got[mine] for mine, full in names.items()}
        flat = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            g = torch.zeros_like(param)
            if name == "prior_raw":
                g[:, cols] = back[name]
            elif name in back:
                g = back[name]
            flat.append(g.reshape(-1))
        return torch.cat(flat)

    return sub, lambda eps: [eps[i][..., cols] for i in keep], grad_of


def _flat_grad_list(value, params):
    grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def component_map(model, keep: list[int]) -> list[int]:
    """For each component of the model restricted to `keep`, the index of the same component
    in `model` (its noise)."""
    full = [set(s) for s in model.fusion.subsets(len(model.vaes))]
    mapped = [{keep[i] for i in s} for s in model.fusion.subsets(len(keep))]
    if model.fusion.partial:  # a product of the present experts: s ∩ keep
        return [next(j for j, s in enumerate(full) if s & set(keep) == t) for t in mapped]
    return [full.index(t) for t in mapped]


def per_sample_reference(model, estimator, xs, eps, K):
    """The restricted model's value and gradient for each sample alone."""
    values, grads = [], []
    for b, row in enumerate(MASK):
        keep = [m for m in range(len(xs)) if row[m]]
        sub, noise, grad_of = restricted(model, keep)
        out = estimator(sub, [xs[m][b:b + 1] for m in keep], K,
                        eps=noise([e[:, b:b + 1] for e in eps]))
        values.append(out.detach())
        grads.append(grad_of(out))
    return torch.cat(values), grads


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name,looser,variant", OBJECTIVES)
def test_masked_objective_equals_the_present_subsets_objective_per_sample(fusion, name, looser,
                                                                          variant):
    model = pair(fusion)
    xs = [x.double() for x in model.sample_data(len(MASK))]
    K = 1 if name == "elbo" else 4
    eps = [e.double() for e in model.sample_noise(K, len(MASK))]
    # Absent modalities hold zero placeholders, as the data pipeline fills them.
    xs = [torch.where(MASK[:, m, None], x, torch.zeros_like(x)) for m, x in enumerate(xs)]
    estimator = O.select(name, True, looser=looser, variant=variant)
    out = estimator(model, xs, K, eps=eps, present=MASK)
    ref_values, ref_grads = per_sample_reference(model, estimator, xs, eps, K)
    torch.testing.assert_close(out.detach(), ref_values, rtol=1e-10, atol=1e-10)
    params = [p for p in model.parameters() if p.requires_grad]
    for b in range(len(MASK)):
        grad = _flat_grad(out[b], params, retain=True)
        torch.testing.assert_close(grad, ref_grads[b], rtol=1e-8, atol=1e-10)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("variant", ["unbiased", "cv", "swap"])
def test_an_absent_modality_gets_no_gradient_and_its_placeholder_does_not_matter(fusion, variant):
    """Sample 3 has only x3: nothing of experts 1 and 2 moves for it, and garbage (large values)
    in their placeholders changes neither its value nor its gradient (nor NaN leaks into it)."""
    model = pair(fusion)
    xs = [x.double() for x in model.sample_data(len(MASK))]
    eps = [e.double() for e in model.sample_noise(4, len(MASK))]
    estimator = O.select("dreg", True, looser=True, variant=variant)
    params = [p for e in model.experts[:2] for net in (e.enc, e.dec) for p in net.parameters()]
    mine = [p for p in model.experts[2].parameters() if p.requires_grad]
    out = estimator(model, xs, 4, eps=eps, present=MASK)
    assert torch.equal(_flat_grad(out[3], params, retain=True), torch.zeros(sum(p.numel() for p in params),
                                                                             dtype=torch.float64))
    grad = _flat_grad(out[3], mine, retain=True)
    noisy = [x.clone() for x in xs]
    noisy[0][3], noisy[1][3] = 1e3, -1e3
    again = estimator(model, noisy, 4, eps=eps, present=MASK)
    torch.testing.assert_close(again.detach()[3], out.detach()[3], rtol=1e-12, atol=0)
    torch.testing.assert_close(_flat_grad(again[3], mine, retain=True), grad, rtol=1e-12, atol=0)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name", ["elbo", "iwae", "dreg"])
def test_an_all_present_mask_is_the_unmasked_objective(fusion, name):
    model = pair(fusion)
    xs = [x.double() for x in model.sample_data(4)]
    K = 1 if name == "elbo" else 3
    eps = [e.double() for e in model.sample_noise(K, 4)]
    estimator = O.select(name, True)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = estimator(model, xs, K, eps=eps)
    masked = estimator(model, xs, K, eps=eps, present=torch.ones(4, 3, dtype=torch.bool))
    torch.testing.assert_close(masked, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_flat_grad(masked, params), _flat_grad(plain, params))


def _backward(model, estimator, xs, eps, looser, k_chunk, present):
    model.zero_grad(set_to_none=True)
    value = backward_objective(estimator, model, xs, eps, looser=looser, k_chunk=k_chunk,
                               backward=lambda loss, last: loss.backward(), present=present)
    return value, [p.grad.clone() for p in model.parameters() if p.requires_grad]


ESTIMATORS = [("iwae", False, "unbiased"), ("iwae", True, "unbiased"), ("dreg", False, "unbiased"),
              ("dreg", True, "unbiased"), ("dreg", False, "cv"), ("dreg", True, "cv"),
              ("dreg", True, "swap")]


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("name,looser,variant", ESTIMATORS)
def test_k_chunks_with_a_mask_give_the_unchunked_value_and_gradient(fusion, name, looser, variant):
    model = pair(fusion)
    xs = [x.double() for x in model.sample_data(len(MASK))]
    eps = [e.double() for e in model.sample_noise(6, len(MASK))]
    estimator = O.select(name, True, looser=looser, variant=variant)
    v_full, g_full = _backward(model, estimator, xs, eps, looser, 0, MASK)
    v_chunk, g_chunk = _backward(model, estimator, xs, eps, looser, 4, MASK)  # 4 + 2
    torch.testing.assert_close(v_chunk, v_full)
    for a, b in zip(g_chunk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fusion", ["moe", "mopoe", "moe_plus"])
@pytest.mark.parametrize("looser,variant", [(False, "unbiased"), (True, "unbiased"),
                                            (False, "cv"), (True, "cv"), (True, "swap")])
def test_particle_shards_with_a_mask_sum_to_the_one_process_gradient(fusion, looser, variant):
    """P = 2 shards of the K particles, each with the group's normaliser (what GroupReducer's
    all-reduce gives; here from pass 1 over the union): their values agree with one process and
    their gradients sum to its gradient, masks included (a stratum absent from a sample has
    lse = -inf on every shard)."""
    model = pair(fusion)
    xs = [x.double() for x in model.sample_data(len(MASK))]
    eps = [e.double() for e in model.sample_noise(6, len(MASK))]
    estimator = O.select("dreg", True, looser=looser, variant=variant)
    v_one, g_one = _backward(model, estimator, xs, eps, looser, 0, MASK)
    group = normalisers(model, xs, eps, looser=looser, k_chunk=6, reducer=O.LocalReducer(),
                        present=MASK)
    total = [torch.zeros_like(g) for g in g_one]
    for index in range(2):
        shard = shard_noise(eps, index, 2)
        reducer = O.FixedReducer(group.lse, group.total)
        v_shard, g_shard = _shard_backward(model, estimator, xs, shard, reducer)
        torch.testing.assert_close(v_shard, v_one)
        total = [t + g for t, g in zip(total, g_shard)]
    for a, b in zip(total, g_one):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _shard_backward(model, estimator, xs, eps, reducer):
    model.zero_grad(set_to_none=True)
    out = estimator(model, xs, eps[0].shape[0], eps=eps, reducer=reducer, present=MASK)
    (-out.mean()).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_test_bound_with_a_mask_is_each_samples_own_iwae_bound():
    from mmvae.train.step import draw_noise, test_bound

    model = pair("mopoe")
    xs = [x.double() for x in model.sample_data(len(MASK))]
    bound = test_bound(model, xs, 6, 4, seed=3, present=MASK)
    eps = [e.double() for e in draw_noise(model, 6, len(MASK), 3, "cpu")]
    torch.testing.assert_close(bound, O.m_iwae(model, xs, 6, eps=eps, present=MASK).detach())
    assert torch.isfinite(bound).all() and not math.isclose(float(bound[0]), float(bound[2]))
