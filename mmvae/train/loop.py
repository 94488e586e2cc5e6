"""The training loop: `fit(cfg)` reads top to bottom.

setup (accelerator, layout, run folder, data, model, optimiser, resume) -> for each epoch: train
steps (progress bar, metrics, periodic checkpoints, stop requests) -> test bound and pictures ->
evaluation metrics every `train.eval_every` epochs -> checkpoint -> final model and summary.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from mmvae.config import Config, ConfigError, save_config, to_dict
from mmvae.data import make_loader
from mmvae.data.builtin import ensure_builtin
from mmvae.data.checks import check_shards
from mmvae.data.store import REMOTE_SCHEMES
from mmvae.eval import pictures
from mmvae.log import MetricsLog, TrainProgress, console
from mmvae.registry import build_model, check_model_name, save_model
from mmvae.train import checkpoint as ckpt
from mmvae.train.dist import (Layout, Tracker, all_sum, any_rank, broadcast, make_accelerator,
                              make_layout, release, start_trackers)
from mmvae.train.optim import make_optimizer
from mmvae.train.step import ObjectiveModule, batch_inputs, estimator_for, test_bound, train_step

SHARD_HINTS = {
    "mnist_svhn": "python launch/shard_mnist_svhn.py --mnist DIR --svhn DIR --out {shards}",
    "cubIS": "python launch/shard_cub.py --cub data/cub --out {shards}",
    "cubISft": "python launch/shard_cub.py --cub data/cub --weights FILE --out {shards}",
}


class TrainingStopped(RuntimeError):
    """Training gave up (e.g. too many non-finite steps); the last good checkpoint is kept."""


@dataclass
class Context:
    cfg: Config
    accelerator: object
    layout: Layout
    run_dir: Path
    model: torch.nn.Module
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    looser: bool
    metrics: MetricsLog
    tracker: Tracker
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
    data_errors: int = 0  # samples this rank's finished loaders lost (see _data_errors)
    checkpoint_failures: int = 0
    saved_at: tuple = ()  # (step, epoch, batch) of the last checkpoint written
    stop_requested: bool = False
    history: dict = field(default_factory=dict)


# --- setup -------------------------------------------------------------------------------------

def _new_run_dir(cfg: Config) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    experiment = cfg.run.experiment or cfg.model.name
    return Path("runs") / experiment / datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def _find_resume(cfg: Config, resume: str | None) -> Path | None:
    """The checkpoint to resume from: --resume PATH (a checkpoint or a run folder) or auto."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume)
        found = ckpt.latest(path / "checkpoints") if (path / "checkpoints").is_dir() else path
        if found is None or not (found / "state.pt").is_file():
            raise ConfigError(f"--resume {resume}: no checkpoint there (expected a run folder or "
                              f"RUN_DIR/checkpoints/<step>)")
        return found
    if cfg.run.dir:
        return ckpt.latest(Path(cfg.run.dir) / "checkpoints")
    runs = sorted((Path("runs") / (cfg.run.experiment or cfg.model.name)).glob("*/checkpoints"))
    for root in reversed(runs):
        if (found := ckpt.latest(root)) is not None:
            return found
    return None


def _ensure_shards(cfg: Config, accelerator, layout: Layout) -> dict:
    """Build a missing built-in dataset, then check the shards (mmvae.data.checks): a bad
    manifest, a missing shard or an empty split is a one-line ConfigError before anything is
    written."""
    remote = cfg.data.shards.startswith(REMOTE_SCHEMES)
    shards = cfg.data.shards if remote else Path(cfg.data.shards)
    if cfg.data.builtin and layout.is_main and not remote:
        ensure_builtin(shards, cfg.data.builtin)
    accelerator.wait_for_everyone()
    if not remote and not (shards / "manifest.json").is_file():
        hint = SHARD_HINTS.get(cfg.model.name, "python launch/shard_demo.py --dataset digits "
                                               "--out {shards}").format(shards=shards)
        raise ConfigError(f"no shards at {shards} (manifest.json missing): build them with `{hint}`")
    splits = ["train"] + (["test"] if cfg.train.test_every or cfg.train.eval_every else [])
    report = check_shards(shards, splits, verify=cfg.data.verify, on_error=cfg.data.on_error)
    if cfg.data.verify == "sha256" and layout.is_main:
        console.print(report.timing())
    return report.manifest


