"""The estimator study's table (issue 18): runs of variants x seeds x budgets, each scored by
`launch/evaluate.py`, summarised as mean +- sd per (budget, variant) and as paired differences
against a reference variant (same seed, same budget: the pairs share the initial weights and the
data order, so the seed-to-seed spread cancels in part).

A *variant* is a name in `VARIANTS`, mapped to its objective overrides; a run's numbers are the
flattened `values` of its eval.json ("metric/key": float).
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable

VARIANTS = {
    "unbiased": ["objective.name=dreg", "objective.dreg_variant=unbiased"],
    "paper": ["objective.name=dreg", "objective.dreg_variant=paper"],
    "stl": ["objective.name=dreg", "objective.dreg_variant=stl"],
    "cv": ["objective.name=dreg", "objective.dreg_variant=cv"],
    "swap": ["objective.name=dreg", "objective.dreg_variant=swap"],
    "iwae": ["objective.name=iwae"],
    "elbo": ["objective.name=elbo"],
}


def flatten(eval_json: dict) -> dict[str, float]:
    """{"metric/key": value} of every number in an eval.json's metrics."""
    out = {}
    for metric, result in eval_json.get("metrics", {}).items():
        for key, value in result.get("values", {}).items():
            if isinstance(value, (int, float)):
                out[f"{metric}/{key}"] = float(value)
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float, int]:
    n = len(xs)
    mean = statistics.fmean(xs) if n else math.nan
    return mean, statistics.stdev(xs) if n > 1 else math.nan, n


def summarise(records: Iterable[dict], reference: str) -> dict:
    """records: {"budget", "variant", "seed", "values"}. Returns {"cells": [{budget, variant,
    metric, mean, sd, n}], "paired": [{budget, variant, metric, mean_diff, sd_diff, n, t}]} with
    variant - reference over the seeds both have (t = mean / (sd / sqrt n), nan for n < 2)."""
    records = list(records)
    by = {(r["budget"], r["variant"], r["seed"]): r["values"] for r in records}
    budgets = list(dict.fromkeys(r["budget"] for r in records))
    variants = list(dict.fromkeys(r["variant"] for r in records))
    metrics = list(dict.fromkeys(m for r in records for m in r["values"]))
    cells, paired = [], []
    for b in budgets:
        for v in variants:
            seeds = sorted(s for (bb, vv, s) in by if (bb, vv) == (b, v))
            for m in metrics:
                xs = [by[b, v, s][m] for s in seeds if m in by[b, v, s]]
                mean, sd, n = _mean_sd(xs)
                cells.append({"budget": b, "variant": v, "metric": m, "mean": mean, "sd": sd, "n": n})
            if v == reference:
                continue
            for m in metrics:
                diffs = [by[b, v, s][m] - by[b, reference, s][m] for s in seeds
                         if (b, reference, s) in by and m in by[b, v, s] and m in by[b, reference, s]]
                mean, sd, n = _mean_sd(diffs)
                t = mean / (sd / math.sqrt(n)) if n > 1 and sd > 0 else math.nan
                paired.append({"budget": b, "variant": v, "metric": m, "mean_diff": mean,
                               "sd_diff": sd, "n": n, "t": t})
    return {"reference": reference, "cells": cells, "paired": paired}


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}g}" if math.isnan(sd) else f"{mean:.{digits}g} ± {sd:.2g}"


def markdown(summary: dict) -> str:
    """Two markdown tables: mean ± sd (n) per budget and variant; paired differences (t)."""
    metrics = list(dict.fromkeys(c["metric"] for c in summary["cells"]))
    lines = ["| budget | variant | n | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    rows: dict[tuple, dict] = {}
    for c in summary["cells"]:
        rows.setdefault((c["budget"], c["variant"]), {})[c["metric"]] = c
    for (b, v), cs in rows.items():
        n = max(c["n"] for c in cs.values())
        lines.append(f"| {b} | {v} | {n} | " + " | ".join(
            _pm(cs[m]["mean"], cs[m]["sd"]) if m in cs else "–" for m in metrics) + " |")
    lines += ["", f"Paired differences, variant − {summary['reference']} (same seed): "
                  "mean ± sd (t)", "",
              "| budget | variant | n | " + " | ".join(metrics) + " |",
              "|---|---|---|" + "---|" * len(metrics)]
    prow: dict[tuple, dict] = {}
    for p in summary["paired"]:
        prow.setdefault((p["budget"], p["variant"]), {})[p["metric"]] = p
    for (b, v), ps in prow.items():
        n = max(p["n"] for p in ps.values())
        cell = [f"{_pm(ps[m]['mean_diff'], ps[m]['sd_diff'])}"
                + ("" if math.isnan(ps[m]["t"]) else f" ({ps[m]['t']:.2g})") if m in ps else "–"
                for m in metrics]
        lines.append(f"| {b} | {v} | {n} | " + " | ".join(cell) + " |")
    return "\n".join(lines) + "\n"
