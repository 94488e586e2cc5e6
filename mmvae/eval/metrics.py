"""The metrics of `evaluate_run`: one `Metric` record per name in `METRICS`, which says what the
metric computes, when it applies, whether every process computes a share of it and whether it
needs labelled data. The functions feed the tensor-level metrics of `mmvae.eval` from an
`EvalContext` (the run's shards, the unique images next to digit shards, or a reference model's
own samples) and return {"values": {key: number}, ...details} for eval.json; a result may name
its ``headline`` keys, the ones the main report table shows (the subset metrics: their
per-subset values get a table of their own in report.md)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmvae.eval import attributes, cca
from mmvae.eval.classifiers import CACHE_DIR, load_or_train_classifiers, load_unique
from mmvae.eval.coherence import array_batches, cross_coherence, joint_coherence, unique_pairs
from mmvae.eval.conditional import conditional_coherence
from mmvae.eval.context import EvalContext
from mmvae.eval.latent import latent_accuracy, subset_latent_accuracy
from mmvae.eval.likelihoods import calculate_likelihoods
from mmvae.eval.pictures import picture_resources, save_prior_samples, save_reconstructions
from mmvae.eval.plots import embedding_plot, kl_plot
from mmvae.log import console

# What the digit classifiers of the coherence metric can classify.
DIGIT_MODALITIES = frozenset({"mnist", "svhn"})


def always(ctx: EvalContext) -> None:
    """`Metric.applies_to` of a metric that applies to every run."""
    return None


@dataclass(frozen=True)
class Metric:
    """One metric of `evaluate_run`.

    fn: EvalContext -> {"values": {...}, ...details} (what eval.json stores under its name);
    applies_to: EvalContext -> None when the metric can run on that run, else the reason why not
        (checked before any work; the config's default list skips such metrics with a note);
    sharded: every process computes it on its share of the batches and gets the numbers of one
        process (`mmvae.eval.distributed`); the others run on the main process only. The sharded
        ones are also what the trainer may run every ``train.eval_every`` epochs
        (``config.PERIODIC_METRICS`` lists the same names: config sits below eval);
    needs_labels: it needs class labels, which the reference models' own samples lack;
    repeats: EvalContext -> None, or the metric whose numbers this one would only repeat on that
        run (then the config's default list leaves it out, silently; named in --metrics, it runs).
    """

    fn: Callable[[EvalContext], dict]
    applies_to: Callable[[EvalContext], str | None] = always
    sharded: bool = False
    needs_labels: bool = False
    repeats: Callable[[EvalContext], str | None] = always


def metric_likelihood(ctx: EvalContext) -> dict:
    limit = ctx.options.likelihood_datapoints or ctx.options.max_datapoints
    batch_size = ctx.options.likelihood_batch
    batches = (xs for xs, _ in ctx.labelled_batches("test", batch_size))
    return calculate_likelihoods(
        ctx.model, ctx.track(batches, "likelihood", ctx.num_batches("test", limit, batch_size)),
        K=ctx.cfg.eval.iwae_K, k_chunk=ctx.cfg.eval.k_chunk, seed=ctx.seed,
        max_datapoints=limit or None, ranks=ctx.ranks)


def _classifiers(ctx: EvalContext) -> tuple[dict, dict]:
    """The digit classifiers of every modality: ({modality: net}, {modality: info})."""
    model, opts = ctx.model, ctx.options
    with ctx.ranks.main_first():  # the main process trains and caches, the others load
        return load_or_train_classifiers(
            ctx.shards_dir, model.modalities, epochs=opts.classifier_epochs, seed=ctx.seed,
            image_shapes={e.modality: e.data_shape for e in model.experts}, device=ctx.device)


def _test_samples(ctx: EvalContext, task: str):
    """(labelled test batches under a progress task, what they are): the unique pairs of a
    two-modality digit folder (``eval.coherence_pairs``), or the shards' test samples."""
    model, opts = ctx.model, ctx.options
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
        pairs = ("duplicated: the shards' test pairs (each unique image in several pairs)"
                 if len(model.modalities) == 2 else "the shards' test samples")
    n_batches = -(-min(total, opts.max_datapoints or total) // opts.batch_size) if total else None
    return ctx.track(batches, task, n_batches), pairs


def metric_coherence(ctx: EvalContext) -> dict:
    model, opts = ctx.model, ctx.options
    classifiers, infos = _classifiers(ctx)
    batches, pairs = _test_samples(ctx, "cross coherence")
    cross = cross_coherence(model, batches, classifiers, seed=ctx.seed,
                            max_datapoints=opts.max_datapoints or None, ranks=ctx.ranks)
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


def metric_subset_coherence(ctx: EvalContext) -> dict:
    """Conditional coherence from every non-empty proper subset of modalities to each left-out
    one (``mmvae.eval.conditional``), its means by the number of given modalities, and the
    joint coherence over all M modalities; the headline keys are what the report's main table
    shows (the per-direction ones go to the subset table, eval.json and W&B)."""
    model, opts = ctx.model, ctx.options
    classifiers, infos = _classifiers(ctx)
    batches, pairs = _test_samples(ctx, "conditional coherence")
    cond = conditional_coherence(model, batches, classifiers, seed=ctx.seed,
                                 max_datapoints=opts.max_datapoints or None, ranks=ctx.ranks)
    joint = joint_coherence(model, classifiers, num_samples=opts.coherence_samples,
                            seed=ctx.seed, ranks=ctx.ranks)
    values = {**cond["values"], **joint["values"]}
    values.update({f"classifier_{m}": info["test_accuracy"] for m, info in infos.items()})
    headline = [*(f"given_{k}" for k in cond["by_size"]), "joint",
                *(f"classifier_{m}" for m in infos)]
    return {"values": values, "headline": headline, "by_size": cond["by_size"],
            "test_pairs": pairs, "num_pairs": cond["num_pairs"],
            "joint_samples": joint["num_samples"], "joint_class_counts": joint["class_counts"],
            "seed": ctx.seed, "classifiers": infos}


def metric_subset_latent(ctx: EvalContext) -> dict:
    """Linear-probe accuracy of the latent mean given every non-empty subset of modalities
    (``mmvae.eval.latent.subset_latent_accuracy``), on at most eval.latent_max_train shard
    samples per split."""
    limit = ctx.options.latent_max_train
    batches = {split: ctx.track(ctx.labelled_batches(split), f"latent means ({split})",
                                ctx.num_batches(split, limit)) for split in ("train", "test")}
    result = subset_latent_accuracy(ctx.model, batches["train"], batches["test"], seed=ctx.seed,
                                    max_datapoints=limit, ranks=ctx.ranks)
    names = ctx.model.modalities
    headline = [f"latent_given_{k}" for k in range(1, len(names) + 1)]
    return {**result, "headline": headline, "data": f"shard samples (at most {limit} per split)"}


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


# --- when each metric applies (None: it does) ----------------------------------------------------

def _coherence_applies(ctx: EvalContext) -> str | None:
    if not set(ctx.model.modalities) <= DIGIT_MODALITIES:
        return (f"coherence needs digit modalities ({', '.join(sorted(DIGIT_MODALITIES))}); "
                f"the model has {', '.join(ctx.model.modalities)}")
    if not ctx.has_unique("train"):
        cached = all((ctx.shards_dir / CACHE_DIR / f"{m}.pt").is_file()
                     for m in ctx.model.modalities)
        if not cached:
            return (f"coherence: {ctx.shards_dir} has neither unique_train.npz nor cached "
                    f"classifiers in {CACHE_DIR}/ to classify digits with")
    return None


def _unique_has(ctx: EvalContext, modality: str) -> bool:
    path = ctx.shards_dir / "unique_train.npz"
    if not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as npz:  # reads the zip directory only
        return modality in npz.files and f"{modality}_labels" in npz.files


def _subsets_apply(name: str, test_pairs: bool):
    """`Metric.applies_to` of the subset metrics: a multimodal model whose every modality has a
    digit classifier (cached with the shards, or trainable on unique_train.npz); `test_pairs`:
    the metric reads the test samples that eval.coherence_pairs chooses."""
    def applies(ctx: EvalContext) -> str | None:
        modalities = ctx.model.modalities
        if len(modalities) < 2:
            return f"{name} needs a multimodal model; the model has only {modalities[0]}"
        missing = [m for m in modalities if not (ctx.shards_dir / CACHE_DIR / f"{m}.pt").is_file()
                   and not _unique_has(ctx, m)]
        if missing:
            return (f"{name}: no digit classifier for {', '.join(missing)}: {ctx.shards_dir} has "
                    f"neither cached {CACHE_DIR}/<modality>.pt nor their images and labels in "
                    f"unique_train.npz")
        if test_pairs and ctx.options.coherence_pairs == "unique" and len(modalities) > 2:
            return (f"{name}: eval.coherence_pairs=unique pairs two modalities; use auto or shards "
                    f"for {len(modalities)}")
        return None
    return applies


def _with_two_modalities(other: str):
    """`Metric.repeats` of the subset metrics: with two modalities, every subset is one expert
    and the numbers are those of `other` (the same draws)."""
    def repeats(ctx: EvalContext) -> str | None:
        return other if len(ctx.model.modalities) == 2 else None
    return repeats


def _cca_applies(ctx: EvalContext) -> str | None:
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


def _attributes_apply(ctx: EvalContext) -> str | None:
    if ctx.is_toy or not {"image", "caption"} <= set(ctx.model.modalities):
        return (f"attributes needs image and caption modalities (cubIS); the model has "
                f"{', '.join(ctx.model.modalities)}")
    if not ctx.dataset().startswith("shapes"):
        return f"attributes needs the built-in shapes datasets; {ctx.shards_dir} holds {ctx.dataset()!r}"
    return None


METRICS: dict[str, Metric] = {  # this order is the one error messages list them in
    "likelihood": Metric(metric_likelihood, sharded=True),
    "coherence": Metric(metric_coherence, _coherence_applies, sharded=True, needs_labels=True),
    "latent": Metric(metric_latent, needs_labels=True),
    "subset_coherence": Metric(metric_subset_coherence, _subsets_apply("subset_coherence", True),
                               sharded=True, needs_labels=True,
                               repeats=_with_two_modalities("coherence")),
    "subset_latent": Metric(metric_subset_latent, _subsets_apply("subset_latent", False),
                            sharded=True, needs_labels=True, repeats=_with_two_modalities("latent")),
    "pictures": Metric(metric_pictures),
    "cca": Metric(metric_cca, _cca_applies, sharded=True),
    "attributes": Metric(metric_attributes, _attributes_apply, sharded=True),
}
SHARDED = tuple(name for name, metric in METRICS.items() if metric.sharded)


def repeats(name: str, ctx: EvalContext) -> str | None:
    """The metric whose numbers `name` would only repeat on this run (None: it adds its own)."""
    return METRICS[name].repeats(ctx)


def inapplicable(name: str, ctx: EvalContext) -> str | None:
    """Why metric `name` cannot run on this run (None if it can)."""
    metric = METRICS[name]
    if metric.needs_labels and not ctx.has_labels:
        return f"{name} needs labelled data; model {ctx.cfg.model.name} has none"
    return metric.applies_to(ctx)
