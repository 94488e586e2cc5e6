"""The categorical caption likelihood ("FakeCategorical", REFERENCE.md §2) without the memory.

log p(x | z) = sum over the 32 positions t of  w_t * log softmax(logits_t)[x_t],
i.e. minus the summed token cross-entropy, where the position weights w_t in {0, 1} say which
positions are scored:

* default (``paper_token_loss=False``): every position up to and including the first ``<eos>``
  (id 2): the real tokens (``<exc>`` = out-of-vocabulary ones included) and ``<eos>``; the
  ``<pad>`` positions after it are not data and are not scored;
* ``paper_token_loss=True`` reproduces the paper code's ``cross_entropy(ignore_index=0)``: id 0
  is ``<exc>``, not ``<pad>`` (= 1), so OOV tokens are ignored while ``<pad>`` and ``<eos>``
  positions are scored.

Memory: the estimators decode all M*K*B particles at once (6400 at K=50, B=64, M=2), and
their logits (N, 32, V) take 6400*32*1590*4 B = 1.3 GB in fp32 per copy; log_softmax, its
gradient and the logits would hold three such copies. `fused_token_log_prob` never builds them:
it takes the inputs of the tied output layer, computes logits ``chunk`` rows at a time, keeps
only log-sum-exp per row, and recomputes each chunk's logits in the backward pass (one extra
(rows x 128) @ (128 x V) product, a few percent of a CUB decoder's cost). Everything is fp32
except the sum over positions, fp64 like every log-density sum feeding the log-weights
(`mmvae.dists.log_sum`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmvae.dists import log_sum

EXC, PAD, EOS = 0, 1, 2
"""Special token ids of the CUB vocabulary: out-of-vocabulary, padding, end of sentence."""

CHUNK_ELEMENTS = 1 << 24
"""Logit elements alive at once in the fused likelihood (64 MiB in fp32)."""


def token_weights(tokens: torch.Tensor, paper_token_loss: bool = False) -> torch.Tensor:
    """Which positions are scored, as fp32 0/1 weights of the shape of `tokens` (..., L)."""
    tokens = tokens.long()
    if paper_token_loss:
        return (tokens != EXC).float()
    eos = tokens == EOS
    after_first_eos = (eos.cumsum(-1) - eos.long()) > 0
    return (~after_first_eos).float()


class _FusedTokenLogProb(torch.autograd.Function):
    """Per row r: weight_r * (logits_r[target_r] - logsumexp(logits_r)), logits = h W^T + b,
    computed `chunk` rows at a time; the backward pass recomputes the chunk's logits."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, row_weight, chunk: int):
        with torch.autocast(h.device.type, enabled=False):
            hf, wf, bf = h.float(), weight.float(), bias.float()
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            lse = torch.empty_like(out)
            for s in range(0, h.shape[0], chunk):
                logits = torch.addmm(bf, hf[s:s + chunk], wf.t())  # (c, V)
                lse[s:s + chunk] = torch.logsumexp(logits, -1)
                picked = logits.gather(1, target[s:s + chunk, None]).squeeze(1)
                out[s:s + chunk] = (picked - lse[s:s + chunk]) * row_weight[s:s + chunk]
        ctx.save_for_backward(h, weight, bias, target, row_weight, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, target, row_weight, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):
            hf, wf, bf = h.float(), weight.float(), bias.float()
            g = grad_out.float() * row_weight  # (R,)
            grad_h = torch.empty_like(hf) if need_h else None
            grad_w = torch.zeros_like(wf) if need_w else None
            grad_b = torch.zeros_like(bf) if need_b else None
            for s in range(0, h.shape[0], ctx.chunk):
                rows = slice(s, s + ctx.chunk)
                logits = torch.addmm(bf, hf[rows], wf.t())  # (c, V)
                # d out / d logits = g * (onehot(target) - softmax(logits))
                d = logits.sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                d.scatter_add_(1, target[rows, None], g[rows, None])
                if need_h:
                    grad_h[rows] = d @ wf
                if need_w:
                    grad_w.addmm_(d.t(), hf[rows])
                if need_b:
                    grad_b += d.sum(0)
        return (grad_h.to(h.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None)


def fused_token_log_prob(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         target: torch.Tensor, row_weight: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """log softmax(h W^T + b)[target] * row_weight per row, without materialising the logits.

    h (R, E), weight (V, E), bias (V,), target (R,) int64, row_weight (R,) -> (R,) fp32.
    `chunk` rows of logits are alive at a time (default: CHUNK_ELEMENTS // V).
    """
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _FusedTokenLogProb.apply(h, weight, bias, target.long(), row_weight.float(), chunk)


@dataclass(frozen=True)
class CaptionLikelihood:
    """Categorical over the vocabulary at each of the L = 32 positions (module docstring)."""

    paper_token_loss: bool = False

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        return token_weights(tokens, self.paper_token_loss)

    def log_prob_sum(self, x: torch.Tensor, out: torch.Tensor, ndims: int = 1) -> torch.Tensor:
        """From logits: x (B, L) ids, out (..., B, L, V) -> (..., B) fp64. Builds the full
        log-sum-exp over `out`; the estimators use `log_prob_hidden` instead."""
        tokens = x.long()
        logits = out.float()
        picked = logits.gather(-1, tokens.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return log_sum((picked - torch.logsumexp(logits, -1)) * self.weights(tokens))

    def log_prob_hidden(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor) -> torch.Tensor:
        """From the inputs of the output layer (logits = h W^T + b): x (B, L) ids,
        h (..., B, L, E) -> (..., B) fp64, fused and chunked (module docstring)."""
        tokens = x.long()
        lead = h.shape[:-1]  # (..., B, L)
        target = tokens.expand(lead).reshape(-1)
        row_weight = self.weights(tokens).expand(lead).reshape(-1)
        rows = fused_token_log_prob(h.reshape(-1, h.shape[-1]), weight, bias, target, row_weight)
        return log_sum(rows.reshape(lead))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The paper's "mean" of a caption: its logits (..., L, V); text = argmax to <eos>."""
        return out