def _data_errors(ctx: Context, current: int = 0) -> int:
    """Samples lost so far (finished loaders + ``current``), summed over the data-parallel
    groups: the ranks of one particle group read the same samples, so one of them counts.
    Collective: every rank calls it at the same point."""
    mine = ctx.data_errors + current if ctx.layout.shard_index == 0 else 0
    return int(all_sum([float(mine)], ctx.accelerator)[0])


def _check_run_dir(run_dir: Path) -> Path:
    """Fail at start, before anything is written, when the run folder cannot be created or
    written; returns its nearest existing ancestor (the folder itself once it exists)."""
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    problem = ("is not a folder" if not existing.is_dir() else
               "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise ConfigError(f"run folder {run_dir} cannot be written: {existing} {problem}; "
                          f"set run.dir to a writable folder")
    return existing


def _check_space(run_dir: Path, model: torch.nn.Module, cfg: Config) -> None:
    """Fail at start when the disk cannot hold the checkpoints: each holds the parameters and
    Adam's three amsgrad buffers; `keep_last` of them plus the one being written."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    need = 4 * size * (cfg.train.keep_last + 1) + size  # + the final model/
    free = shutil.disk_usage(_check_run_dir(run_dir)).free
    if free < need:
        raise ConfigError(f"run folder {run_dir}: {free / 2**20:.1f} MiB free, checkpoints need "
                          f"about {need / 2**20:.1f} MiB (train.keep_last={cfg.train.keep_last} "
                          f"+ 1); free some space, lower train.keep_last or change run.dir")


def _rewind_metrics(path: Path, meta: dict | None) -> None:
    """The resumed run writes again the events after its checkpoint: drop those that the stopped
    run wrote past it (all of them when a run starts afresh in an old folder)."""
    keep = meta.get("metrics_bytes") if meta else 0
    if keep is not None and path.is_file() and path.stat().st_size > keep:
        os.truncate(path, keep)


def _note_changes(meta: dict, cfg: Config, layout: Layout) -> None:
    """Resuming with another config or process count is allowed but not exact: say so."""
    old, new = meta.get("config", {}), to_dict(cfg)
    changes = [f"{s}.{k}: {v!r} -> {new[s].get(k)!r}" for s, section in old.items()
               for k, v in section.items() if s in new and new[s].get(k) != v and s != "run"]
    if meta.get("world", layout.world) != layout.world:
        changes.append(f"processes: {meta['world']} -> {layout.world}")
    if changes and layout.is_main:
        console.print(f"[yellow]resuming step {meta['step']} with changes: {'; '.join(changes)}[/]")


def _model_kwargs(cfg: Config) -> dict:
    """The model section, with the caption vocabulary size read from the shards when unset."""
    kwargs = dataclasses.asdict(cfg.model)
    kwargs.pop("name")
    vocab = Path(cfg.data.shards) / "vocab.json"
    if not kwargs["vocab_size"] and vocab.is_file():
        kwargs["vocab_size"] = len(json.loads(vocab.read_text())["itos"])
    return kwargs


def setup(cfg: Config, resume: str | None = None) -> Context:
    """Everything `fit` needs; a failed start releases the Accelerator, so that a corrected
    config can run in the same process."""
    check_model_name(cfg.model.name)
    resume_from = _find_resume(cfg, resume)
    accelerator = make_accelerator(cfg)
    try:
        return _setup(cfg, accelerator, resume_from)
    except BaseException:
        release(accelerator)
        raise


def _setup(cfg: Config, accelerator, resume_from: Path | None) -> Context:
    layout = make_layout(accelerator, cfg)
    run_dir = resume_from.parent.parent if resume_from else _new_run_dir(cfg)
    run_dir = Path(broadcast(str(run_dir), accelerator))
    _check_run_dir(run_dir)
    _ensure_shards(cfg, accelerator, layout)

    torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
    model = build_model(cfg.model.name, **_model_kwargs(cfg))
    _check_space(run_dir, model, cfg)
    optimizer = make_optimizer(model, cfg.train.lr)
    state, meta = None, None
    if resume_from is not None:
        state, meta = _restore(resume_from, model, optimizer, cfg, layout)
    wrapped = ObjectiveModule(model, estimator_for(cfg, model.multimodal))
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    if state is not None and state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if layout.is_main:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        _rewind_metrics(run_dir / "metrics.jsonl", meta)
    accelerator.wait_for_everyone()
    run_id = _run_id(run_dir, accelerator, layout)
    tracker = start_trackers(accelerator, cfg, run_dir, run_id)
    ctx = Context(cfg, accelerator, layout, run_dir, model, wrapped, optimizer,
                  [p for p in model.parameters() if p.requires_grad],
                  looser=cfg.objective.looser and model.multimodal,
                  metrics=MetricsLog(run_dir / "metrics.jsonl" if layout.is_main else None),
                  tracker=tracker)
    if meta is not None:
        ctx.step, ctx.epoch, ctx.batch_in_epoch = meta["step"], meta["epoch"], meta["batch"]
        ctx.bad_total, ctx.bad_in_row = meta.get("bad_total", 0), meta.get("bad_in_row", 0)
        ctx.data_errors = meta.get("data_errors", 0) if layout.rank == 0 else 0  # the total
        ctx.saved_at = (ctx.step, ctx.epoch, ctx.batch_in_epoch)
    return ctx


def _restore(path: Path, model, optimizer, cfg: Config, layout: Layout) -> tuple[dict, dict]:
    """Load a checkpoint into the model and optimiser (and this rank's RNG); (state, meta)."""
    state, meta, rng = ckpt.load(path, layout.rank)
    if meta["model"] != model.spec:
        diff = {k: (meta["model"].get(k), v) for k, v in model.spec.items()
                if meta["model"].get(k) != v}
        raise ConfigError(f"checkpoint {path} is of another model: {diff} "
                          f"(checkpoint, config); resume with the run's config.yaml")
    if layout.is_main:
        console.print(f"resuming from {path} (step {meta['step']}, epoch {meta['epoch']})")
    _note_changes(meta, cfg, layout)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if rng is not None:
        ckpt.set_rng_state(rng)
    return state, meta


def _run_id(run_dir: Path, accelerator, layout: Layout) -> str:
    """The W&B run id, kept in the run folder so a resumed job logs into the same run."""
    path = run_dir / "wandb_id.txt"
    if layout.is_main and not path.exists():
        path.write_text(f"{run_dir.name.replace(':', '-')}-{int(time.time()) % 100000}")
    accelerator.wait_for_everyone()
    return path.read_text().strip()


# --- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(ctx: Context) -> bool:
    """All ranks write their RNG state; the main process writes the rest and commits.

    A failed write (disk full, I/O error) is reported and dropped, and training goes on:
    `latest` still names the previous checkpoint. Returns whether this one was written."""
    position = (ctx.step, ctx.epoch, ctx.batch_in_epoch)
    if position == ctx.saved_at:
        return True  # e.g. a stop right after a periodic checkpoint: nothing new to save
    acc, root = ctx.accelerator, ctx.run_dir / "checkpoints"
    ctx.history["data_errors"] = _data_errors(ctx)  # all ranks, for the checkpoint's meta
    error = _attempt(ckpt.write_rank_files, root, ctx.step, ctx.layout.rank)
    if not any_rank(error is not None, acc) and ctx.layout.is_main:
        error = _attempt(_write_and_commit, ctx, root)
    if not any_rank(error is not None, acc):
        ctx.saved_at = position
        return True
    ctx.checkpoint_failures += 1
    if ctx.layout.is_main:
        ckpt.discard(root, ctx.step)
        kept = ckpt.latest(root)
        console.print(f"[bold red]checkpoint at step {ctx.step} failed "
                      f"({error or 'on another rank'}); kept {kept or 'no checkpoint'}[/]")
    acc.wait_for_everyone()
    return False


def _attempt(write, *args) -> str | None:
    """Run one checkpoint write; its error (disk full: OSError, or RuntimeError from torch.save)
    as text, or None."""
    try:
        write(*args)
    except (OSError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _write_and_commit(ctx: Context, root: Path) -> None:
    acc, metrics = ctx.accelerator, ctx.metrics.path
    state = {"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
             "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
    meta = {"step": ctx.step, "epoch": ctx.epoch, "batch": ctx.batch_in_epoch,
            "samples_per_rank": ctx.batch_in_epoch * ctx.cfg.data.batch_size,
            "bad_total": ctx.bad_total, "bad_in_row": ctx.bad_in_row, "world": ctx.layout.world,
            "data_errors": ctx.history.get("data_errors", 0),
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "model": ctx.model.spec, "config": to_dict(ctx.cfg)}
    ckpt.write_main_files(root, ctx.step, state, meta)
    ckpt.commit(root, ctx.step, ctx.cfg.train.keep_last)


# --- epochs ------------------------------------------------------------------------------------

def _loader(ctx: Context, split: str, train: bool):
    cfg = ctx.cfg
    return make_loader(cfg.data.shards, split, batch_size=cfg.data.batch_size,
                       modalities=ctx.model.modalities, num_workers=cfg.data.num_workers,
                       dp_rank=ctx.layout.dp_rank, dp_size=ctx.layout.dp_size,
                       seed=cfg.train.seed, epoch=ctx.epoch, shuffle=train,
                       shuffle_buffer=cfg.data.shuffle_buffer, drop_last=train,
                       on_error=cfg.data.on_error, resampled=cfg.data.resampled and train)


def train_epoch(ctx: Context, progress: TrainProgress) -> None:
    loader = _loader(ctx, "train", train=True)
    try:
        _train_batches(ctx, loader, progress)
    finally:
        ctx.data_errors += loader.errors


def _done(ctx: Context) -> bool:
    return bool(ctx.cfg.train.max_steps) and ctx.step >= ctx.cfg.train.max_steps


def _train_batches(ctx: Context, loader, progress: TrainProgress) -> None:
    cfg, acc = ctx.cfg, ctx.accelerator
    ctx.wrapped.train()
    for i, batch in enumerate(loader):
        if i < ctx.batch_in_epoch:
            continue  # resuming mid-epoch: the order is a function of (seed, epoch)
        stats = train_step(ctx, batch)
        ctx.step += 1
        ctx.batch_in_epoch = i + 1
        ctx.bad_in_row = ctx.bad_in_row + 1 if stats["skipped"] else 0
        ctx.bad_total += int(stats["skipped"])
        B = batch[ctx.model.modalities[0]].shape[0] * ctx.layout.dp_size
        rate = progress.update(B, stats["loss"], stats["bound"])
        if ctx.step % cfg.train.log_every == 0 or ctx.step == 1 or stats["skipped"]:
            event = ctx.metrics.write(ctx.step, ctx.epoch, "train", samples_per_s=rate,
                                      bad_steps=ctx.bad_total,
                                      data_errors=_data_errors(ctx, loader.errors), **stats)
            ctx.tracker.log({f"train/{k}": v for k, v in event.items() if k != "split"},
                            step=ctx.step)
        if stats["skipped"]:
            _bad_step(ctx)
        if cfg.train.checkpoint_every and ctx.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(ctx)
        if any_rank(ctx.stop_requested, acc) or _done(ctx):
            ctx.stop_requested = True
            return
    ctx.epoch += 1
    ctx.batch_in_epoch = 0


def _bad_step(ctx: Context) -> None:
    """Report a skipped update; give up after train.max_bad_steps of them in a row."""
    limit = ctx.cfg.train.max_bad_steps
    if ctx.layout.is_main:
        console.print(f"[yellow]step {ctx.step}: non-finite loss or gradient, update skipped "
                      f"({ctx.bad_in_row} in a row of at most {limit}; {ctx.bad_total} in all)[/]")
    if ctx.bad_in_row >= limit:
        kept = ckpt.latest(ctx.run_dir / "checkpoints")
        raise TrainingStopped(f"{ctx.bad_in_row} steps in a row had a non-finite loss or "
                              f"gradient (step {ctx.step}); the last good checkpoint is kept "
                              f"({kept or 'none written yet'}). Lower train.lr, set "
                              f"train.grad_clip, or try train.mixed_precision=no")


def test_epoch(ctx: Context) -> dict:
    """The test bound (joint m_iwae with the training K) and, on the main process, pictures."""
    cfg, acc = ctx.cfg, ctx.accelerator
    ctx.wrapped.eval()
    total, count = 0.0, 0
    loader = _loader(ctx, "test", train=False)
    for i, batch in enumerate(loader):
        if cfg.train.test_batches and i >= cfg.train.test_batches:
            break
        xs = batch_inputs(batch, ctx.model.modalities, acc.device)
        with acc.autocast():
            values = test_bound(ctx.model, xs, cfg.objective.K, cfg.objective.k_chunk,
                                seed=cfg.train.seed + i)
        total, count = total + float(values.sum()), count + values.shape[0]
        if i == 0 and ctx.layout.is_main:
            _save_pictures(ctx, xs)
    total, count = all_sum([total, float(count)], acc)
    bound = total / max(count, 1)
    ctx.data_errors += loader.errors
    event = ctx.metrics.write(ctx.step, ctx.epoch, "test", bound=bound, loss=-bound,
                              datapoints=int(count), K=cfg.objective.K,
                              data_errors=_data_errors(ctx))
    ctx.tracker.log({"test/bound": bound, "test/data_errors": event["data_errors"]}, step=ctx.step)
    ctx.wrapped.train()
    return event


def eval_epoch(ctx: Context) -> dict:
    """`train.eval_metrics` of the current model (`mmvae.eval.run.evaluate_model`): every
    process computes its share of the test batches, the numbers are those of one process. Logged
    to metrics.jsonl (split "eval", keys <metric>/<key>) and W&B (eval/<metric>/<key>); metrics
    that do not apply are skipped with one note per run."""
    from mmvae.eval.distributed import Ranks
    from mmvae.eval.run import evaluate_model

    acc = ctx.accelerator
    ctx.wrapped.eval()
    try:
        with acc.autocast():
            results, skipped = evaluate_model(ctx.model, ctx.cfg, ctx.cfg.train.eval_metrics,
                                              run_dir=ctx.run_dir, device=acc.device,
                                              ranks=Ranks(acc.process_index, acc.num_processes))
    finally:
        ctx.wrapped.train()
    if skipped and ctx.layout.is_main and "eval" not in ctx.history:
        console.print(f"[dim]train.eval_metrics: skipping {'; '.join(skipped)}[/dim]")
    values = {f"{name}/{key}": value for name, result in results.items()
              for key, value in result["values"].items()}
    event = ctx.metrics.write(ctx.step, ctx.epoch, "eval", **values)
    ctx.tracker.log({f"eval/{key}": value for key, value in values.items()}, step=ctx.step)
    ctx.history["eval"] = event
    return event


def _save_pictures(ctx: Context, xs) -> None:
    images = ctx.run_dir / "images"
    tag = f"{ctx.epoch:03d}"
    extras = pictures.picture_resources(ctx.cfg.data.shards, ctx.model)  # vocab, feature index
    paths = list(pictures.save_reconstructions(ctx.model, xs, images / f"recon_{tag}.png",
                                               **extras))
    gen = torch.Generator(device=xs[0].device).manual_seed(ctx.cfg.train.seed)
    paths += list(pictures.save_prior_samples(ctx.model, images / f"prior_{tag}.png",
                                              generator=gen, **extras) or [])
    ctx.tracker.log_images(paths, step=ctx.step)


# --- entry -------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextmanager
def _stop_on_signals(ctx: Context):
    """SIGUSR1 (SLURM's warning before the time limit or a preemption) and SIGTERM: finish the
    step, checkpoint, stop. launch/train.py holds SIGUSR1 blocked from start-up, so one that came
    during imports or setup is delivered here, when it can be acted on."""
    def request_stop(signum, frame):
        ctx.stop_requested = True
        console.print(f"[yellow]signal {signum}: checkpointing after this step[/]")

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a late signal stays pending, harmless
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fit(cfg: Config, resume: str | None = None) -> tuple[Path, str]:
    """Train as configured; returns (run folder, "done" | "stopped")."""
    ctx = setup(cfg, resume)
    try:
        with _stop_on_signals(ctx):
            status = _train(ctx)
    finally:
        ctx.tracker.finish()
        release(ctx.accelerator)
    return ctx.run_dir, status


def _train(ctx: Context) -> str:
    cfg, layout = ctx.cfg, ctx.layout
    steps_per_epoch = len(_loader(ctx, "train", train=True))
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    if layout.is_main:
        console.print(f"[bold]mmvae[/] {cfg.model.name} · {cfg.objective.name} K={cfg.objective.K}"
                      f" · {layout.world} process(es), P={layout.particle_shards} · run {ctx.run_dir}")
    progress = TrainProgress(cfg.logging.progress and layout.is_main, total, start=ctx.step)
    t0, step0 = time.perf_counter(), ctx.step
    try:
        while ctx.epoch < cfg.train.epochs and not ctx.stop_requested:
            epoch = ctx.epoch
            train_epoch(ctx, progress)
            if ctx.epoch > epoch and cfg.train.test_every and ctx.epoch % cfg.train.test_every == 0:
                ctx.history["test"] = test_epoch(ctx)
            if ctx.epoch > epoch and cfg.train.eval_every and ctx.epoch % cfg.train.eval_every == 0:
                eval_epoch(ctx)
            save_checkpoint(ctx)
    finally:
        progress.close()
    status = "stopped" if ctx.stop_requested and not _done(ctx) else "done"
    if status == "done":
        _finish(ctx, time.perf_counter() - t0, ctx.step - step0)
    return status


def _finish(ctx: Context, seconds: float, steps: int) -> None:
    if ctx.cfg.train.test_every and ctx.history.get("test", {}).get("step") != ctx.step:
        ctx.history["test"] = test_epoch(ctx)
    if ctx.cfg.train.eval_every and ctx.history.get("eval", {}).get("step") != ctx.step:
        eval_epoch(ctx)
    data_errors = _data_errors(ctx)
    if ctx.layout.is_main:
        save_model(ctx.model, ctx.run_dir / "model")
        samples = steps * ctx.cfg.data.batch_size * ctx.layout.dp_size
        summary = {"step": ctx.step, "epoch": ctx.epoch, "bad_steps": ctx.bad_total,
                   "data_errors": data_errors,
                   "checkpoint_failures": ctx.checkpoint_failures,
                   "train_seconds": round(seconds, 2),
                   "samples_per_s": round(samples / max(seconds, 1e-9), 2),
                   "test": ctx.history.get("test"), "eval": ctx.history.get("eval")}
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.accelerator.wait_for_everyone()
