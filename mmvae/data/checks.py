"""Checking a shards folder before anything runs, and ``verify`` (every problem, one line each).

:func:`check_shards` is what the trainer, ``launch/evaluate.py`` and the loader's users call at
start: the manifest is valid (plain shard names only), the needed splits exist and are not
empty, every listed shard exists (all: ShardsError, exit 2, nothing written) and has the size
the manifest records (``data.verify=size``, one stat per shard) or its sha256
(``data.verify=sha256``, reads everything; the time is reported). A size or hash mismatch is a
ShardsError under ``on_error=raise``; under ``skip`` it is a warning naming the shard, and the
samples it loses are counted while streaming.
"""
from __future__ import annotations

import hashlib
import logging
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from mmvae.data.errors import ShardsError, ShardsNotFound, one_line
from mmvae.data.manifest import MANIFEST, REBUILD, load_manifest, read_manifest
from mmvae.data.store import open_store
from mmvae.data.presence import manifest_allows_missing

log = logging.getLogger(__name__)

VERIFY = ("size", "sha256")


@dataclass
class ShardCheck:
    """What :func:`check_shards` found: the manifest, the problems it let pass (``skip``), and
    for sha256 how many bytes were hashed in how long."""

    location: str
    manifest: dict
    verify: str
    warnings: list[str] = field(default_factory=list)
    hashed_bytes: int = 0
    seconds: float = 0.0

    def timing(self) -> str:
        mb = self.hashed_bytes / 1e6
        rate = f" ({self.seconds / mb * 1e3:.1f} s/GB)" if mb >= 10 else ""
        return f"sha256 of {self.location}: {mb:.1f} MB checked in {self.seconds:.2f} s{rate}"


def hash_stream(stream, chunk: int = 1 << 20) -> tuple[str, int]:
    digest, n = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(chunk), b""):
        digest.update(block)
        n += len(block)
    return digest.hexdigest(), n


def _split_entries(manifest: dict, split: str, location: str) -> list[dict]:
    splits = manifest["splits"]
    if split not in splits:
        raise ShardsError(f"split {split!r} is not in {location}/{MANIFEST} (it has "
                          f"{', '.join(splits)}); rebuild the shards with that split")
    entries = splits[split]["shards"]
    if not entries or not sum(e["count"] for e in entries):
        raise ShardsError(f"split {split!r} of {location} is empty (no shards or no samples); "
                          f"rebuild the shards")
    return entries


