"""`evaluate_run`: load a run folder, compute the chosen metrics, write eval.json and report.md.

This module loads and checks (`prepare`), then runs the chosen metrics and writes the files
(`execute`); the metrics are the records of `mmvae.eval.metrics.METRICS`, fed by an
`mmvae.eval.context.EvalContext` (the run's shards, or a reference model's own seeded samples).
Outputs:

* ``RUN_DIR/eval.json``: {"run_dir", "model", "dataset", "seed", "options", "metrics": {name:
  {"values": {...}, ...details}}};
* ``RUN_DIR/eval/*.png``: pictures and plots (metric ``pictures``);
* ``RUN_DIR/report.md``: one page with the metrics table and the pictures.

Under ``accelerate launch`` the entry point passes ``Ranks(rank, world)``: the sharded metrics
(``Metric.sharded``) split their batches across the processes and give the numbers of one process
(``mmvae.eval.distributed``); the others run on the main process, which alone writes files.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmvae.config import Config, ConfigError, load_config
from mmvae.eval.context import EVAL_DIR, EvalContext, is_reference, resolve_options
from mmvae.eval.metrics import METRICS, SHARDED, inapplicable, repeats
from mmvae.eval.report import write_report
from mmvae.log import Board
from mmvae.paths import unwritable
from mmvae.ranks import SINGLE, Ranks
from mmvae.registry import load_model

EVAL_JSON = "eval.json"


def check_metrics(names: Sequence[str], ctx: EvalContext) -> None:
    """Raise ValueError (before any work) for unknown or inapplicable metrics."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(METRICS)}")
    if not ctx.is_toy and not (ctx.shards_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"no shards at data.shards={str(ctx.shards_dir)!r} (no manifest.json); "
                                f"pass data.shards=DIR or build them (launch/shard_demo.py)")
    reasons = [r for r in (inapplicable(n, ctx) for n in names) if r]
    if reasons:
        raise ValueError("; ".join(reasons))


def _progress(enabled: bool) -> Board | None:
    return Board() if enabled else None


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def prepare(run_dir, metrics: Sequence[str] | None = None, overrides: Sequence[str] = (), *,
            progress: bool | None = None, device: str | None = None, ranks: Ranks = SINGLE,
            **options) -> tuple[EvalContext, list[str]]:
    """Load and check everything `execute` needs; raises ConfigError / ValueError /
    FileNotFoundError for a bad run folder, override, option or metric name. Writes nothing.
    `ranks`: this process among several (``accelerate launch``); the default is one process."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} not found")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    _refuse_model_changes(run_dir, cfg)
    if problem := unwritable(run_dir / EVAL_DIR):
        raise ValueError(f"run folder {run_dir} cannot take the evaluation's files: {problem}")
    names = list(dict.fromkeys(metrics or cfg.eval.metrics))
    explicit = bool(metrics)
    if not names:
        raise ValueError(f"no metrics chosen; valid: {', '.join(METRICS)}")
    opts = resolve_options(cfg, **options)
    model = _load_trained(run_dir / "model")
    toy = is_reference(model)  # tiny linear models: CPU (their sampler is CPU-only)
    dev = torch.device("cpu" if toy else device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    bar = _progress(ranks.is_main and (cfg.logging.progress if progress is None else progress))
    ctx = EvalContext(run_dir, cfg, model, opts, cfg.train.seed, dev, bar, ranks)
    if not explicit:  # the config's list: run what applies to this model, say what was skipped
        for name in [n for n in names if n in METRICS and inapplicable(n, ctx)]:
            if ranks.is_main:
                warnings.warn(f"skipping {inapplicable(name, ctx)}", stacklevel=2)
            names.remove(name)
        # ... and what would only repeat another chosen metric's numbers (two modalities: the
        # subset metrics are coherence and latent again)
        names = [n for n in names if n not in METRICS or repeats(n, ctx) not in names]
    check_metrics(names, ctx)
    return ctx, names


def _refuse_model_changes(run_dir: Path, cfg: Config) -> None:
    """`model.*` overrides cannot apply: the model is rebuilt from model/model.json with the
    trained weights. Refuse them rather than ignore them (an override equal to the run's value
    is harmless)."""
    trained = load_config(run_dir / "config.yaml").model
    changed = [f"model.{f.name}={getattr(cfg.model, f.name)!r}"
               for f in dataclasses.fields(trained)
               if getattr(cfg.model, f.name) != getattr(trained, f.name)]
    if changed:
        raise ConfigError(f"{', '.join(changed)}: the model of a trained run cannot change (it is "
                          f"rebuilt from {run_dir / 'model'}); drop the model.* override(s), or "
                          f"train a run with them")


def _load_trained(folder: Path) -> torch.nn.Module:
    """The run's final model; a damaged weights file is a ValueError naming the fix."""
    try:
        return load_model(folder, map_location="cpu")
    except FileNotFoundError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{folder} cannot be loaded ({reason}): the file is truncated or "
                         f"damaged; copy the run again, or train it again") from None


