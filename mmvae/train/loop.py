"""The training loop: `fit(cfg)` reads top to bottom.

setup (accelerator, layout, run folder, data, model, optimiser, resume) -> for each epoch: train
steps (progress bar, metrics, periodic checkpoints, stop requests) -> test bound and pictures ->
evaluation metrics every `train.eval_every` epochs -> checkpoint -> final model and summary.

A `Run` is what is set once (config, accelerator, layout, folder, model, optimizer, loggers); a
`TrainState` is what changes (step, epoch, position, counters). The state is registered with the
Accelerator, so `accelerator.save_state` / `load_state` checkpoint it with the model, optimizer,
grad scaler and every rank's generators (DeepSpeed: its per-rank shards); `mmvae.train.checkpoint`
commits the folder atomically, `mmvae.train.resume` picks the one to continue from.
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
from itertools import islice
from pathlib import Path

import torch

from mmvae.config import Config, ConfigError, save_config, to_dict
from mmvae.data import make_loader
from mmvae.data.builtin import ensure_builtin
from mmvae.data.checks import check_shards
from mmvae.data.store import REMOTE_SCHEMES
from mmvae.eval import pictures
from mmvae.log import MetricsLog, Tracker, TrainProgress, console, info, start_trackers, track
from mmvae.paths import unwritable
from mmvae.registry import build_model, check_model_name, load_weights, save_model, spec_of
from mmvae.train import checkpoint as ckpt
from mmvae.train.compiled import compile_nets
from mmvae.train.dist import (Layout, all_sum, any_rank, autocast, broadcast, make_accelerator,
                              make_layout, release)
from mmvae.train.optim import make_optimizer
from mmvae.train.precision import auto_message, auto_precision
from mmvae.train.resume import find as find_resume
from mmvae.train.resume import keep_old_metrics
from mmvae.train.step import (ObjectiveModule, batch_inputs, batch_present, estimator_for,
                              test_bound, train_step)

SHARD_HINTS = {
    "mnist_svhn": "python launch/shard_mnist_svhn.py --mnist DIR --svhn DIR --out {shards}",
    "cubIS": "python launch/shard_cub.py --cub data/cub --out {shards}",
    "cubISft": "python launch/shard_cub.py --cub data/cub --weights FILE --out {shards}",
}


class TrainingStopped(RuntimeError):
    """Training gave up (e.g. too many non-finite steps); the last good checkpoint is kept."""


@dataclass
class TrainState:
    """What changes as training goes, and all a resume needs besides the model, optimizer,
    scaler and generators: registered with the Accelerator, saved and loaded by
    `accelerator.save_state` / `load_state` (the data order of an epoch and the particle noise of
    a step are functions of the seed, epoch and step, so the position is enough)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on
    bad_in_row: int = 0  # non-finite steps skipped in a row (train.max_bad_steps)
    bad_total: int = 0
    overflow_steps: int = 0  # fp16 steps whose gradients overflowed: skipped by the grad scaler
    data_errors: int = 0  # samples lost by all ranks up to the last checkpoint (see _data_errors)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))

    @property
    def position(self) -> tuple[int, int, int]:
        return self.step, self.epoch, self.batch_in_epoch


@dataclass
class Session:
    """This process's bookkeeping, not checkpointed."""
    stop_requested: bool = False
    saved_at: tuple = ()  # TrainState.position of the last checkpoint written or loaded
    checkpoint_failures: int = 0
    data_errors: int = 0  # samples this rank's finished loaders lost since the last checkpoint
    history: dict = field(default_factory=dict)  # last test and eval events, for summary.json


@dataclass(frozen=True)
class Run:
    """What a run is: set once by `setup`. `state` and `session` change."""
    cfg: Config
    accelerator: object
    layout: Layout
    run_dir: Path
    model: torch.nn.Module  # the model itself; `wrapped` is what the Accelerator prepared
    wrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list
    looser: bool
    metrics: MetricsLog
    tracker: Tracker
    state: TrainState
    session: Session

    @property
    def step(self) -> int:  # what `train_step` reads
        return self.state.step


# --- setup -------------------------------------------------------------------------------------

