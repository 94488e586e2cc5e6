"""Streaming WebDataset pipeline: shards -> dict batches of tensors.

The pipeline is a visible list of named stages (see :func:`build_stages`), in the style of
open_clip's ``get_wds_dataset``::

    shards             shard list from manifest.json; shuffled per (seed, epoch, pass)
    split_by_dp_group  every dp_size-th shard, from dp_rank (NOT the global rank: the ranks of
                       one particle group share dp_rank and must see the same batches)
    split_by_worker    every num_workers-th of those, per DataLoader worker
    read               open each listed shard *name* through the store (local folder or
                       http(s) prefix; never webdataset's opener, which runs ``pipe:``
                       names), check its size, tar members -> samples; at the end of the
                       shard, samples short of the manifest's count are counted as lost
    select_keys        keep the requested modalities (key stems, or full keys such as
                       caption.txt); a missing one is a bad sample, unless the manifest
                       allows missing modalities (mmvae.data.presence)
    drop_modalities    (data.drop_modalities > 0) drop modalities, seeded per sample, epoch
    shuffle            seeded sample shuffle buffer (seed, epoch, dp_rank, worker)
    decode             by file extension: images (PNG/JPEG, or .npy with the spec's encoding
                       npy) -> uint8 CHW arrays, .cls -> int, ...;
                       each value checked against the manifest's modality spec (shape,
                       dtype, caption length) and float arrays for NaN/inf
    fill_absent        (modalities may be missing) zero placeholders + the presence row
    repeat_passes      the stages above form one pass over the rank's shards; training repeats
                       passes (reshuffled) until the quota below is met
    batch              collate: stack arrays, gather ints, list the rest
    tensors            numpy -> torch (images stay uint8 until the main process: 4× less to
                       send from workers; ``images_to_float`` makes them float32 in [0, 1])
    take_quota         exactly this worker's share of len(loader) batches (training only)
    count_errors       attach this worker's skipped-sample count to the batch
    report_fatal       a worker's ShardDataError travels to the main process as one line

The shard and sample stages are here; ``decode``, ``batch`` and ``tensors`` (decoding and
collation) are in :mod:`mmvae.data.decode`, and the one error handler in
:mod:`mmvae.data.errors`; this module re-exports their names.

Equal batches on every rank (no DDP hang): with ``drop_last=True`` the shard stream repeats
(reshuffled each pass) and ``take_quota`` stops every rank after exactly
``len(loader) = num_samples // (dp_size * batch_size)`` batches, split over its workers.
With ``drop_last=False`` (evaluation) each rank reads its shards exactly once and may end
with a partial batch; ranks can then differ by a few batches (``loader.batches_per_rank``),
so multi-rank evaluation must either pad to ``max(batches_per_rank)`` or run on dp_size=1.

Nothing is lost without a count. Every sample the manifest lists that is not delivered is a
data error: samples a truncated or corrupt tar never yields (the tar reader may stop quietly
at a bad header: the per-shard count check catches it), a sample with a missing key, one that
does not decode, and one that breaks the modality spec. One handler logs a warning naming the
shard (and the sample and reason, or how many samples the shard lost) and either skips and
counts (``on_error="skip"``) or raises a one-line :class:`ShardDataError` (``"raise"``).
``loader.errors`` is the number of samples lost so far: with workers, each worker counts its
own and sends the count with each batch (and once more after its last), so the total reaches
the main process; samples left unread when a training quota stops a pass are not errors.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

# Decoding and collation (decode.py) and error handling (errors.py) are their own modules; their
# names stay importable from here, where callers and tests have always found them.
from mmvae.data.decode import Decode, ToTensors, collate, images_to_float  # noqa: F401
from mmvae.data.errors import (ErrorCounter, ShardDataError, ShardsError, describe,  # noqa: F401
                               ShardsNotFound, one_line)
from mmvae.data.manifest import MANIFEST, read_manifest
from mmvae.data.presence import DropModalities, FillAbsent, Presence, manifest_allows_missing
from mmvae.data.samples import IMAGE_EXTS, decode_image  # noqa: F401
from mmvae.data.store import open_store
from mmvae.data.tarread import tar_members

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
_TAG_SHARDS, _TAG_BUFFER = 11, 12


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative ints (seed, epoch, rank, worker, tag)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _worker_info() -> tuple[int, int]:
    """(worker id, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class EpochState:
    """Seed and epoch shared by the seeded stages. The loader sets ``epoch``; workers are not
    persistent, so each epoch's workers receive a fresh copy with the current value."""

    seed: int
    epoch: int


# ----------------------------------------------------------------------------- shard stages
class ShardSource:
    """Stage ``shards``: yields ``{"url": name}`` for every shard name of the split, shuffled
    with (seed, epoch, pass) — the same on every rank, so the dp split below is a partition."""

    def __init__(self, files: Sequence[str], state: EpochState, *, shuffle: bool):
        self.files, self.state, self.shuffle = list(files), state, shuffle
        self.pass_index = 0  # set by RepeatPasses

    def order(self, epoch: int, pass_index: int) -> list[str]:
        files = list(self.files)
        if self.shuffle:
            random.Random(mix_seed(self.state.seed, epoch, pass_index, _TAG_SHARDS)).shuffle(files)
        return files

    def __call__(self) -> Iterator[dict]:
        for url in self.order(self.state.epoch, self.pass_index):
            yield {"url": url}


class RepeatPasses:
    """Stage ``repeat_passes``: run the per-pass stages (shards ... decode) up to ``passes``
    times. Each pass is complete (the shuffle buffer drains) before the next starts, so a
    rank reads all of its own shards first and repeats only to fill a short quota; the
    stages after this one stop the stream once the quota is met."""

    def __init__(self, per_pass: wds.DataPipeline, source: ShardSource | None, passes: int):
        self.per_pass, self.source, self.passes = per_pass, source, passes

    def __call__(self) -> Iterator[dict]:
        for pass_index in range(self.passes):
            if self.source is not None:
                self.source.pass_index = pass_index
            yield from self.per_pass


class SplitByDPGroup:
    """Stage ``split_by_dp_group``: every ``dp_size``-th shard starting at ``dp_rank``. Ranks
    are passed explicitly instead of read from RANK/WORLD_SIZE (webdataset's split_by_node),
    because ranks holding different particles of the same batch must read the same shards."""

    def __init__(self, dp_rank: int, dp_size: int):
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, src):
        return islice(src, self.dp_rank, None, self.dp_size)


