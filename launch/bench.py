"""Training-step throughput and peak memory on random data (a benchmark, not a test).

    python launch/bench.py                                   # mnist_svhn, dreg looser, K=30, B=128
    python launch/bench.py --K 1000 --k-chunk 50 --steps 3   # bounded memory at large K

Prints samples/s (datapoints per second) and samples*particles/s, and the peak memory
(RSS on CPU, torch.cuda.max_memory_allocated on GPU). Run one configuration per process when
comparing peak RSS: the high-water mark never goes down.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmvae import build_model, objectives  # noqa: E402
from mmvae.parallel import backward_objective  # noqa: E402
from mmvae.train.optim import make_optimizer  # noqa: E402


def random_batch(model, B, device):
    return [torch.rand(B, *e.data_shape, device=device) for e in model.experts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist_svhn")
    p.add_argument("--objective", default="dreg", choices=["elbo", "iwae", "dreg"])
    p.add_argument("--looser", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--K", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--k-chunk", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, latent_dim=args.latent_dim, learn_prior=True).to(device)
    opt = make_optimizer(model, 1e-3)
    looser = args.looser and model.multimodal
    estimator = objectives.select(args.objective, model.multimodal, looser=looser)
    xs = random_batch(model, args.batch_size, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        opt.zero_grad(set_to_none=True)
        eps = model.sample_noise(args.K, args.batch_size, device=device)
        with autocast:
            if args.objective == "elbo":
                (-estimator(model, xs, 1, eps=eps).mean()).backward()
            else:
                backward_objective(estimator, model, xs, eps, looser=looser, k_chunk=args.k_chunk,
                                   backward=lambda loss, last: loss.backward())
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"model": args.model, "objective": args.objective, "looser": looser, "K": args.K,
              "batch_size": args.batch_size, "k_chunk": args.k_chunk, "device": str(device),
              "precision": args.precision, "threads": torch.get_num_threads(),
              "step_s": round(seconds, 4), "samples_per_s": round(args.batch_size / seconds, 1),
              "samples_particles_per_s": round(args.batch_size * args.K / seconds, 1),
              "peak_mem_mb": round(peak / 2**20, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
