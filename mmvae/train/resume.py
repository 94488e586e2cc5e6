"""Which checkpoint a run continues from, and the guards that keep a run from starting over by
accident: `--resume auto` takes the newest usable checkpoint and says which newer ones it skipped;
a folder that has checkpoints but none usable, `--resume PATH` with another `run.dir`, and a
fresh run into a folder that has checkpoints are one-line errors (ConfigError); a fresh run keeps
an existing metrics.jsonl aside instead of overwriting it.
"""
from __future__ import annotations

from pathlib import Path

from mmvae.config import Config, ConfigError
from mmvae.log import console
from mmvae.train import checkpoint as ckpt


def find(cfg: Config, resume: str | None, say: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh); `say`: print the warning (one
    process of many)."""
    if not resume:
        if cfg.run.dir and ckpt.candidates(Path(cfg.run.dir) / "checkpoints"):
            raise ConfigError(f"run folder {cfg.run.dir} already has checkpoints: continue it with "
                              f"--resume auto, or set another run.dir")
        return None
    if resume == "auto":
        root = _auto_root(cfg)
        return _newest(root, say, "--resume auto") if root is not None else None
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        found = _newest(path / "checkpoints", say, f"--resume {resume}")
        if found is None:
            raise ConfigError(f"--resume {resume}: no checkpoint there (expected a run folder or "
                              f"RUN_DIR/checkpoints/<step>)")
    else:
        if (why := ckpt.problem(path)) is not None:
            raise ConfigError(f"--resume {resume}: not a usable checkpoint ({why}); give a run "
                              f"folder or RUN_DIR/checkpoints/<step>")
        found = path
    run_dir = found.parent.parent
    if cfg.run.dir and Path(cfg.run.dir).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {resume} continues the run in {run_dir}, but run.dir is "
                          f"{cfg.run.dir}; drop the run.dir override (or set it to {run_dir})")
    return found


def _auto_root(cfg: Config) -> Path | None:
    """RUN_DIR/checkpoints of run.dir, or of the newest run of the experiment that has one."""
    if cfg.run.dir:
        return Path(cfg.run.dir) / "checkpoints"
    runs = sorted((Path("runs") / (cfg.run.experiment or cfg.model.name)).glob("*/checkpoints"))
    return next((root for root in reversed(runs) if ckpt.candidates(root)), None)


def _newest(root: Path, say: bool, option: str) -> Path | None:
    found, skipped = ckpt.newest_usable(root)
    reasons = "; ".join(f"{p.name} ({why})" for p, why in skipped)
    if found is None and skipped:
        raise ConfigError(f"{option}: no usable checkpoint in {root}: {reasons}; resume an "
                          f"earlier copy, or set another run.dir to start afresh")
    if skipped and say:
        console.print(f"[yellow]{option}: skipped {reasons}; resuming from {found.name}[/]",
                      soft_wrap=True)
    return found


def keep_old_metrics(path: Path, say: bool) -> None:
    """A fresh run in a folder that holds metrics.jsonl (e.g. a job killed before its first
    checkpoint) moves it to metrics.jsonl.<n> rather than overwrite it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    n = 1
    while (aside := path.with_name(f"{path.name}.{n}")).exists():
        n += 1
    path.rename(aside)
    if say:
        console.print(f"[yellow]{path.parent} has no checkpoint: starting afresh, the earlier "
                      f"metrics.jsonl is kept as {aside.name}[/]", soft_wrap=True)
