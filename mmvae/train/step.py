"""One training step and the test bound: noise, particle shards, chunks, backward.

The estimator runs inside `ObjectiveModule.forward` so that DDP (which hooks `forward`) sees it;
the model's own methods are what the estimators call.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmvae import objectives
from mmvae.config import Config
from mmvae.data.presence import PRESENT
from mmvae.parallel import backward_objective, normalisers, shard_noise
from mmvae.train.dist import any_rank, autocast


class ObjectiveModule(nn.Module):
    """Wraps a model so that `forward(xs, eps, reducer, present)` returns the estimator's (B,)
    output (`present`: the batch's (B, M) modality mask, or None)."""

    def __init__(self, model: nn.Module, estimator):
        super().__init__()
        self.model = model
        self.estimator = estimator

    def forward(self, xs, eps, reducer=None, present=None):
        return self.estimator(self.model, xs, eps[0].shape[0], eps=eps, reducer=reducer,
                              present=present)


def estimator_for(cfg: Config, multimodal: bool):
    o = cfg.objective
    return objectives.select(o.name, multimodal, looser=o.looser, variant=o.dreg_variant)


def noise_seed(seed: int, step: int, dp_rank: int) -> int:
    """A seed per (run seed, step, data-parallel group): the particle noise of a step is a pure
    function of these, which makes resume exact and lets the P ranks of a group draw the same
    K particles and keep their shard of them."""
    return int(np.random.SeedSequence([seed, step, dp_rank]).generate_state(1)[0])


def draw_noise(model, K: int, B: int, seed: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [e.to(device) for e in model.sample_noise(K, B, generator=gen, device="cpu")]


def batch_inputs(batch: dict, modalities: list[str], device) -> list[torch.Tensor]:
    return [batch[m].to(device, non_blocking=True) for m in modalities]


def batch_present(batch: dict, device) -> torch.Tensor | None:
    """The batch's (B, M) modality mask (`mmvae.data.presence`; columns in the model's
    modality order), or None when every sample has every modality."""
    present = batch.get(PRESENT)
    return None if present is None else present.to(device, non_blocking=True)


def train_step(ctx, batch: dict) -> dict:
    """Forward, backward (chunked / sharded as configured) and an optimiser step.

    Returns {"loss", "bound", "grad_norm", "skipped", "overflow"}. A non-finite loss or gradient
    skips the update on every rank (the caller counts and stops on too many in a row). Under a
    grad scaler (fp16) the scaler still sees the step: its `step` skips the update and `update`
    lowers the scale (without it the next `unscale_` raises); a finite loss with non-finite
    gradients is then an `overflow`, routine under fp16 and not a bad step.
    """
    cfg, model, acc, layout = ctx.cfg, ctx.model, ctx.accelerator, ctx.layout
    xs = batch_inputs(batch, model.modalities, acc.device)
    present = batch_present(batch, acc.device)
    B, K = xs[0].shape[0], cfg.objective.K
    eps = draw_noise(model, K, B, noise_seed(cfg.train.seed, ctx.step, layout.dp_rank), acc.device)
    eps = shard_noise(eps, layout.shard_index, layout.particle_shards)

    def backward(loss, last):
        if last:
            acc.backward(loss)
        else:
            with acc.no_sync(ctx.wrapped):
                acc.backward(loss)

    def estimator(_model, xs_, K_, eps=None, reducer=None, present=None):
        return ctx.wrapped(xs_, eps, reducer, present)

    ctx.optimizer.zero_grad(set_to_none=True)
    with autocast(acc):
        if cfg.objective.name == "elbo":
            value = ctx.wrapped(xs, eps, None, present)
            acc.backward(-value.mean())
            value = value.detach()
        else:
            # DDP averages gradients over all ranks; the estimator's gradient is a sum over the
            # P particle shards of a group, so each rank's loss is scaled by P.
            value = backward_objective(estimator, model, xs, eps, looser=ctx.looser,
                                       k_chunk=cfg.objective.k_chunk, reducer=layout.reducer,
                                       loss_scale=layout.particle_shards, backward=backward,
                                       present=present)
    bound = value.mean()
    max_norm = cfg.train.grad_clip or float("inf")
    # Under DeepSpeed the engine clips (its config's gradient_clipping) and this returns the norm
    # of the step it took (or None).
    norm = acc.clip_grad_norm_(ctx.params, max_norm)
    grad_norm = float(norm) if norm is not None else float("nan")
    skipped, overflow = _update(ctx, bool(torch.isfinite(bound)),
                                norm is None or bool(np.isfinite(grad_norm)))
    return {"loss": -float(bound), "bound": float(bound), "grad_norm": grad_norm,
            "skipped": skipped, "overflow": overflow}


def _update(ctx, finite_loss: bool, finite_grad: bool) -> tuple[bool, bool]:
    """Step the optimizer unless any rank has a non-finite loss or gradient; (skipped, overflow).
    The grad scaler (fp16) sees every step: on an overflow its `step` skips the update and its
    `update` lowers the scale. Under DeepSpeed the engine has already stepped inside backward
    (skipping an fp16 overflow itself); only the report is left to do."""
    acc = ctx.accelerator
    bad_loss = any_rank(not finite_loss, acc)
    engine = getattr(acc, "deepspeed_engine_wrapped", None)
    if engine is not None:
        overflow = not bad_loss and not engine.engine.was_step_applied()
        return bad_loss or overflow, overflow
    skipped = any_rank(bad_loss or not finite_grad, acc)
    if skipped:
        ctx.optimizer.zero_grad(set_to_none=True)  # with no gradients, no parameter moves
    if not skipped or acc.scaler is not None:
        ctx.optimizer.step()
    return skipped, skipped and not bad_loss and acc.scaler is not None


@torch.no_grad()
def test_bound(model, xs: list[torch.Tensor], K: int, k_chunk: int, seed: int,
               present: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's test objective: the joint m_iwae (iwae for one modality) with K particles,
    `k_chunk` at a time; (B,). With `present`, each sample's bound over its own modalities."""
    eps = draw_noise(model, K, xs[0].shape[0], seed, xs[0].device)
    fixed = normalisers(model, xs, eps, looser=False, k_chunk=k_chunk or K,
                        reducer=objectives.LocalReducer(), present=present)
    bound = fixed.lse - np.log(fixed.total)
    valid = model.component_mask(present)
    if valid is not None:  # the sample's own S_b * K particles, not S * K
        bound = bound - torch.log(valid.sum(0).to(bound.dtype) / valid.shape[0])
    return bound
