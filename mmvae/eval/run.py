"""`evaluate_run`: load a run folder, compute the chosen metrics, write eval.json and report.md.

The metric functions elsewhere in `mmvae.eval` take tensors and iterables; this module is the
glue that feeds them from the run's shards (``data.shards`` of its config.yaml), from the unique
images next to digit shards, or, for the linear-Gaussian reference models, from a seeded sample
of the model itself. Outputs:

* ``RUN_DIR/eval.json``: {"run_dir", "model", "dataset", "seed", "options", "metrics": {name:
  {"values": {...}, ...details}}};
* ``RUN_DIR/eval/*.png``: pictures and plots (metric ``pictures``);
* ``RUN_DIR/report.md``: one page with the metrics table and the pictures.

Under ``accelerate launch`` the entry point passes ``Ranks(rank, world)``: the sharded metrics
(``SHARDED``) split their batches across the processes and give the numbers of one process
(``mmvae.eval.distributed``); the others run on the main process, which alone writes files.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from mmvae.config import (PERIODIC_METRICS, Config, ConfigError, EvalConfig, apply_override,
                          load_config, validate)
from mmvae.eval import attributes, cca
from mmvae.eval.classifiers import CACHE_DIR, load_or_train_classifiers, load_unique
from mmvae.eval.coherence import array_batches, cross_coherence, joint_coherence, unique_pairs
from mmvae.eval.distributed import SINGLE, Ranks
from mmvae.eval.latent import latent_accuracy
from mmvae.eval.likelihoods import calculate_likelihoods
from mmvae.eval.pictures import picture_resources, save_prior_samples, save_reconstructions
from mmvae.eval.plots import embedding_plot, kl_plot
from mmvae.eval.report import write_report
from mmvae.log import Board, console, track
from mmvae.paths import unwritable
from mmvae.registry import load_model

DIGIT_MODALITIES = frozenset({"mnist", "svhn"})
EVAL_DIR, EVAL_JSON, REPORT = "eval", "eval.json", "report.md"
# Eval options proposed for the config's eval section, with their defaults; until they are
# there, `EvalContext.option` falls back to these (afterwards they are unused).
def resolve_options(cfg: Config, **explicit) -> EvalConfig:
    """The run's `eval` config section with explicit keyword options applied (validated like
    command-line overrides)."""
    for key, value in explicit.items():
        apply_override(cfg, f"eval.{key}", value)
    validate(cfg)
    return cfg.eval


@dataclass
class EvalContext:
    """What every metric gets: the run, its config and model, options, seed and outputs."""

    run_dir: Path
    cfg: Config
    model: torch.nn.Module
    options: EvalConfig
    seed: int
    device: torch.device
    progress: object | None = None  # rich Progress or None
    ranks: Ranks = SINGLE

    @property
    def out_dir(self) -> Path:
        return self.run_dir / EVAL_DIR

    @property
    def shards_dir(self) -> Path:
        return Path(self.cfg.data.shards)

    @property
    def is_toy(self) -> bool:
        """Linear-Gaussian reference models evaluate on their own seeded samples."""
        return hasattr(self.model, "sample_data")

    def has_unique(self, split: str) -> bool:
        return (self.shards_dir / f"unique_{split}.npz").is_file()

    def track(self, iterable: Iterable, description: str, total: int | None = None):
        """`mmvae.log.track`: a task with count and eta under the evaluation's progress bar."""
        return track(iterable, description, total, enabled=self.progress is not None)

    def labelled_batches(self, split: str = "test", batch_size: int | None = None):
        """(xs, labels) batches, xs in model.modalities order (on CPU: a metric moves the
        batches it computes); labels None for the toy models. The split is read once in shard
        order, the last batch partial; every rank reads the same batches."""
        batch_size = batch_size or self.options.batch_size
        if self.is_toy:
            gen = torch.Generator().manual_seed(self.seed + (split == "test"))
            data = self.model.sample_data(self.options.toy_datapoints, gen)
            data = data if isinstance(data, list) else [data]
            for i in range(0, self.options.toy_datapoints, batch_size):
                yield [x[i:i + batch_size] for x in data], None
            return
        for batch in self.shard_batches(split, self.model.modalities, batch_size):
            yield [batch[m] for m in self.model.modalities], batch.get("label")

    def shard_batches(self, split: str, modalities: Sequence[str], batch_size: int):
        """Dict batches of the shards in shard order (no shuffle, last batch partial); lists
        (captions from .json) become tensors."""
        from mmvae.data import make_loader

        loader = make_loader(self.shards_dir, split, batch_size=batch_size, modalities=modalities,
                             num_workers=self.cfg.data.num_workers, seed=self.seed, shuffle=False,
                             drop_last=False, on_error=self.cfg.data.on_error)
        for batch in loader:
            yield {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in batch.items()}

    def num_batches(self, split: str = "test", limit: int = 0,
                    batch_size: int | None = None) -> int | None:
        n = self.options.toy_datapoints if self.is_toy else self.num_samples(split)
        if n is None:
            return None
        n = min(n, limit) if limit else n
        return -(-n // (batch_size or self.options.batch_size))

    def num_samples(self, split: str) -> int | None:
        try:
            manifest = json.loads((self.shards_dir / "manifest.json").read_text())
            return int(manifest["splits"][split]["num_samples"])
        except (OSError, KeyError, ValueError):
            return None

    def dataset(self) -> str:
        if self.is_toy:
            return self.cfg.model.name
        try:
            return json.loads((self.shards_dir / "manifest.json").read_text())["dataset"]
        except (OSError, KeyError, ValueError):
            return "unknown"


# --- the metrics -------------------------------------------------------------------------------

def metric_likelihood(ctx: EvalContext) -> dict:
    limit = ctx.options.likelihood_datapoints or ctx.options.max_datapoints
    batch_size = ctx.options.likelihood_batch
    batches = (xs for xs, _ in ctx.labelled_batches("test", batch_size))
    return calculate_likelihoods(
        ctx.model, ctx.track(batches, "likelihood", ctx.num_batches("test", limit, batch_size)),
        K=ctx.cfg.eval.iwae_K, k_chunk=ctx.cfg.eval.k_chunk, seed=ctx.seed,
        max_datapoints=limit or None, ranks=ctx.ranks)


def metric_coherence(ctx: EvalContext) -> dict:
    model, opts = ctx.model, ctx.options
    with ctx.ranks.main_first():  # the main process trains and caches, the others load
        classifiers, infos = load_or_train_classifiers(
            ctx.shards_dir, model.modalities, epochs=opts.classifier_epochs, seed=ctx.seed,
            image_shapes={e.modality: e.data_shape for e in model.experts}, device=ctx.device)
    mode = opts.coherence_pairs
    if mode == "auto":
        mode = "unique" if ctx.has_unique("test") and len(model.modalities) == 2 else "shards"
    if mode == "unique":
        images, labels = unique_pairs(load_unique(ctx.shards_dir, "test", model.modalities),
                                      model.modalities, seed=ctx.seed)
        batches, total = array_batches(images, labels, opts.batch_size), len(labels)
        pairs = f"unique: each unique test image of the smaller side once ({len(labels)} pairs)"
    else:
        batches = ctx.labelled_batches("test")
        total = ctx.num_samples("test")
        pairs = "duplicated: the shards' test pairs (each unique image in several pairs)"
    n_batches = -(-min(total, opts.max_datapoints or total) // opts.batch_size) if total else None
    cross = cross_coherence(model, ctx.track(batches, "cross coherence", n_batches), classifiers,
                            seed=ctx.seed, max_datapoints=opts.max_datapoints or None,
                            ranks=ctx.ranks)
    values = dict(cross["values"])
    result = {"test_pairs": pairs, "num_pairs": cross["num_pairs"], "seed": ctx.seed,
              "classifiers": infos}
    if len(model.modalities) > 1:
        joint = joint_coherence(model, classifiers, num_samples=opts.coherence_samples,
                                seed=ctx.seed, ranks=ctx.ranks)
        values.update(joint["values"])
        result.update(joint_samples=joint["num_samples"], joint_class_counts=joint["class_counts"])
    for m, info in infos.items():
        values[f"classifier_{m}"] = info["test_accuracy"]
    return {"values": values, **result}


def _collect(ctx: EvalContext, split: str, limit: int) -> dict[str, tuple]:
    """Images and labels per modality from the shards (latent accuracy without unique files)."""
    xs_all, ys, n = [[] for _ in ctx.model.modalities], [], 0
    for xs, labels in ctx.labelled_batches(split):
        for store, x in zip(xs_all, xs):
            store.append(x.cpu())
        ys.append(labels)
        n += len(labels)
        if n >= limit:
            break
    y = torch.cat(ys)[:limit]
    return {m: (torch.cat(x)[:limit], y) for m, x in zip(ctx.model.modalities, xs_all)}


def metric_latent(ctx: EvalContext) -> dict:
    modalities = ctx.model.modalities
    if ctx.has_unique("train") and ctx.has_unique("test"):
        train = load_unique(ctx.shards_dir, "train", modalities)
        test = load_unique(ctx.shards_dir, "test", modalities)
        source = "unique images (unique_{train,test}.npz)"
    else:
        limit = ctx.options.latent_max_train
        train, test = _collect(ctx, "train", limit), _collect(ctx, "test", limit)
        source = f"shard pairs (at most {limit} per split)"
    result = latent_accuracy(ctx.model, train, test, seed=ctx.seed)
    return {**result, "data": source}


def metric_pictures(ctx: EvalContext) -> dict:
    xs, labels = next(iter(ctx.labelled_batches("test", ctx.options.plot_batch)))
    xs, out = [x.to(ctx.device) for x in xs], ctx.out_dir
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    # the feature index of feature models is built here on first use: a pass over the train split
    extras = {} if ctx.is_toy else picture_resources(ctx.shards_dir, ctx.model)
    made = {}
    steps = {
        "reconstructions": lambda: save_reconstructions(ctx.model, xs, out / "reconstructions.png",
                                                        **extras),
        "prior samples": lambda: save_prior_samples(ctx.model, out / "prior_samples.png",
                                                    generator=gen, **extras),
        "embedding": lambda: embedding_plot(ctx.model, xs, out / "embedding.png", labels=labels,
                                            seed=ctx.seed, method=ctx.options.embedding),
        "kl": lambda: kl_plot(ctx.model, xs, out / "kl_per_dimension.png")}
    for name in ctx.track(list(steps), "pictures (reconstructions, prior samples, embedding, KL)"):
        made[name] = steps[name]()
    emb, kls = made["embedding"], made["kl"]
    files = [*made["reconstructions"], *made["prior samples"], emb["path"], kls["path"]]
    rel = [str(Path(f).relative_to(ctx.run_dir)) for f in files]
    return {"values": {}, "files": rel, "embedding_method": emb["method"],
            "embedding_points": emb["points"], "mean_kl": kls["mean_kl"]}


def metric_cca(ctx: EvalContext) -> dict:
    """CUB CCA coherence (``mmvae.eval.cca``): the CCA space is fitted once per shards folder
    (by the main process) and loaded afterwards; the test pairs and prior samples are sharded."""
    folder = Path(ctx.options.cca_dir or ctx.shards_dir / "cca")
    k = ctx.options.cca_k
    log = _console_log if ctx.ranks.is_main else (lambda msg: None)

    def train_pairs():
        for batch in ctx.shard_batches("train", list(cca.MODALITIES), 1024):
            yield batch["feature"], batch["caption"]

    with ctx.ranks.main_first():  # others load what the main process fitted
        space, info = cca.load_or_fit(folder, ctx.shards_dir / "vocab.json", train_pairs, k=k,
                                      reset=ctx.options.cca_reset and ctx.ranks.is_main, log=log)
    opts = ctx.options
    n_batches = ctx.num_batches("test", opts.max_datapoints)
    batches = ctx.track(ctx.labelled_batches("test"), "CCA coherence", n_batches)
    cross = cca.cca_coherence(ctx.model, batches, space, seed=ctx.seed,
                              max_datapoints=opts.max_datapoints or None, ranks=ctx.ranks)
    joint = cca.cca_joint(ctx.model, space, num_samples=ctx.options.cca_samples, seed=ctx.seed,
                          ranks=ctx.ranks)
    artifacts = {key: info[key] for key in ("dir", "loaded", "k", "seed", "num_train_pairs",
                                            "top_correlations") if key in info}
    return {"values": {**cross["values"], **joint["values"]}, "num_pairs": cross["num_pairs"],
            "joint_samples": joint["num_samples"], "seed": ctx.seed, "artifacts": artifacts,
            "test_pairs": "every test pair once (the paper: full batches of 256 only)"}


def metric_attributes(ctx: EvalContext) -> dict:
    """Attribute coherence on the built-in shapes datasets (`mmvae.eval.attributes`): colour and
    shape classifiers are trained on the unique train images once and cached with the shards."""
    opts = ctx.options
    with ctx.ranks.main_first():  # the main process trains and caches, the others load
        nets, infos = {}, {}
        for attr in attributes.ATTRIBUTES:
            net, info = load_or_train_classifiers(
                ctx.shards_dir, ["image"], epochs=opts.classifier_epochs, seed=ctx.seed, target=attr,
                image_shapes={"image": (3, 64, 64)}, device=ctx.device)
            nets[attr], infos[attr] = net["image"], info["image"]
    with np.load(ctx.shards_dir / "unique_test.npz", allow_pickle=False) as npz:
        images, captions, truth = attributes.one_object_scenes(dict(npz))
    if opts.max_datapoints:
        images, captions = images[:opts.max_datapoints], captions[:opts.max_datapoints]
        truth = {a: t[:opts.max_datapoints] for a, t in truth.items()}
    itos = json.loads((ctx.shards_dir / "vocab.json").read_text())["itos"]
    result = attributes.attribute_coherence(
        ctx.model, images, captions, truth, nets, itos, itos.index("<eos>"), seed=ctx.seed,
        batch_size=opts.batch_size, joint_samples=opts.coherence_samples, ranks=ctx.ranks)
    values = dict(result["values"])
    values.update({f"classifier_{a}": info["test_accuracy"] for a, info in infos.items()})
    return {**result, "values": values, "classifiers": infos,
            "test_pairs": "every one-object unique test scene with one of its captions"}


def _console_log(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")


METRICS: dict[str, Callable[[EvalContext], dict]] = {
    "likelihood": metric_likelihood,
    "coherence": metric_coherence,
    "latent": metric_latent,
    "pictures": metric_pictures,
    "cca": metric_cca,
    "attributes": metric_attributes,
}
NEEDS_LABELS = ("coherence", "latent")
# Computed by every process on its share of the batches; the others run on the main process.
SHARDED = PERIODIC_METRICS  # also what the trainer may run every train.eval_every epochs


def inapplicable(name: str, ctx: EvalContext) -> str | None:
    """Why metric `name` cannot run on this run (None if it can)."""
    if ctx.is_toy and name in NEEDS_LABELS:
        return f"{name} needs labelled data; model {ctx.cfg.model.name} has none"
    if name == "coherence" and not set(ctx.model.modalities) <= DIGIT_MODALITIES:
        return (f"coherence needs digit modalities ({', '.join(sorted(DIGIT_MODALITIES))}); "
                f"the model has {', '.join(ctx.model.modalities)}")
    if name == "cca":
        return _cca_inapplicable(ctx)
    if name == "attributes":
        return _attributes_inapplicable(ctx)
    if name == "coherence" and not ctx.is_toy and not ctx.has_unique("train"):
        cached = all((ctx.shards_dir / CACHE_DIR / f"{m}.pt").is_file()
                     for m in ctx.model.modalities)
        if not cached:
            return (f"coherence: {ctx.shards_dir} has neither unique_train.npz nor cached "
                    f"classifiers in {CACHE_DIR}/ to classify digits with")
    return None


def _attributes_inapplicable(ctx: EvalContext) -> str | None:
    if ctx.is_toy or not {"image", "caption"} <= set(ctx.model.modalities):
        return (f"attributes needs image and caption modalities (cubIS); the model has "
                f"{', '.join(ctx.model.modalities)}")
    if not ctx.dataset().startswith("shapes"):
        return f"attributes needs the built-in shapes datasets; {ctx.shards_dir} holds {ctx.dataset()!r}"
    return None


def _cca_inapplicable(ctx: EvalContext) -> str | None:
    missing = [m for m in cca.MODALITIES if m not in ctx.model.modalities]
    if ctx.is_toy or missing:
        return (f"cca needs modalities {' and '.join(cca.MODALITIES)} (cubISft); the model has "
                f"{', '.join(ctx.model.modalities)}")
    folder = Path(ctx.options.cca_dir or ctx.shards_dir / "cca")
    if not (ctx.shards_dir / "vocab.json").is_file():
        return f"cca: {ctx.shards_dir} has no vocab.json (caption shards from launch/shard_cub.py)"
    if not (folder / "cca.npz").is_file() and ctx.num_samples("train") is None:
        return f"cca: no fitted CCA space in {folder} and no train split to fit one on"
    return None


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
    toy = hasattr(model, "sample_data")  # tiny linear models: CPU (their sampler is CPU-only)
    dev = torch.device("cpu" if toy else device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval()
    bar = _progress(ranks.is_main and (cfg.logging.progress if progress is None else progress))
    ctx = EvalContext(run_dir, cfg, model, opts, cfg.train.seed, dev, bar, ranks)
    if not explicit:  # the config's list: run what applies to this model, say what was skipped
        for name in [n for n in names if n in METRICS and inapplicable(n, ctx)]:
            if ranks.is_main:
                warnings.warn(f"skipping {inapplicable(name, ctx)}", stacklevel=2)
            names.remove(name)
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
    the `SHARDED` metrics, the main process runs the rest and writes the files, and all return
    its payload."""
    results, timings, start = {}, {}, time.perf_counter()
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(ctx.seed)  # anything that still draws from the global generator
        if ctx.progress is not None:
            ctx.progress.start()
        try:
            for name in ctx.track(names, f"evaluation metrics ({', '.join(names)})"):
                if name in SHARDED or ctx.ranks.is_main:
                    began = time.perf_counter()
                    results[name] = METRICS[name](ctx)
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
    """The trainer's periodic evaluation: the sharded metrics `names` (``SHARDED``) of an
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
            if name not in SHARDED:
                raise ValueError(f"{name} is not a sharded metric ({', '.join(SHARDED)})")
            if not inapplicable(name, ctx):
                results[name] = METRICS[name](ctx)
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
