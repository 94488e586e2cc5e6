"""Checkpoints that hold all state and never leave a corrupt `latest`.

Layout: RUN_DIR/checkpoints/<step>/{state.pt, rng-<rank>.pt, meta.json} and the text file
RUN_DIR/checkpoints/latest naming the newest. A checkpoint is written into `.tmp-<step>/`
(every rank adds its own RNG file), then renamed and `latest` replaced atomically; a crash
mid-write leaves the previous checkpoint and `latest` intact. Everything loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
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


def commit(ckpt_root: Path, step: int, keep_last: int) -> Path:
    """Main process, after every rank wrote: rename into place, point `latest`, prune."""
    final = ckpt_root / f"{step:09d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir(ckpt_root, step), final)
    _atomic_write_text(ckpt_root / LATEST, final.name + "\n")
    done = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load(path: Path, rank: int, map_location="cpu") -> tuple[dict, dict, dict | None]:
    """(state, meta, this rank's RNG state or None)."""
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state, meta, rng