def _new_run_dir(cfg: Config) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    experiment = cfg.run.experiment or cfg.model.name
    return Path("runs") / experiment / datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def _ensure_shards(cfg: Config, accelerator, layout: Layout) -> dict:
    """Build a missing built-in dataset, then check the shards (mmvae.data.checks): a bad
    manifest, a missing shard or an empty split is a one-line ConfigError before anything is
    written."""
    remote = cfg.data.shards.startswith(REMOTE_SCHEMES)
    shards = cfg.data.shards if remote else Path(cfg.data.shards)
    if cfg.data.builtin and not remote and not (shards / "manifest.json").is_file():
        if problem := unwritable(shards):  # every rank: none may wait for a build that fails
            raise ConfigError(f"data.builtin={cfg.data.builtin} cannot be built into "
                              f"data.shards={shards}: {problem}; set data.shards to a "
                              f"writable folder")
    if cfg.data.builtin and layout.is_main and not remote:
        ensure_builtin(shards, cfg.data.builtin)
    accelerator.wait_for_everyone()
    if not remote and not (shards / "manifest.json").is_file():
        hint = SHARD_HINTS.get(cfg.model.name, "python launch/shard_demo.py --dataset digits "
                                               "--out {shards}").format(shards=shards)
        raise ConfigError(f"no shards at {shards} (manifest.json missing): build them with `{hint}`")
    splits = ["train"] + (["test"] if cfg.train.test_every or cfg.train.eval_every else [])
    report = check_shards(shards, splits, verify=cfg.data.verify, on_error=cfg.data.on_error)
    if cfg.data.verify == "sha256":
        info(report.timing())
    return report.manifest


def _data_errors(run: Run, current: int = 0) -> int:
    """Samples lost so far: those counted at the last checkpoint, plus this session's finished
    loaders and ``current``, summed over the data-parallel groups (the ranks of one particle
    group read the same samples, so one of them counts). Collective: every rank calls it at the
    same point."""
    mine = run.session.data_errors + current if run.layout.shard_index == 0 else 0
    return run.state.data_errors + int(all_sum([float(mine)], run.accelerator)[0])


def _check_run_dir(run_dir: Path) -> Path:
    """Fail at start, before anything is written, when the run folder cannot be created or
    written; returns its nearest existing ancestor (the folder itself once it exists)."""
    if problem := unwritable(run_dir):
        raise ConfigError(f"run folder {run_dir} cannot be written: {problem}; "
                          f"set run.dir to a writable folder")
    return next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())


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


def _note_changes(path: Path, meta: dict, cfg: Config, layout: Layout) -> None:
    """Say what was resumed. Resuming with another config or process count is allowed but not
    exact: say so too."""
    info(f"resuming from {path} (step {meta['step']}, epoch {meta['epoch']})")
    old, new = meta.get("config", {}), to_dict(cfg)
    changes = [f"{s}.{k}: {v!r} -> {new[s].get(k)!r}" for s, section in old.items()
               for k, v in section.items() if s in new and new[s].get(k) != v and s != "run"]
    if meta.get("world", layout.world) != layout.world:
        changes.append(f"processes: {meta['world']} -> {layout.world}")
    if changes:
        info(f"[yellow]resuming step {meta['step']} with changes: {'; '.join(changes)}[/]")


def model_kwargs(cfg: Config) -> dict:
    """The model section, with the caption vocabulary size read from the shards when unset."""
    kwargs = dataclasses.asdict(cfg.model)
    kwargs.pop("name")
    vocab = Path(cfg.data.shards) / "vocab.json"
    if not kwargs["vocab_size"] and vocab.is_file():
        kwargs["vocab_size"] = len(json.loads(vocab.read_text())["itos"])
    return kwargs


def setup(cfg: Config, resume: str | None = None) -> Run:
    """Everything `fit` needs; a failed start releases the Accelerator, so that a corrected
    config can run in the same process."""
    check_model_name(cfg.model.name)
    auto = cfg.train.mixed_precision == "auto"
    accelerator = make_accelerator(cfg, announce=False)  # said below, once the start is good
    try:
        run = _setup(cfg, accelerator, resume)
    except BaseException:
        release(accelerator)
        raise
    if auto:
        info(auto_message(*auto_precision()))
    return run


