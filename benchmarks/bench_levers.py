"""What each speed lever of the mnist_svhn step buys, side by side in one process.

    python benchmarks/bench_levers.py --threads 1                  # paper setting, fp32 and bf16
    python benchmarks/bench_levers.py --threads 1 --rounds 5 objective.K=8

Arms (same weights, batch and noise; `bench_ab.Arm` steps, alternating arm by arm):

* ``plain``: the textbook evaluation -- the SVHN decoder as its nn.Sequential of
  ConvTranspose2d in the default (NCHW) layout, the first one on a 1x1 input, and the Laplace
  likelihood as the elementwise log-density summed over pixels (`mmvae.dists.log_sum`);
* ``layout``: plain, with the decoder as it is (`mmvae.nets.svhn.Decoder`: first layer as one
  matrix product, the others channels-last);
* ``current``: layout, with the likelihood as it is (`LocScaleLikelihood.log_prob_sum`: distance
  summed first, scale and normaliser applied once);
* ``enc_cl``: current, with the SVHN encoder's input channels-last too (a candidate).

The plain forms are swapped in per instance here, so the library keeps one code path. Prints
one JSON line per precision: median step seconds per arm and each lever's gain (the previous
arm's time over this one's, per round: [median, min, max]).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_ab import Arm, alternate  # noqa: E402

from mmvae.dists import get_family, log_sum  # noqa: E402

ARMS = ("plain", "layout", "current", "enc_cl")


class PlainLikelihood:
    """The elementwise log-density of a fixed-scale likelihood, summed over the data dims."""

    def __init__(self, likelihood):
        self.family, self.scale = get_family(likelihood.family), likelihood.scale
        self.mean = likelihood.mean

    def log_prob_sum(self, x, out, ndims):
        scale = torch.tensor(self.scale, dtype=torch.float32, device=out.device)
        return log_sum(self.family.log_prob(x, out, scale).flatten(-ndims))


def _plain_decoder(self, z):
    return self.body(z.reshape(*z.shape, 1, 1))


def _channels_last_encoder(self, x):
    h = self.body(x.contiguous(memory_format=torch.channels_last))
    return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


def make_arm(name: str, overrides: list[str]) -> Arm:
    arm = Arm(overrides)
    svhn = arm.model.experts[1]
    if name in ("plain", "layout"):
        for expert in arm.model.experts:
            expert.likelihood = PlainLikelihood(expert.likelihood)
    if name == "plain":
        svhn.dec.forward = types.MethodType(_plain_decoder, svhn.dec)
    if name == "enc_cl":
        svhn.enc.forward = types.MethodType(_channels_last_encoder, svhn.enc)
    return arm


def _ratio(before: list[float], after: list[float]) -> list[float]:
    """[median, min, max] over the rounds of before/after: a ratio within one round, where the
    two arms ran seconds apart, drifts less with the load than a ratio of medians."""
    r = sorted(x / y for x, y in zip(before, after))
    return [round(statistics.median(r), 3), round(r[0], 3), round(r[-1], 3)]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--precisions", nargs="*", default=["no", "bf16"])
    p.add_argument("overrides", nargs="*", help="config overrides of every arm")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for precision in args.precisions:
        overrides = args.overrides + [f"train.mixed_precision={precision}"]
        arms = {name: make_arm(name, overrides) for name in ARMS}
        load = os.getloadavg()[0]
        times = alternate(arms, args.rounds)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(json.dumps({
            "precision": precision, "overrides": args.overrides, "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "load_1min": [round(load, 1), round(os.getloadavg()[0], 1)],
            "step_s": {k: round(v, 3) for k, v in med.items()},
            "gain": {b: _ratio(times[a], times[b]) for a, b in zip(ARMS, ARMS[1:])},
            "current_vs_plain": _ratio(times["plain"], times["current"]),
            "steps_s": {k: [round(x, 2) for x in v] for k, v in times.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
