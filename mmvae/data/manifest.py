"""Reading ``manifest.json`` and checking that it is one: every field present and typed, every
shard entry a plain ``{split}-NNNNNN.tar`` name inside the folder (DESIGN.md, Data boundary).

:func:`manifest_problems` lists every problem, one line each (``python -m mmvae.data verify``
prints them all); :func:`read_manifest` raises a :class:`ShardsError` with the first one.
"""
from __future__ import annotations

import json
import re

from mmvae.data.errors import ShardsError, ShardsNotFound
from mmvae.data.store import open_store, plain_name

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mmvae-shards/1"
SHARD_PATTERN = "{split}-{index:06d}.tar"
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*")
SHA256 = re.compile(r"[0-9a-f]{64}")
BUILD_HINT = ("build the shards first: `python launch/shard_demo.py --dataset digits --out DIR`, "
              "`python launch/shard_mnist_svhn.py ...` or `python launch/shard_cub.py ...`")
REBUILD = f"fix or rebuild it; {BUILD_HINT}"
# Image encodings a manifest's spec may name (``spec[key]["encoding"]``): Pillow's formats by
# extension, and raw uint8 .npy (mmvae.data.samples.IMAGE_ENCODINGS are what recipes write).
READABLE_ENCODINGS = ("png", "jpg", "jpeg", "ppm", "pgm", "pbm", "bmp", "webp", "tif", "tiff", "npy")


def shard_name_ok(split: str, name) -> bool:
    """The names the writer gives: ``{split}-NNNNNN.tar``."""
    return plain_name(name) and re.fullmatch(re.escape(split) + r"-\d{6}\.tar", name) is not None


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _entry_problems(split: str, i: int, entry) -> list[str]:
    where = f"split {split!r} shard {i}"
    if not isinstance(entry, dict):
        return [f"{where} is not an object with file, count, sha256, bytes"]
    missing = [k for k in ("file", "count", "sha256", "bytes") if k not in entry]
    if missing:
        return [f"{where} lacks {', '.join(missing)}"]
    problems = []
    if not shard_name_ok(split, entry["file"]):
        problems.append(f"{where} file {entry['file']!r} is not a shard name ({split}-NNNNNN.tar "
                        f"inside the folder): refused")
    if not _is_count(entry["count"]) or not _is_count(entry["bytes"]):
        problems.append(f"{where} ({entry['file']!r}): count and bytes must be non-negative integers")
    if not isinstance(entry["sha256"], str) or not SHA256.fullmatch(entry["sha256"]):
        problems.append(f"{where} ({entry['file']!r}): sha256 is not 64 hex digits")
    return problems


def _split_problems(split, info) -> list[str]:
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        return [f"split name {split!r} is not a plain name (letters, digits, _)"]
    if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
        return [f"split {split!r} has no list of shards"]
    problems = [p for i, entry in enumerate(info["shards"]) for p in _entry_problems(split, i, entry)]
    files = [e.get("file") for e in info["shards"] if isinstance(e, dict)]
    dups = sorted({f for f in files if isinstance(f, str) and files.count(f) > 1})
    if dups:
        problems.append(f"split {split!r} lists {', '.join(dups)} more than once")
    return problems


def manifest_problems(manifest) -> list[str]:
    """Every structural problem of a parsed manifest, one line each (empty: usable)."""
    if not isinstance(manifest, dict):
        return [f"is a JSON {type(manifest).__name__}, not an object"]
    missing = [k for k in ("dataset", "params", "splits") if k not in manifest]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        return [f"splits must be a non-empty object of split -> shards, got {json.dumps(splits)[:40]}"]
    problems = [p for split, info in splits.items() for p in _split_problems(split, info)]
    extras = manifest.get("extra_files") or {}
    if not isinstance(extras, dict):
        problems.append("extra_files is not an object of name -> {sha256, bytes}")
        extras = {}
    for name, entry in extras.items():
        if not plain_name(name):
            problems.append(f"extra file {name!r} is not a plain file name inside the folder: refused")
        elif not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            problems.append(f"extra file {name!r} has no sha256")
    keys = manifest.get("sample_keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        problems.append("sample_keys is not a list of file keys")
    if manifest.get("spec") is not None and not isinstance(manifest["spec"], dict):
        problems.append("spec is not an object of file key -> modality spec")
    if manifest.get("missing_modalities") not in (None, True, False):
        problems.append("missing_modalities is not true or false")
    for key, entry in (manifest.get("spec") or {}).items() if isinstance(manifest.get("spec"), dict) else ():
        encoding = entry.get("encoding") if isinstance(entry, dict) else None
        if encoding is not None and encoding not in READABLE_ENCODINGS:
            problems.append(f"spec of {key!r} names image encoding {encoding!r}; this version reads "
                            f"{', '.join(READABLE_ENCODINGS)} (update mmvae or rebuild the shards)")
        elif encoding == "npy" and not str(key).endswith(".npy"):
            problems.append(f"spec of {key!r} says encoding npy but the file is not a .npy")
    return problems


def load_manifest(store) -> tuple[dict | None, list[str]]:
    """(manifest or None, problems). Raises ShardsNotFound when there is no manifest."""
    store.check()
    try:
        raw = store.read_bytes(MANIFEST)
    except OSError as err:
        raise ShardsError(f"cannot read {store.describe(MANIFEST)} ({err}); check data.shards") from None
    if raw is None:
        raise ShardsNotFound(f"no {MANIFEST} in {store.location}: {BUILD_HINT}")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"is not valid JSON ({err})"]
    return manifest, manifest_problems(manifest)


def read_manifest(shards) -> dict:
    """Load ``manifest.json`` of ``shards`` (a folder, an ``http(s)://`` prefix or a store) and
    check it; raises ShardsNotFound (no manifest) or ShardsError (the first problem, one line).
    Both are ConfigErrors, and ShardsNotFound is also a FileNotFoundError."""
    store = open_store(shards) if isinstance(shards, (str, bytes)) or hasattr(shards, "__fspath__") else shards
    manifest, problems = load_manifest(store)
    if problems:
        more = f" (and {len(problems) - 1} more: `python -m mmvae.data verify {store.location}`)" \
            if len(problems) > 1 else ""
        raise ShardsError(f"{store.describe(MANIFEST)} {problems[0]}{more}; {REBUILD}")
    return manifest
