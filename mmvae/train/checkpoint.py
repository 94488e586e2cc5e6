"""Checkpoint folders: written by `accelerator.save_state`, committed atomically, checked before
they are resumed.

Layout: RUN_DIR/checkpoints/<step>/ holds what `accelerator.save_state` writes -- the model
(`pytorch_model.bin`), the optimizer (`optimizer.bin`), the fp16 grad scaler (`scaler.pt`), every
rank's generators (`random_states_<rank>.pkl`) and the registered `TrainState`
(`custom_checkpoint_0.pkl`); under DeepSpeed the engine's own per-rank shards of model and
optimizer (`pytorch_model/`) instead of the first two -- and `meta.json`, written last, which
lists every file with its size. RUN_DIR/checkpoints/latest names the newest.

A checkpoint is written into `.tmp-<step>/`, then renamed and `latest` replaced atomically; a
crash mid-write leaves the previous checkpoints intact. Saving a step that already has a
checkpoint (end of epoch after a periodic save) moves the old one to `.old-<step>/` first, which
stays usable if a crash comes between the two renames. A checkpoint is *usable* when meta.json
reads and every file it lists is there with its size (`problem`); `newest_usable` skips the
others, newest first, and says why.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"
META = "meta.json"
MODEL_FILE = "pytorch_model.bin"  # accelerate's name without safetensors (see loop.save_checkpoint)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-{step:09d}"


def write_meta(path: Path, meta: dict) -> None:
    """Main process, after every rank has written its files into `path`: meta.json with the list
    of files and sizes that makes the checkpoint checkable."""
    files = {str(p.relative_to(path)): p.stat().st_size
             for p in sorted(path.rglob("*")) if p.is_file() and p.name != META}
    _atomic_write_text(path / META, json.dumps({**meta, "files": files}, indent=2))


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def discard(ckpt_root: Path, step: int) -> None:
    """Drop a temporary checkpoint (a failed write, or the leftovers of a crashed one)."""
    shutil.rmtree(tmp_dir(ckpt_root, step), ignore_errors=True)


def commit(ckpt_root: Path, step: int, keep_last: int) -> Path:
    """Main process, after every rank wrote: rename into place, point `latest`, prune."""
    final = ckpt_root / f"{step:09d}"
    if final.exists():  # it may be the newest usable one: keep a copy until the new one is in place
        shutil.rmtree(_aside(final), ignore_errors=True)
        os.replace(final, _aside(final))
    os.replace(tmp_dir(ckpt_root, step), final)
    _atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    done = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in [p for p in done[:-keep_last] if p != final]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*ckpt_root.glob(".tmp-*"), *ckpt_root.glob(".old-*")]:  # from crashed writes
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


def problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed, or None when it can."""
    if not path.is_dir():
        return "not a folder"
    if not (path / META).is_file():
        if (path / "state.pt").is_file():
            return "written by an older mmvae (state.pt); resume it with that version"
        return f"{META} missing (the write did not finish)"
    try:
        files = read_meta(path).get("files")
    except (OSError, ValueError) as err:
        return f"{META} unreadable ({type(err).__name__})"
    if not isinstance(files, dict):
        return f"{META} lists no files (written by an older mmvae)"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != size:
            return f"{name} truncated ({file.stat().st_size} of {size} bytes)"
    return None


def candidates(ckpt_root: Path) -> list[Path]:
    """Every checkpoint folder (committed or set aside), newest step first; the committed one
    first for equal steps. Temporary folders are never candidates."""
    found = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            name = p.name.removeprefix(".old-")
            if p.is_dir() and name.isdigit():
                found.append((int(name), p.name == name, p))
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def newest_usable(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest usable checkpoint or None, [(newer checkpoint skipped, why)])."""
    skipped = []
    for path in candidates(ckpt_root):
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def latest(ckpt_root: Path) -> Path | None:
    """The checkpoint a resume would take."""
    return newest_usable(ckpt_root)[0]


def model_state(path: Path) -> dict:
    """The model's parameters in a checkpoint written without DeepSpeed (keys of the trained
    module, e.g. `model.enc.0.weight`); for tools and tests."""
    return torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
