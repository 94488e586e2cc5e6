"""The training loop: `fit(cfg)` reads top to bottom.

setup (accelerator, layout, run folder, data, model, optimiser, resume) -> for each epoch: train
steps (progress bar, metrics, periodic checkpoints, stop requests) -> test bound and pictures ->
checkpoint -> final model and summary.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch

from mmvae.config import Config, ConfigError, save_config, to_dict
from mmvae.data import make_loader, read_manifest
from mmvae.data.builtin import ensure_builtin
from mmvae.eval import pictures
from mmvae.log import MetricsLog, TrainProgress, console
from mmvae.registry import build_model, check_model_name, save_model
from mmvae.train import checkpoint as ckpt
from mmvae.train.dist import (Layout, all_sum, any_rank, broadcast, make_accelerator,
                              make_layout, release, start_trackers)
from mmvae.train.optim import make_optimizer
from mmvae.train.step import ObjectiveModule, batch_inputs, estimator_for, test_bound, train_step

SHARD_HINTS = {
    "mnist_svhn": "python launch/shard_mnist_svhn.py --mnist DIR --svhn DIR --out {shards}",
    "cubIS": "python launch/shard_cub.py --cub data/cub --out {shards}",
    "cubISft": "python launch/shard_cub.py --cub data/cub --features resnet101 --out {shards}",
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
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_in_row: int = 0
    bad_total: int = 0
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
    shards = Path(cfg.data.shards)
    if cfg.data.builtin and layout.is_main:
        ensure_builtin(shards, cfg.data.builtin)
    accelerator.wait_for_everyone()
    if not (shards / "manifest.json").is_file():
        hint = SHARD_HINTS.get(cfg.model.name, "python launch/shard_demo.py --dataset digits "
                                               "--out {shards}").format(shards=shards)
        raise ConfigError(f"no shards at {shards} (manifest.json missing): build them with `{hint}`")
    return read_manifest(shards)


def _model_kwargs(cfg: Config) -> dict:
    kwargs = dataclasses.asdict(cfg.model)
    kwargs.pop("name")
    return kwargs


def setup(cfg: Config, resume: str | None = None) -> Context:
    check_model_name(cfg.model.name)
    resume_from = _find_resume(cfg, resume)
    accelerator = make_accelerator(cfg)
    layout = make_layout(accelerator, cfg)
    run_dir = resume_from.parent.parent if resume_from else _new_run_dir(cfg)
    run_dir = Path(broadcast(str(run_dir), accelerator))
    _ensure_shards(cfg, accelerator, layout)

    torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
    model = build_model(cfg.model.name, **_model_kwargs(cfg))
    optimizer = make_optimizer(model, cfg.train.lr)
    state, meta = None, None
    if resume_from is not None:
        state, meta, rng = ckpt.load(resume_from, layout.rank)
        if meta["model"] != model.spec:
            diff = {k: (meta["model"].get(k), v) for k, v in model.spec.items()
                    if meta["model"].get(k) != v}
            raise ConfigError(f"checkpoint {resume_from} is of another model: {diff} "
                              f"(checkpoint, config); resume with the run's config.yaml")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if rng is not None:
            ckpt.set_rng_state(rng)

    wrapped = ObjectiveModule(model, estimator_for(cfg, model.multimodal))
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    if state is not None and state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if layout.is_main:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    run_id = _run_id(run_dir, accelerator, layout)
    start_trackers(accelerator, cfg, run_dir, run_id)
    ctx = Context(cfg, accelerator, layout, run_dir, model, wrapped, optimizer,
                  [p for p in model.parameters() if p.requires_grad],
                  looser=cfg.objective.looser and model.multimodal,
                  metrics=MetricsLog(run_dir / "metrics.jsonl" if layout.is_main else None))
    if meta is not None:
        ctx.step, ctx.epoch, ctx.batch_in_epoch = meta["step"], meta["epoch"], meta["batch"]
        ctx.bad_total = meta.get("bad_total", 0)
    return ctx


def _run_id(run_dir: Path, accelerator, layout: Layout) -> str:
    """The W&B run id, kept in the run folder so a resumed job logs into the same run."""
    path = run_dir / "wandb_id.txt"
    if layout.is_main and not path.exists():
        path.write_text(f"{run_dir.name.replace(':', '-')}-{int(time.time()) % 100000}")
    accelerator.wait_for_everyone()
    return path.read_text().strip()


# --- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(ctx: Context) -> None:
    """All ranks write their RNG state; the main process writes the rest and commits."""
    acc, root = ctx.accelerator, ctx.run_dir / "checkpoints"
    ckpt.write_rank_files(root, ctx.step, ctx.layout.rank)
    acc.wait_for_everyone()
    if ctx.layout.is_main:
        state = {"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
        meta = {"step": ctx.step, "epoch": ctx.epoch, "batch": ctx.batch_in_epoch,
                "bad_total": ctx.bad_total, "world": ctx.layout.world, "model": ctx.model.spec,
                "config": to_dict(ctx.cfg)}
        ckpt.write_main_files(root, ctx.step, state, meta)
        ckpt.commit(root, ctx.step, ctx.cfg.train.keep_last)
    acc.wait_for_everyone()


# --- epochs ------------------------------------------------------------------------------------

def _loader(ctx: Context, split: str, train: bool):
    cfg = ctx.cfg
    return make_loader(cfg.data.shards, split, batch_size=cfg.data.batch_size,
                       modalities=ctx.model.modalities, num_workers=cfg.data.num_workers,
                       dp_rank=ctx.layout.dp_rank, dp_size=ctx.layout.dp_size,
                       seed=cfg.train.seed, epoch=ctx.epoch, shuffle=train,
                       shuffle_buffer=cfg.data.shuffle_buffer, drop_last=train,
                       on_error=cfg.data.on_error, resampled=cfg.data.resampled and train)


def _done(ctx: Context) -> bool:
    return bool(ctx.cfg.train.max_steps) and ctx.step >= ctx.cfg.train.max_steps


def train_epoch(ctx: Context, progress: TrainProgress) -> None:
    cfg, acc = ctx.cfg, ctx.accelerator
    loader = _loader(ctx, "train", train=True)
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
        if ctx.step % cfg.train.log_every == 0 or ctx.step == 1:
            event = ctx.metrics.write(ctx.step, ctx.epoch, "train", samples_per_s=rate,
                                      bad_steps=ctx.bad_total,
                                      data_errors=getattr(loader, "errors", 0), **stats)
            acc.log({f"train/{k}": v for k, v in event.items() if k != "split"}, step=ctx.step)
        if ctx.bad_in_row >= cfg.train.max_bad_steps:
            raise TrainingStopped(f"{ctx.bad_in_row} steps in a row had a non-finite loss or "
                                  f"gradient (step {ctx.step}); the last good checkpoint is kept. "
                                  f"Lower train.lr, or try train.mixed_precision=no")
        if cfg.train.checkpoint_every and ctx.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(ctx)
        if any_rank(ctx.stop_requested, acc) or _done(ctx):
            ctx.stop_requested = True
            return
    ctx.epoch += 1
    ctx.batch_in_epoch = 0


def test_epoch(ctx: Context) -> dict:
    """The test bound (joint m_iwae with the training K) and, on the main process, pictures."""
    cfg, acc = ctx.cfg, ctx.accelerator
    ctx.wrapped.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(_loader(ctx, "test", train=False)):
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
    event = ctx.metrics.write(ctx.step, ctx.epoch, "test", bound=bound, loss=-bound,
                              datapoints=int(count), K=cfg.objective.K)
    acc.log({"test/bound": bound}, step=ctx.step)
    ctx.wrapped.train()
    return event


def _save_pictures(ctx: Context, xs) -> None:
    images = ctx.run_dir / "images"
    tag = f"{ctx.epoch:03d}"
    paths = [pictures.save_reconstructions(ctx.model, xs, images / f"recon_{tag}.png")]
    gen = torch.Generator(device=xs[0].device).manual_seed(ctx.cfg.train.seed)
    paths += list(pictures.save_prior_samples(ctx.model, images / f"prior_{tag}.png",
                                              generator=gen) or [])
    tracker = ctx.accelerator.get_tracker("wandb", unwrap=True) if ctx.cfg.logging.wandb != "disabled" else None
    if tracker is not None and hasattr(tracker, "log"):
        import wandb

        tracker.log({Path(p).stem.rsplit("_", 1)[0]: wandb.Image(str(p)) for p in paths
                     if str(p).endswith(".png")}, step=ctx.step)


# --- entry -------------------------------------------------------------------------------------

def _install_stop_handlers(ctx: Context) -> None:
    """SIGUSR1 (SLURM's warning before preemption) and SIGTERM: finish the step, checkpoint, stop."""
    def request_stop(signum, frame):
        ctx.stop_requested = True
        console.print(f"[yellow]signal {signum}: checkpointing after this step[/]")

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, request_stop)


