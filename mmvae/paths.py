"""Checks on folders an entry point is about to write, made before anything is written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable(folder: str | Path) -> str | None:
    """Why `folder` (existing or not) cannot be created and written into, or None if it can.

    Probes by creating and removing an empty folder in its nearest existing ancestor: permission
    bits do not tell (root passes `os.access` everywhere, yet /proc or a read-only mount refuse a
    new folder, and free space there reads 0)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        probe = tempfile.mkdtemp(prefix=".mmvae-probe-", dir=existing)
    except OSError as err:
        return f"{existing} does not allow new files ({err.strerror or err})"
    os.rmdir(probe)
    return None
