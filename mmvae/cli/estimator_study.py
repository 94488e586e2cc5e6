"""Estimator seed study (issue 18): train + evaluate variants x seeds x budgets, write one table.

`python launch/estimator_study.py --config configs/demo.yaml --variants unbiased,paper,stl,iwae,elbo
--seeds 1,2,3,4,5 --budgets 3,10 --out runs/estimator-study [--eval key=value ...]`

Each run is `launch/train.py` (the config, the variant's objective, train.seed, train.epochs =
the budget) into OUT/<budget>ep/<variant>/seed<seed>/, then `launch/evaluate.py` on it, each in
its own process. Finished steps are skipped (a run with model/, an evaluation with eval.json), so
the same command continues an interrupted study. Writes OUT/study.json, OUT/study.md (mean ± sd
per budget and variant, paired differences against the first variant) and OUT/timings.jsonl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mmvae.argv import OneLineParser

HERE = Path(__file__).resolve().parents[2] / "launch"  # the entry points it runs


def parse_args(argv):
    p = OneLineParser(prog="estimator_study.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML experiment config (configs/demo.yaml)")
    p.add_argument("--variants", default="unbiased,paper,stl,iwae,elbo",
                   help="comma list; the first is the reference of the paired differences")
    p.add_argument("--seeds", default="1,2,3,4,5")
    p.add_argument("--budgets", default="3,10", help="comma list of train.epochs")
    p.add_argument("--max-steps", type=int, default=0, help="cap every run (train.max_steps)")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--metrics", default="coherence,latent,likelihood", help="evaluate.py --metrics")
    p.add_argument("--train", nargs="*", default=[], help="extra train overrides (key=value)")
    p.add_argument("--eval", nargs="*", default=[], help="evaluate.py overrides (key=value)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p.parse_args(argv)


def plan(args) -> list[dict]:
    from mmvae.eval.study import VARIANTS

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    runs = []
    for budget in budgets:
        for variant in variants:
            for seed in seeds:
                run_dir = Path(args.out) / f"{budget}ep" / variant / f"seed{seed}"
                overrides = [*VARIANTS[variant], f"train.seed={seed}", f"train.epochs={budget}",
                             f"train.max_steps={args.max_steps}", f"run.dir={run_dir}",
                             "logging.wandb=disabled", "logging.progress=false", *args.train]
                train = [sys.executable, str(HERE / "train.py"), "--config", args.config,
                         "--resume", "auto", *overrides]
                evaluate = [sys.executable, str(HERE / "evaluate.py"), "--run", str(run_dir),
                            "--metrics", args.metrics, "logging.progress=false", *args.eval]
                runs.append({"budget": f"{budget}ep", "variant": variant, "seed": seed,
                             "run_dir": run_dir, "train": train, "evaluate": evaluate})
    return runs


def execute(run: dict, timings: Path) -> dict:
    """Train and evaluate one run unless done; its flattened eval values."""
    from mmvae.eval.study import flatten

    run_dir = run["run_dir"]
    for stage, done in (("train", run_dir / "model"), ("evaluate", run_dir / "eval.json")):
        if done.exists():
            continue
        start = time.perf_counter()
        proc = subprocess.run(run[stage], env={**os.environ, "WANDB_MODE": "disabled"})
        if proc.returncode != 0:
            raise RuntimeError(f"{stage} failed (exit {proc.returncode}) for {run_dir}: "
                               f"{' '.join(run[stage])}")
        with timings.open("a") as f:
            f.write(json.dumps({"run_dir": str(run_dir), "stage": stage,
                                "seconds": round(time.perf_counter() - start, 1)}) + "\n")
    return flatten(json.loads((run_dir / "eval.json").read_text()))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            print(" ".join(run["train"]) + "\n" + " ".join(run["evaluate"]))
        return 0
    from mmvae.eval.study import markdown, summarise

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    try:
        for run in runs:
            values = execute(run, out / "timings.jsonl")
            records.append({k: run[k] for k in ("budget", "variant", "seed")} | {"values": values})
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = summarise(records, reference=runs[0]["variant"])
    (out / "study.json").write_text(json.dumps({"records": records, **summary}, indent=2))
    (out / "study.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