def _setup(cfg: Config, accelerator, resume: str | None) -> Run:
    layout = make_layout(accelerator, cfg)
    resume_from = find_resume(cfg, resume, say=layout.is_main)
    run_dir = resume_from.parent.parent if resume_from else _new_run_dir(cfg)
    run_dir = Path(broadcast(str(run_dir), accelerator))
    _check_run_dir(run_dir)
    _ensure_shards(cfg, accelerator, layout)

    torch.manual_seed(cfg.train.seed)  # identical initial parameters on every rank
    model = build_model(cfg.model.name, **model_kwargs(cfg))
    if cfg.train.init_from and resume_from is None:
        _init_from(model, cfg.train.init_from, run_dir)
    model = compile_nets(model, cfg.train.compile)
    _check_space(run_dir, model, cfg)
    meta = _check_checkpoint(resume_from, model, accelerator, layout) if resume_from else None
    wrapped = ObjectiveModule(model, estimator_for(cfg, model.multimodal))
    wrapped, optimizer = accelerator.prepare(wrapped, make_optimizer(model, cfg.train.lr,
                                                                       cfg.train.adam_eps))
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    _checkpoint_plain_keys(accelerator)
    if resume_from is not None:
        _load(accelerator, resume_from)
        _note_changes(resume_from, meta, cfg, layout)
    if layout.is_main:
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if meta is not None:
            _rewind_metrics(run_dir / "metrics.jsonl", meta["metrics_bytes"])
        else:
            keep_old_metrics(run_dir / "metrics.jsonl", say=True)
    accelerator.wait_for_everyone()
    run_id = _run_id(run_dir, accelerator, layout)
    tracker = start_trackers(accelerator, cfg.logging, to_dict(cfg), run_dir, run_id)
    return Run(cfg, accelerator, layout, run_dir, model, wrapped, optimizer,
               [p for p in model.parameters() if p.requires_grad],
               looser=cfg.objective.looser and model.multimodal,
               metrics=MetricsLog(run_dir / "metrics.jsonl" if layout.is_main else None),
               tracker=tracker, state=state, session=Session(saved_at=state.position))


def _init_from(model, source: str, run_dir: Path) -> None:
    """Fine-tuning: a fresh run whose parameters start from saved weights. The run's own final
    model/ must not be the folder it starts from (it would be overwritten at the end)."""
    path = load_weights(model, source)
    if path.resolve() == (run_dir / "model").resolve():
        raise ConfigError(f"train.init_from={source} is the model/ this run would write at its "
                          f"end; set run.dir to a new folder")
    info(f"starting from the weights in {path}", soft_wrap=True)


def _check_checkpoint(path: Path, model, accelerator, layout: Layout) -> dict:
    """The checkpoint's meta.json, once it is known to be of this model and loadable here:
    DeepSpeed's shards are per rank, and need DeepSpeed and the same number of processes."""
    meta = ckpt.read_meta(path)
    if meta["model"] != spec_of(model):
        diff = {k: (meta["model"].get(k), v) for k, v in spec_of(model).items()
                if meta["model"].get(k) != v}
        raise ConfigError(f"checkpoint {path} is of another model: {diff} "
                          f"(checkpoint, config); resume with the run's config.yaml")
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if meta["deepspeed"] != deepspeed or (deepspeed and meta["world"] != layout.world):
        written = f"{'with' if meta['deepspeed'] else 'without'} DeepSpeed on {meta['world']}"
        raise ConfigError(f"checkpoint {path} was written {written} process(es) and cannot be "
                          f"resumed {'with' if deepspeed else 'without'} DeepSpeed on "
                          f"{layout.world}; launch as the run was launched")
    return meta


def _load(accelerator, path: Path) -> None:
    """Model, optimizer (DeepSpeed: this rank's shards), scaler, this rank's generators and the
    TrainState, after `prepare`. A file that is there with its size but does not load (damaged)
    is a one-line error."""
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # noqa: BLE001 - torch.load and pickle raise many kinds
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {reason});"
                          f" resume an earlier one with --resume {path.parent}/<step>") from None


def _checkpoint_plain_keys(accelerator) -> None:
    """Checkpoints hold the model's own parameter names (`model.*`), not DDP's (`module.model.*`),
    so a checkpoint resumes under another number of processes. (DeepSpeed saves its engine's
    module itself; these lists are then empty.)"""
    def on_save(models, weights, output_dir):
        weights[:] = [accelerator.get_state_dict(m, unwrap=True) for m, _ in zip(models, weights)]

    def on_load(models, input_dir):
        models[:] = [accelerator.unwrap_model(m) for m in models]

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def _rewind_metrics(path: Path, keep: int) -> None:
    """The resumed run writes again the events after its checkpoint: drop those that the stopped
    run wrote past it."""
    if path.is_file() and path.stat().st_size > keep:
        os.truncate(path, keep)