def fit(cfg: Config, resume: str | None = None) -> tuple[Path, str]:
    """Train as configured; returns (run folder, "done" | "stopped")."""
    ctx = setup(cfg, resume)
    _install_stop_handlers(ctx)
    acc, layout = ctx.accelerator, ctx.layout
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
            save_checkpoint(ctx)
    finally:
        progress.close()
    status = "stopped" if ctx.stop_requested and not _done(ctx) else "done"
    if status == "done":
        _finish(ctx, time.perf_counter() - t0, ctx.step - step0)
    release(acc)
    return ctx.run_dir, status


def _finish(ctx: Context, seconds: float, steps: int) -> None:
    if ctx.cfg.train.test_every and ctx.history.get("test", {}).get("step") != ctx.step:
        ctx.history["test"] = test_epoch(ctx)
    if ctx.layout.is_main:
        save_model(ctx.model, ctx.run_dir / "model")
        samples = steps * ctx.cfg.data.batch_size * ctx.layout.dp_size
        summary = {"step": ctx.step, "epoch": ctx.epoch, "bad_steps": ctx.bad_total,
                   "train_seconds": round(seconds, 2),
                   "samples_per_s": round(samples / max(seconds, 1e-9), 2),
                   "test": ctx.history.get("test")}
        (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.accelerator.wait_for_everyone()
