"""Console, progress bars, the metrics file and the W&B tracker; rank-aware (only the main
process writes).

`info(...)` prints on the main process only, so no caller checks its rank to print.
`metrics.jsonl` holds one JSON object per logged event: {"step", "epoch", "split", ...values}.
W&B is reached through the trainer's Accelerator (`start_trackers`, `Tracker`): a tracker
failure warns once and never stops a run.

Progress: `track(iterable, description, total)` shows a phase (test bound, evaluation metrics,
pictures, classifier training) with its count, elapsed time and eta. On a terminal it is a rich
bar, a task of the bar already on screen if there is one (`Board`: rich shows one live display
at a time); elsewhere (a pipe, a cluster's log file) it is a plain line every
`LINE_EVERY_S` seconds, and the console never wraps or cuts a line.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

LINE_EVERY_S = 30.0
"""Seconds between two progress lines when the console is not a terminal."""


def make_console(stderr: bool = True) -> Console:
    """A rich console; when it is not a terminal (piped, redirected to a job log) lines are kept
    whole: rich would otherwise wrap them at 80 columns, which breaks scripts reading the last
    line and cluster logs."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=100_000)


console = make_console()


def is_main_process() -> bool:
    """Rank 0 of the launch: the process group's rank once one is up (accelerate starts it), else
    the launcher's RANK variable (before the Accelerator, or one process: main). torch is only
    asked when something already imported it (no process group without it), so the light
    modules that log stay free of torch."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def info(*objects, **kwargs) -> None:
    """`console.print` on the main process; nothing on the others (one line per run, not one
    per rank)."""
    if is_main_process():
        console.print(*objects, **kwargs)


_BOARDS: list["Board"] = []  # the live progress displays, innermost last


def _columns(*extra: ProgressColumn) -> list[ProgressColumn]:
    return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]


class Board(Progress):
    """A rich Progress that phases started while it is live (`track`) join as tasks."""

    def __init__(self, *columns: ProgressColumn, transient: bool = True):
        super().__init__(*(columns or _columns()), console=console, transient=transient,
                         refresh_per_second=2)

    def start(self) -> None:
        super().start()
        _BOARDS.append(self)

    def stop(self) -> None:
        if self in _BOARDS:
            _BOARDS.remove(self)
        super().stop()


def track(iterable: Iterable, description: str, total: int | None = None,
          enabled: bool = True):
    """Yield from `iterable`, showing `description`, the count (of `total`), elapsed and eta.

    Shown when `enabled` or when a `Board` is live (the caller's progress is on: a phase inside
    it shows too); a no-op otherwise."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    board = _BOARDS[-1] if _BOARDS else None
    if board is None and not enabled:
        yield from iterable
    elif not console.is_terminal:
        yield from _lines(iterable, description, total)
    elif board is not None:
        task = board.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                board.advance(task)
        finally:
            board.remove_task(task)
    else:
        with Board() as own:
            yield from track(iterable, description, total)
            own.refresh()


def _lines(iterable: Iterable, description: str, total: int | None):
    """Progress as plain lines (not a terminal): at the start, every LINE_EVERY_S, at the end."""
    of = f"/{total}" if total else ""
    console.print(f"{description}: 0{of}")
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= LINE_EVERY_S and not (total and done >= total):  # the end says it
            last, elapsed = now, now - start
            eta = (f", eta {_clock(elapsed / done * (total - done))}"
                   if total and done < total else "")
            console.print(f"{description}: {done}{of}, {_clock(elapsed)} elapsed{eta}")
    console.print(f"{description}: {done}{of} in {_clock(time.perf_counter() - start)}")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the event readable
    return value


class MetricsLog:
    """Appends events to RUN_DIR/metrics.jsonl (main process only; others hold `path=None`)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, step: int, epoch: int, split: str, **values) -> dict:
        event = {"step": step, "epoch": epoch, "split": split,
                 **{k: _clean(v) for k, v in values.items()}}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
        return event


def progress_bar(enabled: bool) -> Progress:
    """A standalone rich bar (with ETA) on stderr for the shard builders, whose tasks advance
    by more than one item at a time (`track` counts items); a no-op when disabled. It stays
    on screen when done (one build, one line per split)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


class _TrainFields(ProgressColumn):
    """loss, bound and samples/s of the training task (blank for the other phases' tasks)."""

    def render(self, task) -> Text:
        if "loss" not in task.fields:
            return Text("")
        f = task.fields
        return Text(f"loss {f['loss']:.2f}  bound {f['bound']:.2f}  {f['rate']:.0f} samples/s")


