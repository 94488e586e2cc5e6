"""Encoder-gradient signal-to-noise ratio of the estimators along a run (issue 18).

`python launch/grad_snr.py --run RUN_DIR [--points all] [--draws 20] [--out FILE] [--plot PNG]`
or `--config X.yaml [key=value ...]` (the initial weights of that config). For each point (init,
checkpoint steps, final), one fixed batch and R particle-noise draws shared by every estimator
(unbiased, paper, stl, cv, swap, iwae): per parameter group the mean and median over elements of
|mean|/sd of the gradient, and for mixtures the share of the unbiased DReG's encoder variance
that comes from the other experts' score terms (mmvae/eval/gradsnr.py, docs/estimators.md).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from mmvae.argv import OneLineParser


def parse_args(argv):
    p = OneLineParser(prog="grad_snr.py", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder (config.yaml, checkpoints/, model/)")
    src.add_argument("--config", help="YAML config: measure its initial weights")
    p.add_argument("--points", default=None, help="all | comma list of init, final, steps "
                                                  "(default: all with --run, init with --config)")
    p.add_argument("--estimators", default=None,
                   help="comma list (default: all; swap only with objective.looser)")
    p.add_argument("--draws", type=int, default=20, help="R noise draws per estimator")
    p.add_argument("--K", type=int, default=0, help="particles (default: objective.K)")
    p.add_argument("--batch-size", type=int, default=0, help="default: data.batch_size")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    p.add_argument("--no-decompose", action="store_true", help="skip the score-term variance split")
    p.add_argument("--out", help="JSON output (default: RUN_DIR/grad_snr.json or grad_snr.json)")
    p.add_argument("--plot", help="PNG of median SNR against the step")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (with --config)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmvae.config import ConfigError, load_config

    run_dir = Path(args.run) if args.run else None
    try:
        if run_dir is not None and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"no config.yaml in {run_dir}; pass a run folder written by train.py")
        cfg = load_config(run_dir / "config.yaml" if run_dir else args.config, args.overrides)
        from mmvae.eval import gradsnr, gradsnr_run as R
        estimators = ([e for e in args.estimators.split(",") if e] if args.estimators else
                      [e for e in gradsnr.ESTIMATORS if e != "swap" or cfg.objective.looser])
        from mmvae.log import make_console
        from mmvae.train.loop import model_kwargs

        bad = [e for e in estimators if e not in gradsnr.ESTIMATORS]
        if bad or args.draws < 2:
            raise ConfigError(f"estimators {bad} unknown (valid: {', '.join(gradsnr.ESTIMATORS)})"
                              if bad else "--draws must be >= 2 (an sd needs two draws)")
        if "swap" in estimators and not cfg.objective.looser:
            raise ConfigError("estimator swap needs objective.looser=true; "
                              "use cv for the joint bound")
        points = R.resolve_points(args.points or ("all" if run_dir else "init"), run_dir)
        model, initial = R.fresh_model(cfg, model_kwargs(cfg))
        K, B = args.K or cfg.objective.K, args.batch_size or cfg.data.batch_size
        xs = R.fixed_batch(model, cfg, B, args.split, args.seed)
        for p in points:  # every point loads before any is measured: a typo fails in seconds
            R.load_point(model, p, run_dir, initial)
        console = make_console(stderr=True)
        rows = R.measure_points(model, cfg, points, run_dir, initial=initial, xs=xs, K=K, estimators=estimators,
                                draws=args.draws, seed=args.seed,
                                decompose=not args.no_decompose, say=console.print)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {(str(err).splitlines() or [type(err).__name__])[0]}", file=sys.stderr)
        return 2
    payload = {"run_dir": str(run_dir) if run_dir else None, "config": args.config,
               "model": cfg.model.name, "looser": cfg.objective.looser, "K": K,
               "batch_size": int(xs[0].shape[0]), "draws": args.draws, "split": args.split,
               "seed": args.seed,
               "snr_floor": (2 / (math.pi * args.draws)) ** 0.5, "points": rows}
    out = Path(args.out) if args.out else (run_dir or Path(".")) / "grad_snr.json"
    R.write_json(out, payload)
    if args.plot:
        R.plot(payload, Path(args.plot))
    make_console(stderr=False).print(R.table(payload))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
