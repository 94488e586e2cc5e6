"""Benchmark the evaluation: `python benchmarks/bench_eval.py [--run RUN] [--iwae-datapoints N]`.

1. The full evaluation of a demo-like run (every metric of its eval section, plus overrides),
   with the seconds of each metric.
2. IWAE with K=1000 (all estimates of ``mmvae.eval.likelihoods``) on the first N test pairs of
   the run's shards (the digits test set has 7,180), with the time per 1,000 datapoints and the
   projection to the whole test set.

For 2 also the efficiency (`mmvae.perf`): the FLOP per datapoint, counted once on one
likelihood batch before the timing, achieved GFLOP/s against the box's fp32 matmul peak (the
evaluation runs in fp32) with the same threads. `--profile` prints the top operators of that
batch. Without --run, a demo run is trained first (configs/demo.yaml, train.max_steps=50).
Reports wall and CPU (process) seconds and the load average, since the box may be shared;
writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout too


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench_eval.py", description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run folder to evaluate (default: train a demo run first)")
    p.add_argument("--iwae-datapoints", type=int, default=256,
                   help="test pairs of the IWAE-1000 timing (0 = the whole test set)")
    p.add_argument("--skip-full", action="store_true", help="only time IWAE-1000")
    p.add_argument("--out", default="", help="write the figures to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="print the top operators of one IWAE-1000 likelihood batch")
    p.add_argument("overrides", nargs="*", help="config overrides of the full evaluation, "
                   "e.g. eval.max_datapoints=500")
    return p.parse_args(argv)


def train_demo(folder: Path) -> Path:
    run = folder / "demo_run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/demo.yaml",
           "train.max_steps=50", f"run.dir={run}", "logging.wandb=disabled"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "disabled"})
    return run


def timed(fn):
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 2),
                 "cpu_s": round(time.process_time() - cpu, 2), "load_before": round(load, 2),
                 "load_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    from mmvae import perf
    from mmvae.eval.run import prepare

    if args.run:  # a bad run folder or override: one line before any timing
        try:
            prepare(args.run, None, args.overrides, progress=False)
        except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
            print(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
            return 2
    from mmvae.eval.run import evaluate_run

    console = Console()
    run = Path(args.run) if args.run else train_demo(Path(tempfile.mkdtemp(prefix="bench_eval_")))
    figures = {"run": str(run), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    table = Table(title=f"evaluation benchmark: {run}", title_justify="left")
    for col in ("what", "wall s", "cpu s", "load 1 min", "notes"):
        table.add_column(col, justify="left" if col in ("what", "notes") else "right")
    if not args.skip_full:
        payload, t = timed(lambda: evaluate_run(run, None, args.overrides, progress=False))
        figures["full"] = {**t, "overrides": args.overrides, "metric_seconds": payload["metric_seconds"]}
        per_metric = ", ".join(f"{k} {v:.1f}" for k, v in payload["metric_seconds"].items())
        table.add_row("full evaluation", f"{t['wall_s']:.1f}", f"{t['cpu_s']:.1f}",
                      f"{t['load_before']:.1f}", per_metric)
    n = args.iwae_datapoints

    def iwae(datapoints):
        return evaluate_run(run, ["likelihood"], ["eval.iwae_K=1000",
                                                  f"eval.max_datapoints={datapoints}"],
                            progress=False)

    one_batch = _likelihood_batch(run)
    flop_per_pair = perf.count_flops(lambda: iwae(one_batch)) / one_batch  # outside the timing
    if args.profile:
        print(perf.profile_table(lambda: iwae(one_batch), _device()), file=sys.stderr)
    payload, t = timed(lambda: iwae(n))
    lik = payload["metrics"]["likelihood"]
    done = lik["num_datapoints"]
    total = _test_size(run) or done
    per_1000 = t["wall_s"] * 1000 / done
    figures["iwae_1000"] = {**t, "datapoints": done, "test_set": total,
                            "wall_s_per_1000": round(per_1000, 1),
                            "cpu_s_per_1000": round(t["cpu_s"] * 1000 / done, 1),
                            "projected_wall_s_test_set": round(per_1000 * total / 1000, 1),
                            "likelihood_batch": payload["options"]["likelihood_batch"],
                            "k_chunk": lik["k_chunk"],
                            "gflop_per_pair": round(flop_per_pair / 1e9, 3),
                            **perf.efficiency(round(flop_per_pair * done), t["wall_s"],
                                              perf.matmul_peak(torch.float32, _device()))}
    eff = figures["iwae_1000"]
    table.add_row(f"IWAE K=1000, {done} pairs", f"{t['wall_s']:.1f}", f"{t['cpu_s']:.1f}",
                  f"{t['load_before']:.1f}",
                  f"{per_1000:.0f} s / 1000 pairs -> {per_1000 * total / 1000 / 60:.0f} min for "
                  f"all {total}; {eff['achieved_gflops']} GFLOP/s = {eff['efficiency']:.1%} of "
                  f"the fp32 matmul peak ({eff['peak_gflops']})")
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"figures: {args.out}")
    return 0


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as evaluate_run


def _likelihood_batch(run: Path) -> int:
    from mmvae.config import load_config

    return load_config(run / "config.yaml").eval.likelihood_batch


def _test_size(run: Path) -> int | None:
    from mmvae.config import load_config

    shards = Path(load_config(run / "config.yaml").data.shards)
    try:
        return json.loads((shards / "manifest.json").read_text())["splits"]["test"]["num_samples"]
    except (OSError, KeyError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
