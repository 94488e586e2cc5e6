"""Checkpoints that hold all state and never leave a corrupt `latest`.

Layout: RUN_DIR/checkpoints/<step>/{state.pt, rng-<rank>.pt, meta.json} and the text file
RUN_DIR/checkpoints/latest naming the newest. A checkpoint is written into `.tmp-<step>/`
(every rank adds its own RNG file), then renamed and `latest` replaced atomically; a crash
mid-write leaves the previous checkpoint and `latest` intact. Saving a step that already has a
checkpoint (end of epoch after a periodic save) moves the old one to `.old-<step>/` first, and
`latest()` falls back to it if a crash comes between the two renames. Everything loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's global generators (torch, CUDA, Python, NumPy) as weights_only-loadable
    tensors and lists. Particle noise and data order do not use them (they are functions of the
    seed and step), but anything else that draws does."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": [version, list(py_state), gauss],
             "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss,
                       np_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tmp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-{step:09d}"


def write_rank_files(ckpt_root: Path, step: int, rank: int) -> None:
    """Every rank: its RNG state into the temporary checkpoint folder."""
    path = tmp_dir(ckpt_root, step)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng-{rank}.pt")


def write_main_files(ckpt_root: Path, step: int, state: dict, meta: dict) -> None:
    """Main process: model/optimizer/scaler state and meta into the temporary folder."""
    path = tmp_dir(ckpt_root, step)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "state.pt")
    (path / "meta.json").write_text(json.dumps(meta, indent=2))


def discard(ckpt_root: Path, step: int) -> None:
    """Drop a temporary checkpoint whose write failed (the committed ones stay)."""
    shutil.rmtree(tmp_dir(ckpt_root, step), ignore_errors=True)


def commit(ckpt_root: Path, step: int, keep_last: int) -> Path:
    """Main process, after every rank wrote: rename into place, point `latest`, prune."""
    final = ckpt_root / f"{step:09d}"
    if final.exists():  # `latest` may name it: keep a complete copy until the new one is in place
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


def is_complete(path: Path) -> bool:
    return (path / "state.pt").is_file() and (path / "meta.json").is_file()


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    for candidate in (path, _aside(path)):
        if is_complete(candidate):
            return candidate
    return None


def load(path: Path, rank: int, map_location="cpu") -> tuple[dict, dict, dict | None]:
    """(state, meta, this rank's RNG state or None)."""
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state, meta, rng
