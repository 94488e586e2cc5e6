"""One training step of the real trainer code in each layout; run by tests/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 ... tests/distributed/particle_step.py OUT
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml ... (DeepSpeed, 1 proc)
    python tests/distributed/particle_step.py OUT          (the one-process reference)

For each case (model x objective x looser) it builds the model from the same seed, takes one
step with `mmvae.train.step.train_step` on a fixed batch, and (rank 0) saves the bound and the
updated parameters to OUT/<case>-<layout>.pt. Layouts: P=2 (two ranks split the K particles of
one batch) and DP (two data-parallel ranks, each with half the batch); one process runs `ref`.
It also takes two Adam steps of the demo model (configs/demo.yaml's mnist_svhn, dreg looser,
here with K=8) on a fixed batch of 128, in fp32, with P=2 and on one process: OUT/demo-<layout>.pt.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from mmvae.config import Config
from mmvae.registry import build_model
from mmvae.train.dist import make_layout
from mmvae.train.optim import make_optimizer
from mmvae.train.step import (ObjectiveModule, draw_noise, estimator_for, noise_seed,
                              train_step)

# (model, objective, looser, dtype). mnist_svhn's log-weights are ~ -5e3, where one fp32 ulp is
# ~5e-4; they are accumulated in fp64 (mmvae.dists.log_sum), so fp32 networks agree across
# layouts to the rounding of their own outputs, and fp64 checks the algebra itself.
CASES = [(m, o, lo, dt) for m, dt in (("gaussian_pair", "fp32"), ("mnist_svhn", "fp64"),
                                      ("mnist_svhn", "fp32"))
         for o in ("iwae", "dreg") for lo in (False, True)]
# the low-noise mixture DReG variants ("dreg.<variant>"): their terms pair particles of the same
# k across components and use the global normalisers, so P=2 must give the one-process step too
CASES += [(m, o, lo, dt) for m, dt in (("gaussian_pair", "fp32"), ("mnist_svhn", "fp64"))
          for o, lo in (("dreg.cv", False), ("dreg.cv", True), ("dreg.swap", True))]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEEPSPEED_CASE = ("gaussian_pair", "dreg", True, "fp32")
K, B = 4, 6


def batch_for(model_name: str, dtype) -> dict:
    g = torch.Generator().manual_seed(123)
    if model_name == "gaussian_pair":
        batch = {"x1": torch.randn(B, 3, generator=g), "x2": torch.randn(B, 3, generator=g)}
    else:
        batch = {"mnist": torch.rand(B, 1, 28, 28, generator=g),
                 "svhn": torch.rand(B, 3, 32, 32, generator=g)}
    return {k: v.to(dtype) for k, v in batch.items()}


def new_model(cfg, dtype):
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model.name, latent_dim=cfg.model.latent_dim, data_dim=3,
                       learn_prior=True).to(dtype)


def config(model_name, objective, looser, P) -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.latent_dim, cfg.model.learn_prior = model_name, 3, True
    cfg.model.data_dim = 3
    name, _, variant = objective.partition(".")
    cfg.objective.name, cfg.objective.looser, cfg.objective.K = name, looser, K
    cfg.objective.dreg_variant = variant or "unbiased"
    cfg.parallel.particle_shards, cfg.train.seed = P, 7
    return cfg


def train_steps(accelerator, layout, cfg, batch, dtype, steps=1, lr=1e-2) -> tuple[float, dict]:
    model = new_model(cfg, dtype)
    optimizer = make_optimizer(model, lr)
    wrapped = ObjectiveModule(model, estimator_for(cfg, model.multimodal))
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    ctx = SimpleNamespace(cfg=cfg, model=model, accelerator=accelerator, layout=layout, step=0,
                          wrapped=wrapped, optimizer=optimizer, looser=cfg.objective.looser,
                          params=[p for p in model.parameters() if p.requires_grad])
    for ctx.step in range(steps):
        stats = train_step(ctx, batch)
    return stats["bound"], _snapshot(model)


def _snapshot(model) -> dict:
    """Updated parameters and the gradients of the step (Adam's first step is ~lr*sign(g), so
    parameters alone would not show a gradient off by a constant factor)."""
    return {name: (p.detach().clone(), p.grad.detach().clone() if p.grad is not None else None)
            for name, p in model.named_parameters() if p.requires_grad}


def dp_reference(cfg, batch, world, dtype) -> tuple[float, dict]:
    """Data parallelism by hand: the mean of the halves' losses, each half with the noise its
    data-parallel rank draws; plain torch, no Accelerate."""
    model = new_model(cfg, dtype)
    optimizer = make_optimizer(model, 1e-2)
    estimator, half, bounds = estimator_for(cfg, model.multimodal), B // world, []
    for r in range(world):
        xs = [batch[m][r * half:(r + 1) * half] for m in model.modalities]
        eps = draw_noise(model, K, half, noise_seed(cfg.train.seed, 0, r), "cpu")
        out = estimator(model, xs, K, eps=eps)
        (-out.mean() / world).backward()
        bounds.append(float(out.mean()))
    optimizer.step()
    return sum(bounds) / world, _snapshot(model)


def demo_config(P: int) -> Config:
    """configs/demo.yaml's model and objective (mnist_svhn, latent 20, dreg looser), K=8."""
    cfg = config("mnist_svhn", "dreg", True, P)
    cfg.model.latent_dim, cfg.objective.K, cfg.train.seed, cfg.data.batch_size = 20, 8, 1, 128
    return cfg