def _run_id(run_dir: Path, accelerator, layout: Layout) -> str:
    """The W&B run id, kept in the run folder so a resumed job logs into the same run."""
    path = run_dir / "wandb_id.txt"
    if layout.is_main and not path.exists():
        path.write_text(f"{run_dir.name.replace(':', '-')}-{int(time.time()) % 100000}")
    accelerator.wait_for_everyone()
    return path.read_text().strip()


# --- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(run: Run) -> bool:
    """`accelerator.save_state` into the temporary folder (every rank: its generators, and under
    DeepSpeed its shards; the main process: model, optimizer, scaler, TrainState), then the main
    process lists the files in meta.json and commits.

    A failed write (disk full, I/O error) is reported and dropped, and training goes on: the
    previous checkpoint stays the newest usable one. Returns whether this one was written."""
    state, session = run.state, run.session
    if state.position == session.saved_at:
        return True  # e.g. a stop right after a periodic checkpoint: nothing new to save
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    # the loss count so far into the TrainState (all ranks: a collective), this session's restarts
    state.data_errors, session.data_errors = _data_errors(run), 0
    if run.layout.is_main:
        ckpt.discard(root, state.step)  # leftovers of a write that crashed at this step
    acc.wait_for_everyone()
    # torch.save rather than safetensors, which drops one of every pair of shared tensors (the
    # MMVAE's prior) with a warning per save; everything but the TrainState (plain ints) then
    # loads with weights_only=True.
    error = _attempt(lambda: acc.save_state(str(ckpt.tmp_dir(root, state.step)),
                                            safe_serialization=False))
    if not any_rank(error is not None, acc) and run.layout.is_main:
        error = _attempt(_commit, run, root)
    if not any_rank(error is not None, acc):
        session.saved_at = state.position
        return True
    session.checkpoint_failures += 1
    if run.layout.is_main:
        ckpt.discard(root, state.step)
        kept = ckpt.latest(root)
        console.print(f"[bold red]checkpoint at step {state.step} failed "
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


def _commit(run: Run, root: Path) -> None:
    state, metrics = run.state, run.metrics.path
    meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch_in_epoch,
            "samples_per_rank": state.batch_in_epoch * run.cfg.data.batch_size,
            "world": run.layout.world, "deepspeed": run.accelerator.state.deepspeed_plugin is not None,
            "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
            "model": spec_of(run.model), "config": to_dict(run.cfg)}
    ckpt.write_meta(ckpt.tmp_dir(root, state.step), meta)
    ckpt.commit(root, state.step, run.cfg.train.keep_last)


# --- epochs ------------------------------------------------------------------------------------

def _loader(run: Run, split: str, train: bool):
    cfg = run.cfg
    drop = cfg.data.drop_modalities if train else 0.0  # the test bound sees the data as it is
    if drop and not run.model.multimodal:
        raise ConfigError(f"data.drop_modalities={drop} needs a multimodal model; "
                          f"{cfg.model.name} has one modality: set data.drop_modalities=0")
    loader = make_loader(cfg.data.shards, split, batch_size=cfg.data.batch_size,
                         modalities=run.model.modalities, num_workers=cfg.data.num_workers,
                         dp_rank=run.layout.dp_rank, dp_size=run.layout.dp_size,
                         seed=cfg.train.seed, epoch=run.state.epoch, shuffle=train,
                         shuffle_buffer=cfg.data.shuffle_buffer, drop_last=train,
                         on_error=cfg.data.on_error, resampled=cfg.data.resampled and train,
                         drop_modalities=drop, tar_reader=cfg.data.tar_reader)
    return loader


def _done(run: Run) -> bool:
    return bool(run.cfg.train.max_steps) and run.state.step >= run.cfg.train.max_steps


def train_epoch(run: Run, progress: TrainProgress) -> None:
    loader = _loader(run, "train", train=True)
    try:
        _train_batches(run, loader, progress)
    finally:
        run.session.data_errors += loader.errors