class ResampleSeed:
    """``worker_seed`` for ``wds.ResampledShards``: distinct per (seed, epoch, dp_rank,
    worker) and reproducible (the default mixes in time and pid)."""

    def __init__(self, state: EpochState, dp_rank: int):
        self.state, self.dp_rank = state, dp_rank

    def __call__(self) -> int:
        return mix_seed(self.state.seed, self.state.epoch, self.dp_rank, _worker_info()[0], _TAG_SHARDS)


class ReadShards:
    """Stage ``read``: for each shard name, open it through the store (closed as soon as it
    has been read, not left to the garbage collector), compare its size with the manifest,
    turn its tar members into samples (the ``tar_reader``'s members, grouped by key here),
    and at the end of the shard check how many samples came out against the manifest's count.

    A tar that ends early (truncated, garbage, a bad header: Python's tarfile may then stop
    without an error; the fast reader names the problem) loses the samples it does not yield;
    they are counted at the end of the shard. A shard closed early (a training quota met) is
    not checked."""

    def __init__(self, store, expected: dict[str, tuple[int, int]], errors: ErrorCounter,
                 tar_reader: str = "webdataset"):
        self.store, self.expected, self.errors = store, expected, errors
        self.members = TAR_READERS[tar_reader]

    def __call__(self, src):
        for source in src:
            yield from self._read(source["url"])

    def _read(self, name: str):
        shard = self.store.describe(name)
        expected, nbytes = self.expected[name]
        arrived, why = 0, None
        try:
            stream = self.store.open(name)
        except OSError as exn:
            why = self.errors.tar_error(shard, exn)
        else:
            with contextlib.closing(stream):
                size = self.store.stream_size(stream)
                if size is not None and size != nbytes:
                    self.errors.problem(shard, f"is {size} bytes, the manifest says {nbytes}")
                member_errors: list[str] = []

                def on_member_error(exn):
                    member_errors.append(describe(exn))
                    return True

                try:
                    for sample in _group_by_key(self.members(stream, on_member_error), shard):
                        arrived += 1
                        yield sample
                except ShardDataError:
                    raise
                except Exception as exn:  # noqa: BLE001 - a broken tar: count what it lost (below)
                    why = describe(exn)
                why = why or (member_errors[-1] if member_errors else None)
        if arrived < expected:
            self.errors.lost(shard, expected - arrived, expected,
                             why or "the tar ends early: truncated or corrupt")
        elif arrived > expected:
            self.errors.problem(shard, f"holds {arrived} samples, the manifest says {expected}")
        elif why is not None:
            self.errors.problem(shard, f"is damaged after its last sample ({why})")