def execute(ctx: EvalContext, names: Sequence[str]) -> dict:
    """Run the metrics, write eval.json and report.md; returns the eval.json content plus
    "report" (the report's path). With several processes every one must call this: they share
    the sharded metrics (`Metric.sharded`), the main process runs the rest and writes the files,
    and all return its payload."""
    results, timings, start = {}, {}, time.perf_counter()
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.seed)  # anything that still draws from the global generator
        if ctx.progress is not None:
            ctx.progress.start()
        try:
            for name in ctx.track(names, f"evaluation metrics ({', '.join(names)})"):
                if METRICS[name].sharded or ctx.ranks.is_main:
                    began = time.perf_counter()
                    results[name] = METRICS[name].fn(ctx)
                    timings[name] = round(time.perf_counter() - began, 2)
        finally:
            if ctx.progress is not None:
                ctx.progress.stop()
    if not ctx.ranks.is_main:
        return ctx.ranks.broadcast(None)
    cfg, model = ctx.cfg, ctx.model
    payload = {"run_dir": str(ctx.run_dir), "model": cfg.model.name, "modalities": model.modalities,
               "dataset": ctx.dataset(), "shards": None if ctx.is_toy else str(ctx.shards_dir),
               "seed": ctx.seed, "device": str(ctx.device),
               "seconds": round(time.perf_counter() - start, 2), "metric_seconds": timings,
               "options": dataclasses.asdict(ctx.options), "eval_config": dataclasses.asdict(cfg.eval),
               "metrics": results}
    payload = json.loads(json.dumps(payload, default=_json_default))  # plain JSON types
    (ctx.run_dir / EVAL_JSON).write_text(json.dumps(payload, indent=2) + "\n")
    payload["report"] = str(write_report(ctx.run_dir, payload))
    return ctx.ranks.broadcast(payload)


def evaluate_model(model, cfg: Config, names: Sequence[str], *, run_dir, device,
                   ranks: Ranks = SINGLE) -> tuple[dict, list[str]]:
    """The trainer's periodic evaluation: the sharded metrics `names` (`Metric.sharded`) of an
    in-memory model, options from ``cfg.eval``, seeded by ``train.seed``; every rank must call
    it and gets the same numbers. The global random state is left as it was (resume stays
    exact). Returns ({name: result}, [reasons the inapplicable ones were skipped])."""
    ctx = EvalContext(Path(run_dir), cfg, model, cfg.eval, cfg.train.seed, torch.device(device),
                      None, ranks)
    skipped = [reason for reason in (inapplicable(n, ctx) for n in names) if reason]
    results = {}
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.seed)
        for name in names:
            if name not in METRICS or not METRICS[name].sharded:
                raise ValueError(f"{name} is not a sharded metric ({', '.join(SHARDED)})")
            if not inapplicable(name, ctx):
                results[name] = METRICS[name].fn(ctx)
    return results, skipped


def evaluate_run(run_dir, metrics: Sequence[str] | None = None, overrides: Sequence[str] = (),
                 **kwargs) -> dict:
    """Evaluate the run in `run_dir`: write RUN_DIR/eval.json, RUN_DIR/eval/*.png, report.md.

    metrics: names from `METRICS` (default: the config's ``eval.metrics``). overrides: dotted
    ``key=value`` config overrides (e.g. ``eval.iwae_K=5000``). kwargs: ``progress``,
    ``device`` and keys of the config's `eval` section. Seeded by ``train.seed``. Bad input raises (see
    `prepare`) before anything is written. Returns the eval.json content plus "report".
    """
    return execute(*prepare(run_dir, metrics, overrides, **kwargs))