def _train_batches(run: Run, loader, progress: TrainProgress) -> None:
    cfg, acc, state = run.cfg, run.accelerator, run.state
    run.wrapped.train()
    for i, batch in enumerate(loader):
        if i < state.batch_in_epoch:
            continue  # resuming mid-epoch: the order is a function of (seed, epoch)
        stats = train_step(run, batch)
        _count(state, i, stats)
        B = batch[run.model.modalities[0]].shape[0] * run.layout.dp_size
        rate = progress.update(B, stats["loss"], stats["bound"])
        if state.step % cfg.train.log_every == 0 or state.step == 1 or stats["skipped"]:
            event = run.metrics.write(state.step, state.epoch, "train", samples_per_s=rate,
                                      bad_steps=state.bad_total,
                                      overflow_steps=state.overflow_steps,
                                      data_errors=_data_errors(run, loader.errors), **stats)
            run.tracker.log({f"train/{k}": v for k, v in event.items() if k != "split"},
                            step=state.step)
        if stats["skipped"] and not stats["overflow"]:
            _bad_step(run)
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(run)
        if any_rank(run.session.stop_requested, acc) or _done(run):
            run.session.stop_requested = True
            return
    state.epoch += 1
    state.batch_in_epoch = 0


def _count(state: TrainState, i: int, stats: dict) -> None:
    """Advance the state past batch `i`. An fp16 overflow (the grad scaler skipped the update
    and lowered its scale) is routine and counted apart; other skipped steps are bad steps."""
    state.step += 1
    state.batch_in_epoch = i + 1
    if stats["overflow"]:
        state.overflow_steps += 1
    else:
        state.bad_in_row = state.bad_in_row + 1 if stats["skipped"] else 0
        state.bad_total += int(stats["skipped"])


def _bad_step(run: Run) -> None:
    """Report a skipped update; give up after train.max_bad_steps of them in a row."""
    limit, state = run.cfg.train.max_bad_steps, run.state
    info(f"[yellow]step {state.step}: non-finite loss or gradient, update skipped "
         f"({state.bad_in_row} in a row of at most {limit}; {state.bad_total} in all)[/]")
    if state.bad_in_row >= limit:
        kept = ckpt.latest(run.run_dir / "checkpoints")
        raise TrainingStopped(f"{state.bad_in_row} steps in a row had a non-finite loss or "
                              f"gradient (step {state.step}); the last good checkpoint is kept "
                              f"({kept or 'none written yet'}). Lower train.lr, set "
                              f"train.grad_clip, or try train.mixed_precision=no")


def test_epoch(run: Run) -> dict:
    """The test bound (joint m_iwae with the training K) and, on the main process, pictures."""
    cfg, acc = run.cfg, run.accelerator
    run.wrapped.eval()
    total, count = 0.0, 0
    loader = _loader(run, "test", train=False)
    n = min(len(loader), cfg.train.test_batches or len(loader))
    batches = track(islice(loader, n), f"test bound (K={cfg.objective.K}, {n} batches)", n,
                    enabled=cfg.logging.progress and run.layout.is_main)
    for i, batch in enumerate(batches):
        xs = batch_inputs(batch, run.model.modalities, acc.device)
        with autocast(acc):
            values = test_bound(run.model, xs, cfg.objective.K, cfg.objective.k_chunk,
                                seed=cfg.train.seed + i, present=batch_present(batch, acc.device))
            if i == 0 and run.layout.is_main:
                _save_pictures(run, xs)
        if run.layout.shard_index == 0:  # the P ranks of a particle group share the batch
            total, count = total + float(values.sum()), count + values.shape[0]
    total, count = all_sum([total, float(count)], acc)
    bound = total / max(count, 1)
    run.session.data_errors += loader.errors
    event = run.metrics.write(run.state.step, run.state.epoch, "test", bound=bound, loss=-bound,
                              datapoints=int(count), K=cfg.objective.K,
                              data_errors=_data_errors(run))
    run.tracker.log({"test/bound": bound, "test/data_errors": event["data_errors"]},
                    step=run.state.step)
    run.wrapped.train()
    return event


def eval_epoch(run: Run) -> dict:
    """`train.eval_metrics` of the current model (`mmvae.eval.run.evaluate_model`): every
    process computes its share of the test batches, the numbers are those of one process. Logged
    to metrics.jsonl (split "eval", keys <metric>/<key>) and W&B (eval/<metric>/<key>); metrics
    that do not apply are skipped with one note per run."""
    from mmvae.eval.run import evaluate_model

    acc, history = run.accelerator, run.session.history
    run.wrapped.eval()
    try:
        with autocast(acc):
            results, skipped = evaluate_model(run.model, run.cfg, run.cfg.train.eval_metrics,
                                              run_dir=run.run_dir, device=acc.device,
                                              ranks=run.layout.ranks)
    finally:
        run.wrapped.train()
    if skipped and "eval" not in history:
        info(f"[dim]train.eval_metrics: skipping {'; '.join(skipped)}[/dim]")
    values = {f"{name}/{key}": value for name, result in results.items()
              for key, value in result["values"].items()}
    event = run.metrics.write(run.state.step, run.state.epoch, "eval", **values)
    run.tracker.log({f"eval/{key}": value for key, value in values.items()}, step=run.state.step)
    history["eval"] = event
    return event