def _webdataset_members(stream, on_error):
    """``(name, bytes)`` of the tar's regular files by webdataset's member iterator (Python's
    tarfile underneath); a member error goes to ``on_error``."""
    for member in wds.tariterators.tar_file_iterator(stream, handler=on_error):
        yield member["fname"], member["data"]


def _fast_members(stream, on_error):
    return tar_members(stream)


TAR_READERS = {"webdataset": _webdataset_members, "fast": _fast_members}
"""``data.tar_reader``: how the ``read`` stage parses a shard's tar. ``webdataset`` (default:
Python's tarfile, the reference parser) or ``fast`` (:mod:`mmvae.data.tarread`: ~3x less
read time per sample, yields the same members, tested against tarfile; for loaders that must
keep up with a GPU, docs/data.md, Throughput)."""


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext rule, compiled once


def _group_by_key(members, shard: str):
    """Consecutive tar members ``(name, bytes)`` sharing a key -> one sample ``{"__key__",
    "__url__", ext: bytes}`` (webdataset's key rule); a repeated file marks the sample bad.
    When the tar breaks, the sample read so far still comes out (as it does when tarfile
    stops quietly; a missing file is then reported by ``select_keys``), then the error."""
    current = None
    match = _KEY_EXT.match
    try:
        for name, data in members:
            parts = match(name)
            if parts is None:
                continue
            prefix, suffix = parts.group(1), parts.group(2).lower()
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": shard}
            if suffix in current:
                current["__bad__"] = f"file {name} appears twice"
            else:
                current[suffix] = data
    except Exception:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current


# ----------------------------------------------------------------------------- sample stages
# A stem with several files (caption.json + caption.txt) yields its most decodable one.
_EXT_RANK = {**{ext: 0 for ext in IMAGE_EXTS}, "npy": 1, "json": 2, "cls": 3, "txt": 5}


def _ext_rank(ext: str) -> int:
    return _EXT_RANK.get(ext.rsplit(".", 1)[-1].lower(), 4)


class SelectKeys:
    """Stage ``select_keys``: keep the requested modalities as ``name -> (extension, bytes)``.
    A name is a key stem (``mnist`` for ``mnist.png``; when a stem has several files, e.g.
    ``caption.json`` and ``caption.txt``, the most decodable: image > npy > json > cls >
    other > txt) or a full key (``caption.txt``, returned under that name). A sample lacking
    one is reported and dropped, except the `optional` modalities of a dataset whose manifest
    allows missing ones (`mmvae.data.presence`): a sample needs one of them, and with
    `skip_incomplete` (evaluation) one lacking any is skipped quietly (not a data error)."""

    def __init__(self, stems: Sequence[str], errors: ErrorCounter, optional: Sequence[str] = (),
                 skip_incomplete: bool = False):
        self.stems, self.errors = tuple(stems), errors
        self._full = {s for s in self.stems if "." in s}
        self.optional, self.skip_incomplete = tuple(optional), skip_incomplete

    def _pick(self, sample: dict) -> dict:
        found: dict[str, tuple[str, Any]] = {}
        for name, value in sample.items():
            if name.startswith("__"):
                continue
            if name in self._full:
                found[name] = (name.partition(".")[2], value)
            stem, _, ext = name.partition(".")
            if stem in self.stems and (stem not in found or _ext_rank(ext) < _ext_rank(found[stem][0])):
                found[stem] = (ext, value)
        return found

    def __call__(self, src):
        for sample in src:
            if "__bad__" in sample:
                self.errors.sample(sample["__url__"], sample["__key__"], sample["__bad__"])
                continue
            found = self._pick(sample)
            missing = [s for s in self.stems if s not in found]
            if self.optional and missing and not self._required(missing):
                if self.skip_incomplete:
                    continue
                missing = [] if any(s in found for s in self.optional) else list(self.optional)
            if missing:
                self.errors.sample(sample.get("__url__", "?"), sample.get("__key__"),
                                   f"missing key(s) {', '.join(missing)}")
                continue
            found["__key__"], found["__url__"] = sample.get("__key__"), sample.get("__url__")
            yield found

    def _required(self, missing: list[str]) -> list[str]:
        return [s for s in missing if s not in self.optional]


