"""Writing and checking WebDataset shards and their ``manifest.json`` (DESIGN.md, Shards).

A shard is written to a hidden temporary name and renamed only once it is complete, and the
manifest is written last (also by rename): a folder without ``manifest.json`` is "not built",
and a killed run never leaves a half-written ``{split}-NNNNNN.tar`` that looks complete.
The sha256 of each shard is computed while it is written (no second read).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

# read_manifest, the shard checks and verify_shards live in manifest.py and checks.py; they are
# re-exported here for the code that imported them from the writer.
from mmvae.data.manifest import (BUILD_HINT, MANIFEST, MANIFEST_FORMAT, SHARD_PATTERN,  # noqa: F401
                                 read_manifest)
from mmvae.data.presence import MISSING_FLAG
# Fixed tar metadata so that the same samples always give byte-identical shards.
_TAR_META = dict(user="mmvae", group="mmvae", mode=0o444, mtime=0)  # int: a float adds a pax header per file


class _HashingFile:
    """Write-through file wrapper that hashes every byte on the way (tar streams only write)."""

    def __init__(self, raw):
        self.raw, self.sha256, self.nbytes = raw, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.nbytes += len(data)
        return self.raw.write(data)

    def flush(self):
        self.raw.flush()


class _ShardFile:
    """One shard being written: a TarWriter on ``.{name}.partial``, renamed to ``name`` by
    :meth:`commit`, or deleted by :meth:`abort`."""

    def __init__(self, out_dir: Path, name: str):
        import webdataset as wds

        self.final = out_dir / name
        self.tmp = out_dir / f".{name}.partial"
        self._raw = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._raw)
        self._tar = wds.TarWriter(self._hashing, encoder=False, **_TAR_META)
        self.count = 0

    def write(self, sample: dict) -> None:
        """Append one sample already passed through :func:`_as_bytes`."""
        self._tar.write(sample)
        self.count += 1

    @property
    def nbytes(self) -> int:
        return self._hashing.nbytes

    def commit(self) -> dict:
        self._tar.close()          # writes the end-of-archive blocks (through the hash)
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.final)
        return {"file": self.final.name, "count": self.count,
                "sha256": self._hashing.sha256.hexdigest(), "bytes": self._hashing.nbytes}

    def abort(self) -> None:
        try:
            with contextlib.suppress(Exception):  # close the tar stream now, not in __del__
                self._tar.close()                  # (which would write to a closed file)
            self._raw.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _as_bytes(sample: Mapping[str, Any]) -> dict:
    """Samples hold pre-encoded payloads (bytes); ``str`` and ``int`` (e.g. ``label.cls``) are
    encoded here so that nothing is re-encoded per write."""
    out = {}
    for key, value in sample.items():
        if key.startswith("__"):
            out[key] = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out[key] = bytes(value)
        elif isinstance(value, (str, int)):
            out[key] = str(value).encode("utf-8")
        else:
            raise TypeError(f"sample key {key!r}: expected bytes/str/int, got {type(value).__name__}"
                            " (encode images to PNG bytes once, before writing)")
    if "__key__" not in out:
        raise ValueError("every sample needs a '__key__'")
    return out


def _sample_size(sample: Mapping[str, Any]) -> int:
    """Tar size of an encoded sample: a 512-byte header per file plus its padded payload."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