def _save_pictures(run: Run, xs) -> None:
    images = run.run_dir / "images"
    tag = f"{run.state.epoch:03d}"
    extras = pictures.picture_resources(run.cfg.data.shards, run.model)  # vocab, feature index
    paths = list(pictures.save_reconstructions(run.model, xs, images / f"recon_{tag}.png",
                                               **extras))
    gen = torch.Generator(device=xs[0].device).manual_seed(run.cfg.train.seed)
    paths += list(pictures.save_prior_samples(run.model, images / f"prior_{tag}.png",
                                              generator=gen, **extras) or [])
    run.tracker.log_images(paths, step=run.state.step)


# --- entry -------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@contextmanager
def _stop_on_signals(session: Session):
    """SIGUSR1 (SLURM's warning before the time limit or a preemption) and SIGTERM: finish the
    step, checkpoint, stop. launch/train.py holds SIGUSR1 blocked from start-up, so one that came
    during imports or setup is delivered here, when it can be acted on."""
    def request_stop(signum, frame):
        session.stop_requested = True
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
    run = setup(cfg, resume)
    finished = False
    try:
        with _stop_on_signals(run.session):
            status = _train(run)
        finished = True
    finally:
        run.tracker.finish()
        release(run.accelerator, finished=finished)
    return run.run_dir, status


def _train(run: Run) -> str:
    cfg, layout, state, history = run.cfg, run.layout, run.state, run.session.history
    steps_per_epoch = len(_loader(run, "train", train=True))
    total = cfg.train.epochs * steps_per_epoch
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    info(f"[bold]mmvae[/] {cfg.model.name} · {cfg.objective.name} K={cfg.objective.K}"
         f" · {layout.world} process(es), P={layout.particle_shards} · run {run.run_dir}")
    progress = TrainProgress(cfg.logging.progress and layout.is_main, total, start=state.step)
    t0, step0 = time.perf_counter(), state.step
    try:
        while state.epoch < cfg.train.epochs and not run.session.stop_requested:
            epoch = state.epoch
            train_epoch(run, progress)
            if state.epoch > epoch and cfg.train.test_every and state.epoch % cfg.train.test_every == 0:
                history["test"] = test_epoch(run)
            if state.epoch > epoch and cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0:
                eval_epoch(run)
            save_checkpoint(run)
    finally:
        progress.close()
    status = "stopped" if run.session.stop_requested and not _done(run) else "done"
    if status == "done":
        _finish(run, time.perf_counter() - t0, state.step - step0)
    return status


def _finish(run: Run, seconds: float, steps: int) -> None:
    cfg, state, session = run.cfg, run.state, run.session
    if cfg.train.test_every and session.history.get("test", {}).get("step") != state.step:
        session.history["test"] = test_epoch(run)
    if cfg.train.eval_every and session.history.get("eval", {}).get("step") != state.step:
        eval_epoch(run)
    _fp32_masters(run)
    data_errors = _data_errors(run)
    if run.layout.is_main:
        save_model(run.model, run.run_dir / "model")
        samples = steps * cfg.data.batch_size * run.layout.dp_size
        summary = {"step": state.step, "epoch": state.epoch, "bad_steps": state.bad_total,
                   "overflow_steps": state.overflow_steps, "data_errors": data_errors,
                   "checkpoint_failures": session.checkpoint_failures,
                   "train_seconds": round(seconds, 2),
                   "samples_per_s": round(samples / max(seconds, 1e-9), 2),
                   "test": session.history.get("test"), "eval": session.history.get("eval")}
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    run.accelerator.wait_for_everyone()


def _fp32_masters(run: Run) -> None:
    """Under DeepSpeed with bf16/fp16 the module holds low-precision copies of the parameters and
    the fp32 masters live in the optimizer (sharded under ZeRO): put those into the model before
    it is saved as the run's model. Every rank takes part (the shards are gathered)."""
    acc = run.accelerator
    if acc.state.deepspeed_plugin is None or str(acc.mixed_precision) not in ("bf16", "fp16"):
        return
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {name: safe_get_full_fp32_param(p) for name, p in run.model.named_parameters()}
    run.model.float()
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if masters[name] is not None:
                p.copy_(masters[name])