class ShuffleBuffer:
    """Stage ``shuffle``: webdataset's shuffle buffer with an rng seeded from (seed, epoch,
    dp_rank, worker), so the order is reproducible (wds' default seeds from pid and time)."""

    def __init__(self, bufsize: int, state: EpochState, dp_rank: int):
        self.bufsize, self.state, self.dp_rank = bufsize, state, dp_rank

    def __call__(self, src):
        rng = random.Random(mix_seed(self.state.seed, self.state.epoch, self.dp_rank,
                                     _worker_info()[0], _TAG_BUFFER))
        return wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(src)


class TakeQuota:
    """Stage ``take_quota``: this worker's share of the rank's ``batches`` (the first
    ``batches % num_workers`` workers take one more), then stop. Running out first means
    the skipped bad samples left too little data: raise rather than hang the other ranks."""

    def __init__(self, batches: int, dp_rank: int):
        self.batches, self.dp_rank = batches, dp_rank

    def __call__(self, src):
        worker, num_workers = _worker_info()
        quota = self.batches // num_workers + int(worker < self.batches % num_workers)
        if quota == 0:
            return
        done = 0
        for batch in src:
            yield batch
            done += 1
            if done == quota:
                return
        raise ShardDataError(f"dp rank {self.dp_rank} worker {worker} produced only {done} of its "
                             f"{quota} batches: too many samples were skipped as bad (see warnings)")


class CountErrors:
    """Stage ``count_errors``: attach the errors this worker counted since its last batch, so
    the main process can total them (worker processes cannot update the loader directly)."""

    def __init__(self, errors: ErrorCounter):
        self.errors = errors

    def __call__(self, src):
        for batch in src:
            batch["__errors__"] = self.errors.take()
            yield batch
        if torch.utils.data.get_worker_info() is not None:
            # losses found after the last batch (the end of the last shard): an item with no
            # data, which the loader counts and does not yield
            late = self.errors.take()
            if late:
                yield {"__errors__": late, "__empty__": True}


class ReportFatal:
    """Stage ``report_fatal``: in a DataLoader worker, a ShardDataError becomes an item
    ``{"__fatal__": message}`` that the main process raises again as it was. (torch would
    re-raise it with the worker's traceback in the message: many lines, not one.)"""

    def __call__(self, src):
        if torch.utils.data.get_worker_info() is None:
            yield from src
            return
        try:
            yield from src
        except ShardDataError as exn:
            yield {"__fatal__": str(exn)}


# ----------------------------------------------------------------------------- plan + loader
@dataclass(frozen=True)
class SplitInfo:
    """The part of the manifest the loader needs for one split (``files``: shard names,
    checked to be plain names inside the store)."""

    store: Any
    files: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    sample_stems: tuple[str, ...] | None
    sample_keys: tuple[str, ...] | None = None
    spec: dict | None = None
    allows_missing: bool = False

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def expected(self) -> dict[str, tuple[int, int]]:
        return {f: (c, b) for f, c, b in zip(self.files, self.counts, self.sizes)}


def split_info(shards_dir, split: str) -> SplitInfo:
    store = open_store(shards_dir)
    manifest = read_manifest(store)  # names checked here: no scheme, path or '..' gets through
    if split not in manifest["splits"]:
        raise ShardsError(f"split {split!r} not in {store.location}/{MANIFEST}; "
                          f"available: {', '.join(manifest['splits'])}")
    shards = manifest["splits"][split]["shards"]
    if not shards or not sum(s["count"] for s in shards):
        raise ShardsError(f"split {split!r} of {store.location} is empty (no shards or no samples); "
                          f"rebuild the shards")
    files = tuple(s["file"] for s in shards)
    if not store.remote:  # a stat each; remote folders are checked once by check_shards
        missing = [f for f in files if store.size(f) is None]
        if missing:
            raise ShardsNotFound(f"shard {store.describe(missing[0])} listed in the manifest is "
                                 f"missing; rebuild the shards or copy it back")
    keys = manifest.get("sample_keys")
    stems = tuple(dict.fromkeys(k.partition(".")[0] for k in keys)) if keys else None
    return SplitInfo(store, files, tuple(s["count"] for s in shards), tuple(s["bytes"] for s in shards),
                     stems, tuple(keys) if keys else None, manifest.get("spec"),
                     manifest_allows_missing(manifest))


