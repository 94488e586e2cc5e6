"""Build a built-in offline dataset's shards: ``python launch/shard_demo.py --dataset digits
--out shards/demo-digits [--seed 0 --pairs-per-instance 20]``."""
from __future__ import annotations

import argparse
import sys
import time

NOT_YET = {"shapes"}  # planned built-ins


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage + message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="shard_demo.py", description=__doc__)
    parser.add_argument("--dataset", required=True, help="digits (shapes: not implemented yet)")
    parser.add_argument("--out", required=True, help="output folder for shards + manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs-per-instance", type=int, default=20)
    args = parser.parse_args(argv)

    from mmvae.data.builtin import BUILTINS

    if args.dataset in NOT_YET:
        parser.error(f"--dataset {args.dataset}: not implemented yet")
    if args.dataset not in BUILTINS:
        parser.error(f"unknown --dataset {args.dataset!r}; valid: {', '.join(sorted(BUILTINS) + sorted(NOT_YET))}")
    if args.pairs_per_instance < 1:
        parser.error(f"--pairs-per-instance must be >= 1, got {args.pairs_per_instance}")
    start = time.perf_counter()
    manifest = BUILTINS[args.dataset](args.out, seed=args.seed, pairs_per_instance=args.pairs_per_instance)
    counts = ", ".join(f"{split}: {info['num_samples']} samples in {len(info['shards'])} shards"
                       for split, info in manifest["splits"].items())
    print(f"{args.dataset} -> {args.out} ({counts}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