class TrainProgress:
    """A rich progress bar with loss, bound, samples/s and ETA; a no-op when disabled. Phases
    that run between training steps (test bound, pictures, metrics) show as tasks under it."""

    def __init__(self, enabled: bool, total: int, start: int = 0):
        self.enabled = enabled
        self._t0, self._n = time.perf_counter(), 0
        if not enabled:
            return
        self.progress = Board(*_columns(_TrainFields()), transient=False)
        self.task = self.progress.add_task("train", total=total, completed=start, loss=math.nan,
                                           bound=math.nan, rate=0.0)
        self.progress.start()

    def update(self, samples: int, loss: float, bound: float) -> float:
        """Advance one step; returns samples/s since the bar started."""
        self._n += samples
        rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
        if self.enabled:
            self.progress.update(self.task, advance=1, loss=loss, bound=bound, rate=rate)
        return rate

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


def wandb_mode(requested: str, warn: bool = True) -> str:
    """online without credentials falls back to offline with one warning (no network here)."""
    if requested != "online":
        return requested
    has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
    if not has_key:
        if warn:
            warnings.warn("logging.wandb=online but no W&B credentials: logging offline "
                          "(upload later with `wandb sync`)", stacklevel=2)
        return "offline"
    return requested


class Tracker:
    """The Accelerator's W&B tracker (any object with accelerate's `log`, `get_tracker`,
    `trackers` and `is_main_process`) behind a guard: a tracker call that raises mid-run (server
    gone, wandb process died) warns once and logging to W&B stops; training goes on, and
    RUN_DIR/metrics.jsonl still gets every event."""

    def __init__(self, accelerator, enabled: bool):
        self.accelerator, self.enabled = accelerator, enabled

    def log(self, values: dict, step: int) -> None:
        self._guard(lambda: self.accelerator.log(values, step=step))

    def log_images(self, paths, step: int) -> None:
        """PNGs as W&B images and caption tables (``*_captions.json``, written by
        `mmvae.eval.pictures`) as W&B tables: recon_003.png -> images/recon,
        prior_003_svhn.png -> images/prior_svhn, recon_003_captions.json -> captions/recon."""
        def log():
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            key = lambda p: re.sub(r"_\d{3}", "", Path(p).stem, count=1)  # noqa: E731
            values = {"images/" + key(p): wandb.Image(str(p)) for p in paths if str(p).endswith(".png")}
            for p in (p for p in paths if str(p).endswith("_captions.json")):
                table = json.loads(Path(p).read_text())
                values["captions/" + key(p).removesuffix("_captions")] = wandb.Table(
                    columns=table["columns"], data=table["data"])
            run.log(values, step=step)
        self._guard(log)

    def finish(self) -> None:
        """Close the W&B run (guarded); `release` then ends the Accelerator without them."""
        trackers, self.accelerator.trackers = self.accelerator.trackers, []
        self._guard(lambda: [tracker.finish() for tracker in trackers])

    def _guard(self, call) -> None:
        if not (self.enabled and self.accelerator.is_main_process):
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any tracker failure must not stop training
            self.enabled = False
            warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); continuing "
                          f"without it (metrics.jsonl has every event)", stacklevel=3)


def start_trackers(accelerator, logging, config: dict, run_dir: Path, run_id: str) -> Tracker:
    """Start W&B through the Accelerator for the `logging` section of a config (`wandb`:
    disabled / offline / online, `project`); `config` (a plain dict) is stored with the run."""
    if logging.wandb == "disabled":
        return Tracker(accelerator, enabled=False)
    mode = wandb_mode(logging.wandb, warn=accelerator.is_main_process)
    kwargs = {"wandb": {"dir": str(run_dir), "mode": mode, "id": run_id, "resume": "allow",
                        "name": run_dir.name}}
    try:
        accelerator.init_trackers(logging.project, config=config, init_kwargs=kwargs)
    except Exception as err:  # an unreachable server must not stop training
        if mode == "offline":
            raise
        warnings.warn(f"W&B init failed ({err}); logging offline", stacklevel=2)
        kwargs["wandb"]["mode"] = "offline"
        accelerator.init_trackers(logging.project, config=config, init_kwargs=kwargs)
    return Tracker(accelerator, enabled=True)
