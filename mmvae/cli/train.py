"""Train a model: `accelerate launch launch/train.py --config configs/demo.yaml [key=value ...]`.

Also runs as `python launch/train.py ...` (one process). See README "Training".
"""
from __future__ import annotations

import argparse
import sys

from mmvae.argv import OneLineParser
from mmvae.config import ConfigError, describe, load_config
from mmvae.data.errors import ShardDataError


def parse_args(argv):
    p = OneLineParser(prog="train.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    p.add_argument("--resume", help="'auto' (the newest usable checkpoint of run.dir, or of the "
                                    "experiment's newest run; none: start afresh) or a run folder "
                                    "or RUN_DIR/checkpoints/<step>; see docs/slurm.md")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.K=50")
    return p.parse_intermixed_args(argv)  # overrides before or after the options


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:  # before torch is imported: a bad config fails in a second
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Imported outside the `try` that names them: an error raised while importing (or in
    # load_config) must show as itself, not as a NameError of the except clause.
    from mmvae.train.dist import is_main_process
    from mmvae.train.loop import TrainingStopped, fit

    try:
        run_dir, status = fit(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 1
    except ShardDataError as err:  # bad data under data.on_error=raise: one line, a failed run
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints written so far are complete (atomic)
        print("interrupted: the last checkpoint is kept; continue with the same command and "
              "--resume auto", file=sys.stderr)
        return 1
    if is_main_process():  # one line for scripts to read, not one per rank
        print(f"{status}: {run_dir}")
    return 0

