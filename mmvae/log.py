"""Console, progress bar and the metrics file; rank-aware (only the main process writes).

`metrics.jsonl` holds one JSON object per logged event: {"step", "epoch", "split", ...values}.
Trackers (W&B) are reached through the Accelerator by the trainer; this module only formats.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


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


class TrainProgress:
    """A rich progress bar with loss, bound, samples/s and ETA; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int = 0):
        self.enabled = enabled
        self._t0, self._n = time.perf_counter(), 0
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.2f}  bound {task.fields[bound]:.2f}  "
                       "{task.fields[rate]:.0f} samples/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, refresh_per_second=2)
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
