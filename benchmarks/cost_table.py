"""Cost against work: training-step time against K and against B, fp32 and bf16, in one process.

    python benchmarks/cost_table.py --threads 1                       # the README table (long)
    python benchmarks/cost_table.py --threads 1 --ks 1 5 30 --k-batch 16 --bs 16 32 \\
        --b-particles 5 --rounds 1                                      # a quick look

Two sweeps at the paper setting of benchmarks/bench.py (mnist_svhn, dreg looser): K in --ks at
B = --k-batch, and B in --bs at K = --b-particles; K above --k-chunk runs in chunks of that
size (memory that follows the chunk, not K). At every point the fp32 and bf16 steps alternate
in this process (`bench_ab.Arm`: same weights, batch and noise), so the load of a shared box
falls on both alike. Columns: median step seconds, microseconds per particle-datapoint
(step / (K*B): flat when time grows linearly in K*B, a jump is a cliff), and the efficiency
against the box's matmul peak of that precision (`mmvae.perf`, FLOP counted once per point).
Prints a markdown table (stdout) and, with --out, writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_ab import Arm, alternate  # noqa: E402

from mmvae import perf  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="*", default=[1, 5, 30, 100, 1000])
    p.add_argument("--k-batch", type=int, default=128, help="B of the K sweep")
    p.add_argument("--bs", type=int, nargs="*", default=[32, 64, 128, 256, 512])
    p.add_argument("--b-particles", type=int, default=30, help="K of the B sweep")
    p.add_argument("--k-chunk", type=int, default=100, help="chunk size for K above it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", default="", help="also write the rows to this JSON file")
    p.add_argument("overrides", nargs="*", help="config overrides of every point")
    return p.parse_args(argv)


def point(K: int, B: int, args, peaks: dict) -> dict:
    """One (K, B): fp32 and bf16 steps alternating; the row of the table."""
    chunk = args.k_chunk if K > args.k_chunk else 0
    shared = args.overrides + [f"objective.K={K}", f"data.batch_size={B}",
                               f"objective.k_chunk={chunk}"]
    arms = {name: Arm(shared + [f"train.mixed_precision={p}"]) for name, p in PRECISIONS.items()}
    flops = perf.count_flops(arms["fp32"].step)  # also each arm's warm-up step
    arms["bf16"].step()
    load = os.getloadavg()[0]
    times = alternate(arms, args.rounds, warmup=0)
    row = {"K": K, "B": B, "k_chunk": chunk, "gflop_per_step": round(flops / 1e9, 2),
           "load_1min": round(load, 1)}
    for name, t in times.items():
        seconds = statistics.median(t)
        row[f"{name}_step_s"] = round(seconds, 3)
        row[f"{name}_us_per_kb"] = round(seconds / (K * B) * 1e6, 1)
        row[f"{name}_efficiency"] = perf.efficiency(flops, seconds, peaks[name])["efficiency"]
    return row


def markdown(rows: list[dict], peaks: dict) -> str:
    head = ("| K | B | k_chunk | GFLOP | fp32 s | fp32 µs/(K·B) | fp32 eff. | bf16 s "
            "| bf16 µs/(K·B) | bf16 eff. | bf16 speed-up | load |")
    lines = [f"peaks: fp32 {peaks['fp32'].flops_per_s / 1e9:.0f} GFLOP/s, bf16 "
             f"{peaks['bf16'].flops_per_s / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} "
             "thread(s))", "", head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['B']} | {r['k_chunk'] or '–'} | {r['gflop_per_step']} "
            f"| {r['fp32_step_s']} | {r['fp32_us_per_kb']} | {r['fp32_efficiency']:.0%} "
            f"| {r['bf16_step_s']} | {r['bf16_us_per_kb']} | {r['bf16_efficiency']:.0%} "
            f"| {r['fp32_step_s'] / r['bf16_step_s']:.2f}× | {r['load_1min']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {name: perf.matmul_peak(perf.precision_dtype(p)) for name, p in PRECISIONS.items()}
    grid = [(K, args.k_batch) for K in args.ks]
    grid += [(args.b_particles, B) for B in args.bs if (args.b_particles, B) not in grid]
    rows = []
    for K, B in grid:
        rows.append(point(K, B, args, peaks))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress on a long sweep
    print(markdown(rows, peaks))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
