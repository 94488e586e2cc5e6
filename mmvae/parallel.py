"""Particle sharding and K-chunking: the K particles of a batch need not live in one place.

Both rest on one fact about the importance-weighted estimators: given the normaliser
log sum_k exp l_k over *all* particles, each particle's contribution to the value and to the
gradient is local (w_k = exp(l_k - lse)). So

* **particle shards** (P ranks share a batch, each draws K/P particles): the normaliser is an
  all-reduce log-sum-exp over the particle group (max, then sum of exp), and the gradient is the
  sum over the group;
* **K-chunks** (C particles alive at once): pass 1 computes every log-weight without a graph and
  the normaliser from them; pass 2 recomputes each chunk with the graph, backpropagates its share
  of the surrogate, and frees it. Peak memory follows C, not K; the gradient is unchanged.

The noise of all K particles is drawn once per batch (it is small: K x B x D) and sliced, so the
union of the shards or chunks is exactly the one-process draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from mmvae.objectives import FixedReducer, LocalReducer, log_weights


@dataclass
class GroupReducer:
    """Log-sum-exp across the ranks of one particle group (they hold disjoint particles)."""

    group: object
    size: int

    def logsumexp(self, lw: torch.Tensor, dim: int) -> torch.Tensor:
        with torch.no_grad():
            lse = torch.logsumexp(lw.detach(), dim)
            top = lse.clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            total = torch.exp(lse - top)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
            return top + total.log()

    def count(self, n_local: int) -> int:
        return n_local * self.size


def shard_noise(eps: list[torch.Tensor], index: int, shards: int) -> list[torch.Tensor]:
    """The particles (dim 0) of shard `index` of `shards`."""
    K = eps[0].shape[0]
    if K % shards:
        raise ValueError(f"K={K} particles cannot be split into {shards} equal shards")
    step = K // shards
    return [e[index * step:(index + 1) * step] for e in eps]


def normalisers(model, xs, eps, *, looser: bool, k_chunk: int, reducer,
                present=None) -> FixedReducer:
    """Pass 1: the global normaliser from all local particles, `k_chunk` at a time, no graph
    (absent components' particles have log-weight -inf: each sample's own normaliser)."""
    K = eps[0].shape[0]
    with torch.no_grad():
        lw = torch.cat([log_weights(model, xs, eps=[e[i:i + k_chunk] for e in eps], present=present)
                        for i in range(0, K, k_chunk)], 1)  # (M, K, B)
    M, _, B = lw.shape
    if looser:
        return FixedReducer(reducer.logsumexp(lw, 1), reducer.count(K))
    return FixedReducer(reducer.logsumexp(lw.reshape(M * K, B), 0), reducer.count(M * K))


def backward_objective(objective: Callable, model, xs, eps, *, looser: bool, k_chunk: int = 0,
                       reducer=None, loss_scale: float = 1.0,
                       backward: Callable[[torch.Tensor, bool], None], present=None) -> torch.Tensor:
    """Backpropagate ``-loss_scale * objective(...).mean()`` over the local particles `eps`.

    `objective(model, xs, K, eps=, reducer=, present=)` is an importance-weighted estimator
    (iwae / dreg and their multimodal forms; `present` the (B, M) modality mask or None);
    `backward(loss, last)` runs the backward pass (`last` is False for all but the final
    chunk, so DDP can skip its all-reduce). Returns the bound's value (B,).
    With `k_chunk` >= the local K (or 0) this is one ordinary forward and backward.
    """
    reducer = reducer or LocalReducer()
    K = eps[0].shape[0]
    if not k_chunk or k_chunk >= K:
        out = objective(model, xs, K, eps=eps, reducer=reducer, present=present)
        backward(-loss_scale * out.mean(), True)
        return out.detach()
    fixed = normalisers(model, xs, eps, looser=looser, k_chunk=k_chunk, reducer=reducer,
                        present=present)
    starts = list(range(0, K, k_chunk))
    for i in starts:
        chunk = [e[i:i + k_chunk] for e in eps]
        out = objective(model, xs, chunk[0].shape[0], eps=chunk, reducer=fixed, present=present)
        backward(-loss_scale * out.mean(), i == starts[-1])
    return out.detach()  # every chunk carries the same (global) value
