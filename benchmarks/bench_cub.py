"""Training-step throughput and peak memory of the CUB models on random data (a benchmark).

    python benchmarks/bench_cub.py                          # cubIS, dreg looser, K=50, B=64, D=64
    python benchmarks/bench_cub.py --k-chunk 10             # at most 10 particles alive at once
    python benchmarks/bench_cub.py --model cubISft
    python benchmarks/bench_cub.py --logits-loss            # caption loss from full logits (memory)

Random images in [0, 1] / non-negative features, and captions of 8-31 random tokens + <eos> +
<pad> over a vocabulary of --vocab-size (CUB: 1590). Prints one JSON line: samples/s,
samples*particles/s, the peak memory (max RSS of the process on CPU,
torch.cuda.max_memory_allocated on GPU) and the efficiency (`mmvae.perf`: FLOP of one step,
counted once before the timing; the box's matmul peak in --precision with the same threads;
efficiency = achieved / peak). `--profile` also prints the top operators of one step (stderr).
Run one configuration per process: the RSS high-water mark never goes down.
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

from mmvae import build_model, objectives, perf  # noqa: E402
from mmvae.models.cub import CaptionVAE  # noqa: E402
from mmvae.parallel import backward_objective  # noqa: E402
from mmvae.train.optim import make_optimizer  # noqa: E402
from mmvae.train.precision import auto_precision  # noqa: E402


def random_batch(model, B: int, vocab_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    xs = []
    for expert in model.experts:
        if isinstance(expert, CaptionVAE):
            ids = torch.randint(3, vocab_size, (B, 32), generator=generator)
            lengths = torch.randint(8, 32, (B,), generator=generator)
            pos = torch.arange(32)
            ids[pos > lengths[:, None]] = 1  # <pad>
            ids[pos == lengths[:, None]] = 2  # <eos>
            xs.append(ids)
        else:
            xs.append(torch.rand(B, *expert.data_shape, generator=generator))
    return xs


def _logits_loss(self, x, z):
    """The plain path: full (..., 32, V) logits, then log-sum-exp (for the memory comparison)."""
    return self.likelihood.log_prob_sum(x, self.decode(z))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv):
    """The options, checked."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cubIS", choices=["cubIS", "cubISft"])
    p.add_argument("--objective", default="dreg", choices=["iwae", "dreg"])
    p.add_argument("--looser", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--K", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--k-chunk", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=1590)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16", "auto"],
                   help="autocast dtype; auto = bf16 where native (as train.mixed_precision)")
    p.add_argument("--logits-loss", action="store_true",
                   help="score captions from full logits instead of the fused likelihood")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.logits_loss:
        CaptionVAE.log_likelihood = _logits_loss
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = auto_precision(device.type)[0]
    model = build_model(args.model, latent_dim=args.latent_dim, learn_prior=True,
                        vocab_size=args.vocab_size).to(device)
    opt = make_optimizer(model, 1e-3)
    estimator = objectives.select(args.objective, True, looser=args.looser)
    xs = [x.to(device) for x in random_batch(model, args.batch_size, args.vocab_size,
                                             torch.Generator().manual_seed(0))]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        opt.zero_grad(set_to_none=True)
        eps = model.sample_noise(args.K, args.batch_size, device=device)
        with autocast:
            backward_objective(estimator, model, xs, eps, looser=args.looser, k_chunk=args.k_chunk,
                               backward=lambda loss, last: loss.backward())
        opt.step()

    rss_before = max_rss_mb()
    flops = perf.count_flops(step)  # once, outside the timing
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    cpu_seconds = (time.process_time() - c0) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max_rss_mb())
    matmul = perf.matmul_peak(perf.precision_dtype(args.precision), device)
    if args.profile:
        print(perf.profile_table(step, device), file=sys.stderr)
    result = {"model": args.model, "objective": args.objective, "looser": args.looser, "K": args.K,
              "batch_size": args.batch_size, "k_chunk": args.k_chunk,
              "vocab_size": args.vocab_size, "latent_dim": args.latent_dim,
              "caption_loss": "logits" if args.logits_loss else "fused", "device": str(device),
              "precision": args.precision, "threads": torch.get_num_threads(),
              "step_s": round(seconds, 2), "cpu_s_per_step": round(cpu_seconds, 2),
              "samples_per_s": round(args.batch_size / seconds, 3),
              "samples_particles_per_s": round(args.batch_size * args.K / seconds, 1),
              "peak_mem_mb": round(peak, 1), "rss_before_steps_mb": round(rss_before, 1),
              **perf.efficiency(flops, seconds, matmul)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
