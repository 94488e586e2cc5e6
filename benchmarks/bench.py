"""Training-step throughput and peak memory on random data (a benchmark, not a test).

    python benchmarks/bench.py                                   # mnist_svhn, dreg looser, K=30, B=128
    python benchmarks/bench.py objective.K=1000 objective.k_chunk=50 --steps 1 --warmup 0
    python benchmarks/bench.py train.mixed_precision=bf16 train.compile=true --profile
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no benchmarks/bench.py parallel.particle_shards=2 --threads 1

It times the trainer's own step (`mmvae.train.step.train_step`: noise, particle shards, K-chunks,
DDP/DeepSpeed backward, optimiser) on a fixed random batch. Overrides are config keys, as for
launch/train.py. Prints one JSON line: samples/s (datapoints of one particle group per second),
samples*particles/s, the peak memory (RSS of rank 0 on CPU, max allocated on GPU), and the
efficiency (`mmvae.perf`): the FLOP of one step (counted once, before the timing), the box's
matmul peak in the precision in use with the same threads, achieved GFLOP/s and
efficiency = achieved / peak -- all per process (rank 0's). `--profile` also prints the top
operators of one step (stderr). With train.compile=true the first step (which compiles the
nets) is timed on its own: first_step_with_compile_s. Run one configuration per process when
comparing peak RSS: the high-water mark never goes down.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmvae import perf  # noqa: E402
from mmvae.config import ConfigError, load_config  # noqa: E402
from mmvae.registry import build_model  # noqa: E402
from mmvae.train.compiled import compile_nets  # noqa: E402
from mmvae.train.dist import make_accelerator, make_layout  # noqa: E402
from mmvae.train.loop import model_kwargs  # noqa: E402
from mmvae.train.optim import make_optimizer  # noqa: E402
from mmvae.train.step import ObjectiveModule, estimator_for, train_step  # noqa: E402

DEFAULTS = ["model.name=mnist_svhn", "model.latent_dim=20", "model.learn_prior=true",
            "objective.name=dreg", "objective.looser=true", "objective.K=30",
            "data.batch_size=128", "logging.wandb=disabled"]


def random_batch(model, B: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {e.modality: torch.rand(B, *e.data_shape, generator=g).to(device)
            for e in model.experts}


def parse_args(argv):
    """The options, checked."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = default)")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. objective.K=50")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(None, DEFAULTS + args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    acc = make_accelerator(cfg)
    layout = make_layout(acc, cfg)
    torch.manual_seed(cfg.train.seed)
    model = compile_nets(build_model(cfg.model.name, **model_kwargs(cfg)), cfg.train.compile)
    optimizer = make_optimizer(model, cfg.train.lr)
    wrapped, optimizer = acc.prepare(ObjectiveModule(model, estimator_for(cfg, model.multimodal)),
                                     optimizer)
    ctx = SimpleNamespace(cfg=cfg, model=model, accelerator=acc, layout=layout, step=0,
                          wrapped=wrapped, optimizer=optimizer, params=list(model.parameters()),
                          looser=cfg.objective.looser and model.multimodal)
    batch = random_batch(model, cfg.data.batch_size, acc.device, seed=layout.dp_rank)
    cuda = acc.device.type == "cuda"
    compile_s = None
    if cfg.train.compile:  # the first step compiles the nets: time it on its own
        t0 = time.perf_counter()
        train_step(ctx, batch)
        compile_s = round(time.perf_counter() - t0, 2)
    flops = perf.count_flops(lambda: train_step(ctx, batch))  # also warms up
    for ctx.step in range(1, args.warmup + 1):
        train_step(ctx, batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for ctx.step in range(args.warmup + 1, args.warmup + 1 + args.steps):
        train_step(ctx, batch)
    if cuda:
        torch.cuda.synchronize()
    acc.wait_for_everyone()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    matmul = perf.matmul_peak(perf.precision_dtype(cfg.train.mixed_precision), acc.device)
    if args.profile:
        table = perf.profile_table(lambda: train_step(ctx, batch), acc.device)
        if acc.is_main_process:
            print(table, file=sys.stderr)
    B, K = cfg.data.batch_size * layout.dp_size, cfg.objective.K
    if acc.is_main_process:
        print(json.dumps({
            "model": cfg.model.name, "objective": cfg.objective.name, "looser": ctx.looser,
            "K": K, "batch_size": cfg.data.batch_size, "k_chunk": cfg.objective.k_chunk,
            "processes": layout.world, "particle_shards": layout.particle_shards,
            "device": str(acc.device), "precision": cfg.train.mixed_precision,
            "compile": cfg.train.compile, "first_step_with_compile_s": compile_s,
            "threads": torch.get_num_threads(), "step_s": round(seconds, 4),
            "samples_per_s": round(B / seconds, 1),
            "samples_particles_per_s": round(B * K / seconds, 1),
            "peak_mem_mb": round(peak / 2**20, 1), **perf.efficiency(flops, seconds, matmul)}))
    acc.wait_for_everyone()  # no rank tears down the group while a peer still uses it
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