def check_shards(shards, splits: Sequence[str] = ("train",), *, verify: str = "size",
                 on_error: str = "skip") -> ShardCheck:
    """Check ``splits`` of the shards at ``shards`` (folder or ``http(s)://`` prefix) against
    their manifest. Raises ShardsError / ShardsNotFound (one line naming the problem and the
    fix) for anything that stops a run; see the module docstring."""
    if verify not in VERIFY:
        raise ShardsError(f"data.verify={verify!r}; choose one of {', '.join(VERIFY)}")
    store = open_store(shards)
    manifest = read_manifest(store)
    report = ShardCheck(store.location, manifest, verify)
    entries = [e for split in dict.fromkeys(splits) for e in _split_entries(manifest, split, store.location)]
    sizes = {}
    for entry in entries:
        try:
            sizes[entry["file"]] = store.size(entry["file"])
        except OSError as err:
            raise ShardsError(f"cannot read {store.describe(entry['file'])} ({one_line(err)}); "
                              f"check the folder's permissions or the URL") from None
    missing = [name for name, size in sizes.items() if size is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ShardsNotFound(f"shard {store.describe(missing[0])}{more} listed in {MANIFEST} is "
                             f"missing; {REBUILD.split(';')[0]} or copy the missing shards back")
    start = time.perf_counter()
    for entry in entries:
        problem = _size_or_hash_problem(store, entry, sizes[entry["file"]], verify, report)
        if problem and on_error == "raise":
            raise ShardsError(f"{problem} (data.on_error=raise); rebuild or re-copy the shard, "
                              f"or set data.on_error=skip to count what it loses")
        if problem:
            report.warnings.append(problem)
            log.warning("%s: its lost samples are counted as data errors", problem)
    report.seconds = time.perf_counter() - start if verify == "sha256" else 0.0
    return report


def _size_or_hash_problem(store, entry: dict, size: int, verify: str, report: ShardCheck) -> str | None:
    name = store.describe(entry["file"])
    if size != entry["bytes"]:
        return f"shard {name} is {size} bytes, the manifest says {entry['bytes']}"
    if verify != "sha256":
        return None
    with store.open(entry["file"]) as stream:
        digest, n = hash_stream(stream)
    report.hashed_bytes += n
    if digest != entry["sha256"]:
        return f"shard {name} has sha256 {digest[:12]}…, the manifest says {entry['sha256'][:12]}…"
    return None


# ----------------------------------------------------------------------------- verify
class _HashingReader:
    """Read-through wrapper: hash every byte tarfile reads, so checking sha256 and counting
    samples take one pass over the shard."""

    def __init__(self, raw):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass


def _count_samples(reader: _HashingReader) -> int:
    """Samples in a WebDataset tar: runs of consecutive members sharing a key. (tarfile
    stops quietly at a bad header after the first: the count then falls short.)"""
    count, last = 0, None
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name = member.name.rsplit("/", 1)
            key = (name[0] + "/" if len(name) == 2 else "") + name[-1].split(".", 1)[0]
            if key != last:
                count, last = count + 1, key
    return count


def check_shard(store, name: str, expected_sha256: str, expected_count: int | None,
                expected_bytes: int | None = None) -> dict:
    """Check one shard (or side file when ``expected_count`` is None) by reading it whole;
    returns ``{"file", "ok", "problem", "problems", "count"}`` (``problem``: all of them, joined)."""
    result = {"file": name, "ok": False, "problem": None, "problems": [], "count": None}
    problems = result["problems"]
    try:
        size = store.size(name)
        if size is None:
            problems.append("missing")
        else:
            if expected_bytes is not None and size != expected_bytes:
                problems.append(f"{size} bytes, manifest says {expected_bytes}")
            with store.open(name) as raw:
                reader = _HashingReader(raw)
                try:
                    if expected_count is not None:
                        result["count"] = _count_samples(reader)
                except tarfile.TarError as exc:
                    problems.append(f"unreadable tar ({one_line(exc)})")
                reader.drain()
            digest = reader.sha256.hexdigest()
            if digest != expected_sha256:
                problems.append(f"sha256 mismatch (manifest {expected_sha256[:12]}…, file {digest[:12]}…)")
            if expected_count is not None and result["count"] is not None and result["count"] != expected_count:
                problems.append(f"{result['count']} samples, manifest says {expected_count}")
    except OSError as exc:
        problems.append(f"unreadable ({one_line(exc)})")
    result["ok"] = not problems
    result["problem"] = "; ".join(problems) or None
    return result


def verify_shards(shards) -> Iterator[tuple[str, dict, dict]]:
    """Yield ``(split, manifest_entry, check_result)`` for every shard and extra file (split
    ``"extra"`` for side files), reading each whole: sha256, size and sample count. Raises
    ShardsError (first problem) for an invalid manifest; :func:`verify_problems` lists all."""
    store = open_store(shards)
    manifest = read_manifest(store)
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            yield split, shard, check_shard(store, shard["file"], shard["sha256"], shard["count"],
                                            shard["bytes"])
    for name, entry in (manifest.get("extra_files") or {}).items():
        yield "extra", {"file": name, **entry}, check_shard(store, name, entry["sha256"], None,
                                                            entry.get("bytes"))


def manifest_report(shards) -> tuple[dict | None, list[str]]:
    """(manifest if usable, every manifest problem as a line); raises ShardsError when there
    is no manifest or no readable folder."""
    store = open_store(shards)
    manifest, problems = load_manifest(store)
    where = store.describe(MANIFEST)
    lines = [f"{where} {p}" for p in problems]
    return (None if problems else manifest), lines


def _missing_modalities(missing: list[str], required: set[str]) -> list[str]:
    """Of a sample's missing keys under `missing_modalities`, those that are a problem: the
    label, or every modality at once."""
    modalities = {k for k in required if not k.startswith("label.")}
    problems = [k for k in missing if k not in modalities]
    return problems or (sorted(modalities) if modalities <= set(missing) else [])


def sample_problems(shards, splits: Sequence[str] | None = None) -> Iterator[str]:
    """Decode every sample of ``splits`` (default: all) and check it against the manifest's
    modality spec (``verify --samples``): one line per bad sample, naming shard, key and
    reason. Reads and decodes everything: minutes for millions of samples."""
    from mmvae.data.samples import check_value, decode_value, image_encoding  # numpy + Pillow, no torch

    store = open_store(shards)
    manifest = read_manifest(store)
    spec = manifest.get("spec") or {}
    required = set(manifest.get("sample_keys") or ())
    allows_missing = manifest_allows_missing(manifest)
    for split in splits or list(manifest["splits"]):
        for entry in _split_entries(manifest, split, store.location):
            shard = store.describe(entry["file"])
            try:
                with store.open(entry["file"]) as stream:
                    for key, files in _tar_samples(stream):
                        missing = sorted(required - set(files))
                        if missing and allows_missing:  # a modality may be absent, not all
                            missing = _missing_modalities(missing, required)
                        if missing:
                            yield f"shard {shard}, sample {key}: missing {', '.join(missing)}"
                            continue
                        for name, data in files.items():
                            try:
                                kind, value = decode_value(name.partition(".")[2], data,
                                                           image_encoding(name, spec.get(name)))
                                why = check_value(name, kind, value, spec.get(name))
                            except Exception as exn:  # noqa: BLE001 - report, go on
                                why = f"cannot decode {name} ({type(exn).__name__}: {one_line(exn)})"
                            if why:
                                yield f"shard {shard}, sample {key}: {why}"
                                break
            except (OSError, tarfile.TarError) as exn:
                yield f"shard {shard}: unreadable ({one_line(exn)})"


def _tar_samples(stream) -> Iterator[tuple[str, dict]]:
    """(key, {file key: bytes}) per sample of a tar stream."""
    key, files = None, {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            stem, _, name = member.name.rpartition("/")[2].partition(".")
            if key is not None and stem != key:
                yield key, files
                files = {}
            key = stem
            files[name.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, files
