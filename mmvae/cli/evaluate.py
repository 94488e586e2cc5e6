"""Evaluate a run: `python launch/evaluate.py --run RUN_DIR [--metrics a,b] [key=value ...]`.

Writes RUN_DIR/eval.json, RUN_DIR/eval/*.png and RUN_DIR/report.md; prints the metrics table.
Metrics: likelihood, coherence (digit datasets), latent, pictures, cca (feature-caption models)
(default: eval.metrics). Also runs under `accelerate launch` (see README): the likelihood and
coherence batches are split across the processes, with the numbers of one process.
"""
from __future__ import annotations

import sys
import warnings

from mmvae.argv import OneLineParser


def parse_args(argv):
    p = OneLineParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (holds config.yaml and model/)")
    p.add_argument("--metrics", help="comma-separated metric names (default: eval.metrics)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.iwae_K=5000")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None

    from mmvae.data.checks import check_shards
    from mmvae.data.errors import ShardDataError
    from mmvae.eval.report import metrics_table
    from mmvae.eval.run import execute, prepare
    from mmvae.log import make_console
    from mmvae.train.dist import accelerator_ranks, make_eval_accelerator, release

    accelerator = make_eval_accelerator()
    ranks = accelerator_ranks(accelerator)
    finished = False
    try:
        try:  # every check happens here, before anything is computed or written
            with warnings.catch_warnings(record=True) as notes:  # "skipping <metric>: why"
                warnings.simplefilter("always")
                ctx, names = prepare(args.run, metrics, args.overrides, ranks=ranks,
                                     device=str(accelerator.device))
            for note in notes if ranks.is_main else ():  # one line each, not a warning's two
                print(f"note: {note.message}", file=sys.stderr)
            if not ctx.is_toy:  # bad manifest, missing shard, empty split: before any work
                check_shards(ctx.cfg.data.shards, ["test"], verify=ctx.cfg.data.verify,
                             on_error=ctx.cfg.data.on_error)
        except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
            if ranks.is_main:
                print(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
            return 2
        payload = execute(ctx, names)
        finished = True
    except ShardDataError as err:  # bad data under data.on_error=raise: one line
        if ranks.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # eval.json and report.md are written at the end: none is half done
        if ranks.is_main:
            print("interrupted: eval.json and report.md were not written", file=sys.stderr)
        return 1
    finally:
        release(accelerator, finished=finished)
    if ranks.is_main:
        console = make_console(stderr=False)  # full lines when piped
        console.print(metrics_table(payload))
        console.print(f"report: {payload['report']}")
    return 0

