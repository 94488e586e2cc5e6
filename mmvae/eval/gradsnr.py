"""Gradient signal-to-noise ratio of the estimators, per parameter group (issue 18).

On fixed weights and a fixed batch, each estimator's gradient is drawn R times with fresh particle
noise (the same R noise draws for every estimator, so the comparison is paired). Per parameter
group (each expert's encoder and decoder, the prior) and element i, with mean_i and sd_i over the
R draws, SNR_i = |mean_i| / sd_i; a group is summarised by the mean and the median of SNR_i over
its elements (elements with sd_i = 0 and mean_i = 0, e.g. dead units, are left out and counted),
and by the RMS of mean_i and of sd_i. Rainforth et al. (2018, "Tighter variational bounds are
not necessarily better") show that the encoder SNR of IWAE falls as 1/sqrt(K) while DReG's does
not: this is the quantity that decides how well the encoders learn.

`decompose` splits the variance of the unbiased mixture DReG's encoder gradient into the other
experts' score terms (`objectives.m_dreg_score_part`, what `stl` and `paper` drop) and the rest:
tr Var(total) = tr Var(score) + tr Var(rest) + 2 tr Cov(score, rest), each summed over a group's
elements.

Estimators: ``unbiased``, ``paper``, ``stl``, ``cv``, ``swap`` (the `dreg_variant`s of
`objectives.m_dreg`; ``swap`` needs the looser bound) and ``iwae`` (`m_iwae`), all with the
model's `looser` setting. The loss is -bound.mean() over the
batch, as in training.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from mmvae import objectives

ESTIMATORS = ("unbiased", "paper", "stl", "cv", "swap", "iwae")


def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """'enc/<modality>', 'dec/<modality>' per expert, and 'prior' when it is learned."""
    groups = {}
    for expert in model.experts:
        groups[f"enc/{expert.modality}"] = [p for p in expert.enc.parameters() if p.requires_grad]
    for expert in model.experts:
        groups[f"dec/{expert.modality}"] = [p for p in expert.dec.parameters() if p.requires_grad]
    if model.prior_raw.requires_grad:
        groups["prior"] = [model.prior_raw]
    return {name: params for name, params in groups.items() if params}


def estimator(name: str, multimodal: bool, looser: bool):
    """f(model, xs, K, eps) -> (B,) for one of ESTIMATORS."""
    if name == "iwae":
        return objectives.select("iwae", multimodal, looser=looser)
    if name in objectives.VARIANTS:
        return objectives.select("dreg", multimodal, looser=looser, variant=name)
    raise ValueError(f"unknown estimator {name!r}; choose among {', '.join(ESTIMATORS)}")


def gradient(model, fn, xs, K: int, eps, groups) -> dict[str, torch.Tensor]:
    """The flattened fp64 gradient of -fn(...).mean() per group (zeros where none flows)."""
    params = [p for ps in groups.values() for p in ps]
    loss = -fn(model, xs, K, eps=eps).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out, i = {}, 0
    for name, ps in groups.items():
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                for p, g in zip(ps, grads[i:i + len(ps)])]
        out[name] = torch.cat(flat)
        i += len(ps)
    return out


class Moments:
    """Running mean and (co)variance of vectors (Welford, fp64): add(x) or add(x, y)."""

    def __init__(self):
        self.n, self.mean_x, self.mean_y, self.m2_x, self.m2_y, self.c_xy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        self.n += 1
        dx = x - self.mean_x
        self.mean_x = self.mean_x + dx / self.n
        self.m2_x = self.m2_x + dx * (x - self.mean_x)
        if y is not None:
            dy = y - self.mean_y
            self.mean_y = self.mean_y + dy / self.n
            self.m2_y = self.m2_y + dy * (y - self.mean_y)
            self.c_xy = self.c_xy + dx * (y - self.mean_y)

    def var(self) -> torch.Tensor:
        return self.m2_x / (self.n - 1)


def summarise(m: Moments) -> dict:
    """SNR summary of one group's draws (see the module docstring)."""
    mean, sd = m.mean_x.abs(), m.var().clamp_min(0).sqrt()
    degenerate = (sd == 0) & (mean == 0)
    snr = (mean / sd)[~degenerate].cpu().numpy()
    finite = snr[np.isfinite(snr)]
    return {"snr_mean": float(np.mean(snr)) if snr.size else math.nan,
            "snr_median": float(np.median(snr)) if snr.size else math.nan,
            "snr_mean_finite": float(np.mean(finite)) if finite.size else math.nan,
            "rms_mean": float(mean.square().mean().sqrt()), "rms_sd": float(sd.square().mean().sqrt()),
            "elements": int(mean.numel()), "left_out": int(degenerate.sum())}


def noise_draws(model, K: int, B: int, draws: int, seed: int, device) -> list[list[torch.Tensor]]:
    """R particle-noise draws, a pure function of (seed, r): shared by every estimator."""
    out = []
    for r in range(draws):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, r]).generate_state(1)[0]))
        out.append([e.to(device) for e in model.sample_noise(K, B, generator=gen, device="cpu")])
    return out


@torch.no_grad()
def weight_stats(model, xs: Sequence[torch.Tensor], K: int, *, seed: int = 0,
                 looser: bool = True) -> dict:
    """How degenerate the importance weights are here (the first noise draw of `noise_draws`):
    "ess_fraction", the effective sample size 1 / sum w~^2 of each softmax (per stratum for
    `looser`) over its particle count, averaged; "alpha_other_mean"/"_max", the other experts'
    responsibilities alpha_m(z_rk), m != r (0 when the experts do not overlap: then the unbiased
    mixture DReG is the `paper` variant, and with ess_fraction -> 1/K all variants coincide)."""
    eps = noise_draws(model, K, xs[0].shape[0], 1, seed, xs[0].device)[0]
    p = objectives.draw(model, list(xs), K, eps)
    log_q = objectives.log_q_matrix(model, p.z, p.posts, detach_params=True)  # (M_m, M_r, K, B)
    M = log_q.shape[0]
    lw = p.log_joint - (torch.logsumexp(log_q, 0) - math.log(M))  # (M, K, B)
    if looser and M > 1:
        ess = 1 / torch.softmax(lw, 1).square().sum(1) / K
    else:
        ess = 1 / torch.softmax(lw.reshape(M * K, -1), 0).square().sum(0) / (M * K)
    alpha = torch.softmax(log_q, 0)
    other = alpha[~torch.eye(M, dtype=torch.bool)] if M > 1 else torch.zeros(1)
    return {"ess_fraction": float(ess.mean()), "alpha_other_mean": float(other.mean()),
            "alpha_other_max": float(other.max())}


def measure(model, xs: Sequence[torch.Tensor], K: int, *, estimators: Sequence[str] = ESTIMATORS,
            draws: int = 20, seed: int = 0, looser: bool = True) -> dict:
    """{estimator: {group: summary}} over `draws` noise draws, the same draws for each."""
    model.eval()
    groups = parameter_groups(model)
    noise = noise_draws(model, K, xs[0].shape[0], draws, seed, xs[0].device)
    result = {}
    for name in estimators:
        fn = estimator(name, model.multimodal, looser and model.multimodal)
        moments = {g: Moments() for g in groups}
        for eps in noise:
            for g, vec in gradient(model, fn, xs, K, eps, groups).items():
                moments[g].add(vec)
        result[name] = {g: summarise(m) for g, m in moments.items()}
    return result


def decompose(model, xs: Sequence[torch.Tensor], K: int, *, draws: int = 20, seed: int = 0,
              looser: bool = True) -> dict:
    """Per encoder group, the trace of the variance of the unbiased mixture DReG's gradient and
    its parts: {"total", "score", "rest", "cov2"} (cov2 = 2 tr Cov(score, rest)) and
    "score_share" = score / total. The score part is `objectives.m_dreg_score_part` on the same
    noise; rest = total - score."""
    if not model.multimodal:
        raise ValueError("the score-term decomposition needs a multimodal (mixture) model")
    model.eval()
    groups = {g: ps for g, ps in parameter_groups(model).items() if g.startswith("enc/")}
    looser = looser and model.multimodal
    total_fn = estimator("unbiased", True, looser)

    def score_fn(m, xs_, K_, eps=None):
        return objectives.m_dreg_score_part(m, xs_, K_, looser=looser, eps=eps)

    noise = noise_draws(model, K, xs[0].shape[0], draws, seed, xs[0].device)
    total = {g: Moments() for g in groups}
    parts = {g: Moments() for g in groups}
    for eps in noise:
        g_total = gradient(model, total_fn, xs, K, eps, groups)
        g_score = gradient(model, score_fn, xs, K, eps, groups)
        for g in groups:
            total[g].add(g_total[g])
            parts[g].add(g_score[g], g_total[g] - g_score[g])
    out = {}
    for g in groups:
        p, n = parts[g], parts[g].n - 1
        row = {"total": float(total[g].var().sum()), "score": float(p.m2_x.sum() / n),
               "rest": float(p.m2_y.sum() / n), "cov2": float(2 * p.c_xy.sum() / n)}
        row["score_share"] = row["score"] / row["total"] if row["total"] > 0 else math.nan
        out[g] = row
    return out