def demo_steps(accelerator, out: Path, name: str, P: int) -> None:
    """Two Adam steps (lr 1e-3, as the demo) of the demo model on a fixed random batch of 128."""
    cfg = demo_config(P)
    layout = make_layout(accelerator, cfg)
    g = torch.Generator().manual_seed(5)
    batch = {"mnist": torch.rand(128, 1, 28, 28, generator=g),
             "svhn": torch.rand(128, 3, 32, 32, generator=g)}
    bound, params = train_steps(accelerator, layout, cfg, batch, torch.float32, steps=2,
                                lr=cfg.train.lr)
    if accelerator.is_main_process:
        torch.save({"bounds": [bound], "params": params}, out / f"demo-{name}.pt")


def deepspeed_steps(accelerator, out: Path) -> None:
    """Two steps through DeepSpeed ZeRO-2 (one process): parameters as `ref2`'s. One case, the
    paper's setting (dreg, looser): DeepSpeed keeps global state, one engine per process."""
    layout = make_layout(accelerator, config("gaussian_pair", "iwae", False, 1))
    for case in [DEEPSPEED_CASE]:
        cfg = config(*case[:3], 1)
        bound, params = train_steps(accelerator, layout, cfg, batch_for(case[0], torch.float32),
                                    torch.float32, steps=2)
        name = "ref2" if accelerator.distributed_type != "DEEPSPEED" else "DS"
        torch.save({"bounds": [bound], "params": params},
                   out / f"{'-'.join(map(str, case[:2]))}-{int(case[2])}-{case[3]}-{name}.pt")


def main(argv=None) -> int:
    from mmvae.train.dist import deepspeed_requested, make_accelerator, release

    out = Path((argv or sys.argv[1:])[0])
    torch.set_num_threads(1)
    cfg = config("gaussian_pair", "iwae", False, 1)
    cfg.logging.wandb, cfg.data.batch_size = "disabled", B
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    if deepspeed_requested() or world == 1:
        deepspeed_steps(accelerator, out)
        if deepspeed_requested():
            release(accelerator, finished=True)
            return 0
    demo_steps(accelerator, out, "ref" if world == 1 else "P2", 1 if world == 1 else 2)
    layouts = {"ref": 1, "DPref": 1} if world == 1 else {"P2": 2, "DP": 1}
    for name, P in layouts.items():
        cfg0 = config("gaussian_pair", "iwae", False, P)
        layout = make_layout(accelerator, cfg0)
        for model_name, objective, looser, dt in CASES:
            cfg = config(model_name, objective, looser, P)
            batch = batch_for(model_name, DTYPES[dt])
            if name == "DP":  # each data-parallel rank holds half of the batch
                half = B // world
                batch = {k: v[layout.dp_rank * half:(layout.dp_rank + 1) * half]
                         for k, v in batch.items()}
            if name == "DPref":
                bound, params = dp_reference(cfg, batch, 2, DTYPES[dt])
            else:
                bound, params = train_steps(accelerator, layout, cfg, batch, DTYPES[dt])
            bounds = accelerator.gather(torch.tensor([bound])).tolist()
            if accelerator.is_main_process:
                torch.save({"bounds": bounds, "params": params},
                           out / f"{model_name}-{objective}-{int(looser)}-{dt}-{name}.pt")
    release(accelerator, finished=True)  # barrier, then close the group (no abort at exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