def _worker_counts(info: SplitInfo, source: ShardSource, epoch: int, dp_rank: int, dp_size: int,
                   workers: int) -> list[int]:
    """Samples each worker of ``dp_rank`` reads in one pass (mirrors the split stages)."""
    count_of = dict(zip(info.files, info.counts))
    mine = source.order(epoch, 0)[dp_rank::dp_size]
    return [sum(count_of[f] for f in mine[w::workers]) for w in range(workers)]


def _validate(info: SplitInfo, split: str, *, batch_size, modalities, num_workers, dp_rank, dp_size,
              on_error, shuffle_buffer, resampled, drop_last) -> None:
    """Every argument problem as one ValueError at construction, never a hang later."""
    if batch_size < 1 or shuffle_buffer < 1:
        raise ValueError(f"batch_size and shuffle_buffer must be >= 1 (got {batch_size}, {shuffle_buffer})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if isinstance(modalities, str) or not modalities:
        raise ValueError(f"modalities must be a non-empty list of key stems, got {modalities!r}")
    if info.sample_stems is not None:
        known = set(info.sample_stems) | set(info.sample_keys or ())
        unknown = [m for m in modalities if m not in known]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; the shards hold {list(info.sample_stems)} "
                             f"(files {list(info.sample_keys or ())})")
    readers = dp_size * max(1, num_workers)
    if not resampled and len(info.files) < readers:
        raise ValueError(
            f"split {split!r} has {len(info.files)} shards but dp_size={dp_size} x "
            f"num_workers={max(1, num_workers)} = {readers} readers each need at least one shard; "
            f"rebuild with more (smaller) shards, or use fewer workers (data.num_workers)")
    if (drop_last or resampled) and info.num_samples < dp_size * batch_size:
        raise ValueError(f"split {split!r} has {info.num_samples} samples, fewer than one batch per "
                         f"rank (dp_size={dp_size} x batch_size={batch_size}); lower batch_size")