def _remove_stale(out_dir: Path, split: str, keep: set[str]) -> None:
    """Delete ``{split}-NNNNNN.tar`` files of an earlier, larger build (and temporary files a
    killed build left) so that the folder only holds what the new manifest lists."""
    pattern = re.compile(rf"^\.?{re.escape(split)}-\d{{6}}\.tar(\.partial)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name) and path.name not in keep:
            path.unlink()


def write_shards(samples_iter: Iterable[Mapping[str, Any]], out_dir, split: str, *, total: int,
                 max_bytes: int = 256 * 2**20, max_count: int = 10_000,
                 progress: bool = True) -> list[dict]:
    """Write samples to ``out_dir/{split}-%06d.tar`` shards, each committed atomically.

    A sample is a dict with ``__key__`` and one pre-encoded payload per file, e.g.
    ``{"__key__": "00000042", "mnist.png": b"...", "svhn.png": b"...", "label.cls": 3}``.
    A new shard starts when the current one holds ``max_count`` samples or the next sample
    would push it past ``max_bytes``. Any existing ``manifest.json`` is removed first: the
    folder is "not built" until :func:`write_manifest` runs. If ``samples_iter`` raises (or
    the process is killed), only completed shards remain under their final names.

    Returns:
        one dict per shard: ``{"file", "count", "sha256", "bytes"}`` in shard order.
    """
    if max_count < 1 or max_bytes < 1:
        raise ValueError(f"max_count and max_bytes must be >= 1 (got {max_count}, {max_bytes})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    shards: list[dict] = []
    current: _ShardFile | None = None
    written = 0
    from mmvae.log import progress_bar  # rich loads only when shards are written

    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(f"writing {split} shards", total=total)
            for sample in samples_iter:
                sample = _as_bytes(sample)
                size = _sample_size(sample)
                if current is not None and (current.count >= max_count
                                            or current.nbytes + size > max_bytes):
                    shards.append(current.commit())
                    current = None
                if current is None:
                    current = _ShardFile(out_dir, SHARD_PATTERN.format(split=split, index=len(shards)))
                current.write(sample)
                written += 1
                bar.advance(task)
            if current is not None:
                shards.append(current.commit())
                current = None
    except BaseException:
        if current is not None:
            current.abort()
        raise
    if written != total:
        log.warning("write_shards(%s): wrote %d samples but total=%d was announced", split, written, total)
    _remove_stale(out_dir, split, {s["file"] for s in shards})
    return shards


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Streaming sha256 of a file (constant memory, shards can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _first_sample_spec(out_dir: Path, splits: Mapping[str, list[dict]], npy_images=()) -> dict | None:
    """The modality spec of the first sample of the first non-empty shard (None if none);
    ``npy_images``: the file keys that are raw ``.npy`` images."""
    from mmvae.data.samples import sample_spec

    entry = next((s for shards in splits.values() for s in shards if s["count"]), None)
    if entry is None:
        return None
    sample: dict = {}
    with tarfile.open(out_dir / entry["file"], mode="r|") as tar:
        for member in tar:
            stem, _, key = member.name.partition(".")
            if sample and stem != sample["__key__"]:
                break
            sample["__key__"] = stem
            sample[key] = tar.extractfile(member).read()
    return sample_spec(sample, npy_images)


def write_manifest(out_dir, dataset: str, params: Mapping[str, Any],
                   splits: Mapping[str, list[dict]], extra_files: Iterable[str] = (),
                   *, sample_keys: Iterable[str] | None = None, spec: Mapping | None = None,
                   missing_modalities: bool = False, npy_images: Iterable[str] = ()) -> dict:
    """Write ``out_dir/manifest.json`` (atomically; the folder counts as built after this).

    Args:
        dataset: dataset name, e.g. ``"digits"``.
        params: recipe parameters (seed, pairs per instance, sizes, ...), JSON-serialisable.
        splits: split name -> the list :func:`write_shards` returned.
        extra_files: names (relative to ``out_dir``) of side files such as ``pairs.npz`` or
            ``vocab.json``; their sha256 and size are recorded.
        sample_keys: the file keys of every sample (e.g. ``["label.cls", "mnist.png",
            "svhn.png"]``); the loader uses it to know which keys are required.
        spec: file key -> modality spec (``mmvae.data.samples``); by default read from the
            first sample of the first shard written, so that the loader can check every
            later sample's shape, dtype and caption length against it (with
            ``missing_modalities``, pass it unless the first sample has every modality: it
            also gives the placeholders' shapes). Image entries record their ``encoding``
            (png, jpg, npy), which readers and ``verify`` decode by.
        missing_modalities: samples may omit modality keys (`mmvae.data.presence`); without
            it a missing key is a data error.
        npy_images: file keys (e.g. ``"mnist.npy"``) holding raw uint8 (C, H, W) images
            (``mmvae.data.samples.encode_npy_image``), recorded as images with encoding npy
            rather than as float arrays.
    Returns:
        the manifest as a dict.
    """
    out_dir = Path(out_dir)
    extras = {}
    for name in extra_files:
        path = out_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"extra file {name!r} listed for the manifest does not exist in {out_dir}")
        extras[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "params": dict(params),
        "sample_keys": sorted(sample_keys) if sample_keys is not None else None,
        "splits": {name: {"num_samples": sum(s["count"] for s in shards), "shards": list(shards)}
                   for name, shards in splits.items()},
        "extra_files": extras,
        "spec": dict(spec) if spec is not None else _first_sample_spec(out_dir, splits, frozenset(npy_images)),
    }
    if missing_modalities:
        manifest[MISSING_FLAG] = True
    _atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest
