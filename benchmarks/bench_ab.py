"""Two configurations side by side in one process: `python benchmarks/bench_ab.py --b OVERRIDES`.

    python benchmarks/bench_ab.py --threads 1 --b train.compile=true           # compile vs eager
    python benchmarks/bench_ab.py --threads 1 --a train.mixed_precision=no \\
        --b train.mixed_precision=bf16 --both objective.K=4                    # the demo setting

On a shared box the load moves from minute to minute, so two runs in two processes compare the
load as much as the code. Here arms A and B (config overrides on top of the paper setting of
benchmarks/bench.py and --both) are built in one process
with the same initial weights and batch, and their training steps alternate, A B A B ...:
the median step time of each arm and the ratio A/B (> 1: B is faster). A step is the trainer's
maths (`mmvae.parallel.backward_objective`: estimator, K-chunks, backward) under torch's
autocast and an Adam step, without accelerate (whose one Accelerator per process cannot hold
two precisions). With train.compile=true an arm's first step (compilation) is timed on its own.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmvae.config import ConfigError, load_config  # noqa: E402
from mmvae.parallel import backward_objective  # noqa: E402
from mmvae.registry import build_model  # noqa: E402
from mmvae.train.compiled import compile_nets  # noqa: E402
from mmvae.train.loop import model_kwargs  # noqa: E402
from mmvae.train.optim import make_optimizer  # noqa: E402
from mmvae.train.precision import resolve_precision  # noqa: E402
from mmvae.train.step import draw_noise, estimator_for  # noqa: E402

DEFAULTS = ["model.name=mnist_svhn", "model.latent_dim=20", "model.learn_prior=true",
            "objective.name=dreg", "objective.looser=true", "objective.K=30",
            "data.batch_size=128", "logging.wandb=disabled"]
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Arm:
    """One configuration: model (seeded weights), Adam, a fixed random batch and noise."""

    def __init__(self, overrides: list[str]):
        self.cfg = cfg = load_config(None, DEFAULTS + overrides)
        resolve_precision(cfg, "cpu")
        torch.manual_seed(cfg.train.seed)
        self.model = compile_nets(build_model(cfg.model.name, **model_kwargs(cfg)),
                                  cfg.train.compile)
        self.optimizer = make_optimizer(self.model, cfg.train.lr)
        self.estimator = estimator_for(cfg, self.model.multimodal)
        B, K = cfg.data.batch_size, cfg.objective.K
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.rand(B, *e.data_shape, generator=g) for e in self.model.experts]
        self.eps = draw_noise(self.model, K, B, seed=1, device="cpu")
        self.dtype = AUTOCAST[cfg.train.mixed_precision]
        self.compile_s = self.timed() if cfg.train.compile else None

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16,
                            enabled=self.dtype is not None):
            backward_objective(self.estimator, self.model, self.xs, self.eps,
                               looser=self.cfg.objective.looser and self.model.multimodal,
                               k_chunk=self.cfg.objective.k_chunk,
                               backward=lambda loss, last: loss.backward())
        self.optimizer.step()

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.step()
        return time.perf_counter() - t0


def alternate(arms: dict[str, Arm], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Step times of each arm over `rounds` rounds, the arms stepping in turn (after `warmup`
    untimed rounds)."""
    for _ in range(warmup):
        for arm in arms.values():
            arm.step()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            times[name].append(arm.timed())
    return times


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", nargs="*", default=[], help="overrides of arm A (default: none)")
    p.add_argument("--b", nargs="*", default=[], help="overrides of arm B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--both", nargs="*", default=[], help="overrides both arms share")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        arms = {"A": Arm(args.both + args.a), "B": Arm(args.both + args.b)}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    times = alternate(arms, args.rounds, args.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "shared": args.both, "a": args.a, "b": args.b, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
        "a_step_s": round(med["A"], 4), "b_step_s": round(med["B"], 4),
        "a_over_b": round(med["A"] / med["B"], 3),
        "a_steps_s": [round(t, 3) for t in times["A"]],
        "b_steps_s": [round(t, 3) for t in times["B"]],
        "a_first_step_with_compile_s": arms["A"].compile_s and round(arms["A"].compile_s, 2),
        "b_first_step_with_compile_s": arms["B"].compile_s and round(arms["B"].compile_s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