class Loader:
    """Iterable of dict batches with an exact ``len()``; see the module docstring."""

    def __init__(self, pipeline: wds.DataPipeline, stage_names: tuple[str, ...], *, info: SplitInfo,
                 state: EpochState, errors: ErrorCounter, source: ShardSource | None,
                 resampler, num_workers: int, batch_size: int, dp_rank: int, dp_size: int,
                 fixed_batches: int | None):
        self.pipeline, self.stages, self.info = pipeline, stage_names, info
        self.state, self._counter, self._source, self._resampler = state, errors, source, resampler
        self.num_workers, self.batch_size = num_workers, batch_size
        self.dp_rank, self.dp_size, self._fixed = dp_rank, dp_size, fixed_batches
        self.errors = 0  # bad samples skipped so far (all epochs)
        self._loader = (pipeline if num_workers == 0 else
                        wds.WebLoader(pipeline, batch_size=None, shuffle=False,
                                      num_workers=num_workers, persistent_workers=False))

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (all ranks)."""
        return self.info.num_samples

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shard order and shuffle buffers for ``epoch`` (same on every rank)."""
        self.state.epoch = int(epoch)

    @property
    def batches_per_rank(self) -> tuple[int, ...]:
        """Batches each dp rank yields this epoch (all equal unless drop_last=False)."""
        if self._fixed is not None:
            return (self._fixed,) * self.dp_size
        workers = max(1, self.num_workers)
        return tuple(sum(-(-n // self.batch_size) for n in
                         _worker_counts(self.info, self._source, self.epoch, r, self.dp_size, workers))
                     for r in range(self.dp_size))

    def __len__(self) -> int:
        return self.batches_per_rank[self.dp_rank]

    def __iter__(self) -> Iterator[dict]:
        if self._resampler is not None:
            self._resampler.epoch = -1  # its own counter would make order depend on call count
        for batch in self._loader:
            if "__fatal__" in batch:  # a worker's ShardDataError, one line
                raise ShardDataError(batch["__fatal__"])
            self.errors += batch.pop("__errors__", 0)
            if not batch.pop("__empty__", False):
                yield images_to_float(batch)
        if self.num_workers == 0:
            self.errors += self._counter.take()

    def __repr__(self) -> str:
        return (f"Loader({len(self.info.files)} shards, {self.num_samples} samples, dp {self.dp_rank}/"
                f"{self.dp_size}, {self.num_workers} workers, {len(self)} batches: {' -> '.join(self.stages)})")


class Batch:
    """Stage ``batch``: collate ``batch_size`` samples, yielding as soon as a batch is full
    (webdataset's ``batched`` waits for one more sample, which would start an extra pass
    just to discover that the quota is met)."""

    def __init__(self, batch_size: int, partial: bool):
        self.batch_size, self.partial = batch_size, partial

    def __call__(self, src):
        batch = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and self.partial:
            yield collate(batch)


def build_stages(info: SplitInfo, state: EpochState, errors: ErrorCounter, *, stems, batch_size,
                 dp_rank, dp_size, num_workers, shuffle, shuffle_buffer, resampled, return_keys,
                 fixed_batches, presence: Presence | None = None, tar_reader: str = "webdataset"
                 ) -> tuple[list[tuple[str, Any]], int, list[tuple[str, Any]]]:
    """The pipeline as named stages: (per-pass stages, number of passes, per-batch stages).
    ``fixed_batches`` (per rank; None for one exact pass) turns on repetition and
    ``take_quota``; ``presence`` (modalities that may be missing) adds ``drop_modalities``
    and ``fill_absent``."""
    presence = presence or Presence()
    passes = 1
    if fixed_batches is not None:  # enough passes to fill every worker's quota from clean data
        per_worker = -(-fixed_batches // max(1, num_workers)) * batch_size
        passes = -(-per_worker // max(1, min(info.counts))) + 1
    if resampled:
        source = wds.ResampledShards(list(info.files), nshards=passes * len(info.files), seed=state.seed,
                                     worker_seed=ResampleSeed(state, dp_rank), deterministic=True)
        per_pass, passes = [("shards", source)], 1
    else:
        per_pass = [("shards", ShardSource(info.files, state, shuffle=shuffle)),
                    ("split_by_dp_group", SplitByDPGroup(dp_rank, dp_size)),
                    ("split_by_worker", wds.split_by_worker)]
    per_pass += [("read", ReadShards(info.store, info.expected, errors, tar_reader)),
                 ("select_keys", SelectKeys(stems, errors, presence.optional, presence.skip))]
    if presence.drop:
        per_pass.append(("drop_modalities", DropModalities(presence.drop, presence.modalities, state)))
    if shuffle:
        per_pass.append(("shuffle", ShuffleBuffer(shuffle_buffer, state, dp_rank)))
    per_pass.append(("decode", Decode(errors, info.spec)))
    if presence.masked:
        per_pass.append(("fill_absent", FillAbsent(presence.modalities, info.spec)))
    per_batch = [("batch", Batch(batch_size, partial=fixed_batches is None)),
                 ("tensors", ToTensors(return_keys))]
    if fixed_batches is not None:
        per_batch.append(("take_quota", TakeQuota(fixed_batches, dp_rank)))
    per_batch += [("count_errors", CountErrors(errors)), ("report_fatal", ReportFatal())]
    return per_pass, passes, per_batch


def make_loader(shards_dir, split: str, *, batch_size: int, modalities: Sequence[str],
                num_workers: int = 0, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, epoch: int = 0,
                shuffle: bool = True, shuffle_buffer: int = 1000, drop_last: bool = True,
                on_error: str = "skip", resampled: bool = False, return_keys: bool = False,
                drop_modalities: float = 0.0, incomplete: str = "mask",
                tar_reader: str = "webdataset") -> Loader:
    """Stream ``split`` of the shards in ``shards_dir`` (a folder or an ``http(s)://`` prefix)
    as dict batches.

    Each batch maps every requested modality stem to a tensor (images: float32 (B, C, H, W) in
    [0, 1], grayscale kept as C=1, whether stored as PNG/JPEG or as raw ``.npy`` (spec
    ``encoding: npy``); other ``.npy``: float32; ``.cls``: int64 (B,); ``.json`` holding a
    list of ints (token ids): int64 (B, L); other ``.json`` and ``.txt``: lists), plus ``"label"`` (int64 (B,)) when the manifest lists ``label.cls``, plus
    ``"__key__"`` (list of sample keys) when ``return_keys``.

    Args:
        batch_size: per data-parallel rank.
        modalities: key stems to return, e.g. ``["mnist", "svhn"]`` or ``["image", "caption"]``
            (a stem with several files gives its most decodable one: ``caption`` is
            ``caption.json``), or full keys such as ``"caption.txt"`` (returned under that name).
        dp_rank, dp_size: data-parallel group index and count (ranks of one particle group
            pass the same dp_rank and get identical batches).
        seed, epoch: the shard order and shuffle buffers depend only on these (and the layout);
            change epochs with ``loader.set_epoch``.
        drop_last: True (training): every rank yields exactly
            ``num_samples // (dp_size * batch_size)`` full batches, repeating its shards if
            needed. False (evaluation): each rank reads its shards once, last batch partial.
        on_error: ``"skip"`` (log, count every lost sample in ``loader.errors``, skip) or
            ``"raise"`` (a one-line ShardDataError naming the shard).
        resampled: draw shards with replacement (``wds.ResampledShards``) per rank and worker,
            for large multi-node jobs; the number of batches stays fixed as with drop_last.
        drop_modalities: rate at which each modality of a sample is dropped (seeded by seed,
            epoch and sample key; never all of a sample's), to simulate missing modalities.
        incomplete: for shards whose manifest allows missing modalities: ``"mask"`` (batches
            carry ``present``, (B, M) bool, and zero placeholders; see
            :mod:`mmvae.data.presence`) or ``"skip"`` (only samples with every modality).
        tar_reader: ``"webdataset"`` (tarfile) or ``"fast"`` (:mod:`mmvae.data.tarread`), see
            ``TAR_READERS``.
    Raises:
        ShardsNotFound (a FileNotFoundError): no manifest / missing shard. ShardsError (a
        ValueError): invalid manifest, an entry that is not a plain shard name, unknown or
        empty split. ValueError: bad arguments, or fewer shards than
        ``dp_size * max(1, num_workers)``.
    """
    info = split_info(shards_dir, split)
    modalities = list(modalities) if not isinstance(modalities, str) else modalities
    _validate(info, split, batch_size=batch_size, modalities=modalities, num_workers=num_workers,
              dp_rank=dp_rank, dp_size=dp_size, on_error=on_error, shuffle_buffer=shuffle_buffer,
              resampled=resampled, drop_last=drop_last)
    if incomplete not in ("mask", "skip"):
        raise ValueError(f"incomplete must be 'mask' or 'skip', got {incomplete!r}")
    if tar_reader not in TAR_READERS:
        raise ValueError(f"tar_reader must be one of {', '.join(TAR_READERS)}, got {tar_reader!r}")
    if drop_modalities and len(modalities) < 2:
        raise ValueError(f"drop_modalities={drop_modalities} needs at least two modalities, got "
                         f"{modalities}")
    presence = Presence(tuple(modalities), tuple(modalities) if info.allows_missing else (),
                        float(drop_modalities), skip=incomplete == "skip")
    stems = list(dict.fromkeys(modalities + (["label"] if info.sample_stems and "label" in info.sample_stems else [])))
    state, errors = EpochState(seed, epoch), ErrorCounter(on_error)
    fixed = info.num_samples // (dp_size * batch_size) if (drop_last or resampled) else None
    per_pass, passes, per_batch = build_stages(
        info, state, errors, stems=stems, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
        num_workers=num_workers, shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled,
        return_keys=return_keys, fixed_batches=fixed, presence=presence, tar_reader=tar_reader)
    source = per_pass[0][1]
    repeat = RepeatPasses(wds.DataPipeline(*[stage for _, stage in per_pass]),
                          source if isinstance(source, ShardSource) else None, passes)
    pipeline = wds.DataPipeline(repeat, *[stage for _, stage in per_batch])
    names = tuple(name for name, _ in per_pass) + ("repeat_passes",) + tuple(name for name, _ in per_batch)
    loader = Loader(pipeline, names, info=info, state=state, errors=errors,
                    source=source if isinstance(source, ShardSource) else None,
                    resampler=None if isinstance(source, ShardSource) else source,
                    num_workers=num_workers, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                    fixed_batches=fixed)
    if len(set(loader.batches_per_rank)) > 1 and dp_rank == 0:
        log.warning("drop_last=False: dp ranks yield %s batches of split %r; a multi-rank evaluation "
                    "must run max(loader.batches_per_rank) steps", loader.batches_per_rank, split)
    return loader
