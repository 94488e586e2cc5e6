"""Missing modalities in the data: which samples have which modalities, as a batch mask.

A batch from a loader that may lack modalities carries ``batch["present"]``, a (B, M) bool
tensor whose columns follow the loader's ``modalities`` (the model's order), and every
modality tensor keeps its full (B, ...) shape: an absent modality's entry is a zero-filled
placeholder of the manifest's spec shape and dtype, which the estimators select away
(`mmvae.objectives`, "Missing modalities").

Two sources, two stages (`mmvae.data.pipeline` lists them in order):

* **Shards that omit keys.** Allowed only when the manifest says so
  (``"missing_modalities": true``, written by the recipe that knows its data is partial);
  then ``select_keys`` keeps a sample that lacks some modalities and drops (and counts) only
  one that lacks all of them, or lacks a non-modality key such as ``label``. In a manifest
  without the flag a missing key stays a data error, as before: a complete dataset that
  suddenly lacks keys is broken, not partial.
* **``data.drop_modalities: RATE``** (training only, any multimodal dataset): stage
  ``drop_modalities`` removes each present modality of a sample with probability RATE, from
  a generator seeded by (seed, epoch, sample key) only, so a sample loses the same modalities
  in an epoch whatever the rank, worker or shuffle layout, and different ones the next epoch.
  It never removes a sample's last modality (if every draw says drop, one of them, drawn from
  the same generator, stays).

Stage ``fill_absent`` (after ``decode``) then fills the placeholders and records the mask.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmvae.data.errors import ShardsError

PRESENT = "present"
"""Batch key of the (B, M) presence mask."""
MISSING_FLAG = "missing_modalities"
"""Manifest key (bool): samples may omit modality keys."""
_TAG_DROP = 13


@dataclass(frozen=True)
class Presence:
    """A loader's settings for missing modalities (see the module docstring): ``optional``
    may be absent in the shards (the manifest allows it), ``drop`` is the rate of simulated
    absence, ``skip`` reads only samples with every modality (evaluation)."""

    modalities: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    drop: float = 0.0
    skip: bool = False

    @property
    def masked(self) -> bool:
        """Batches carry the mask and placeholders."""
        return bool(self.drop) or (bool(self.optional) and not self.skip)


def manifest_allows_missing(manifest: dict) -> bool:
    return manifest.get(MISSING_FLAG) is True


def _key_seed(key) -> int:
    """A stable integer from a sample key (str's hash is salted per process)."""
    return zlib.crc32(str(key).encode("utf-8"))


class DropModalities:
    """Stage ``drop_modalities``: see the module docstring. Works on the selected payloads
    (before decoding: a dropped modality is never decoded)."""

    def __init__(self, rate: float, modalities: Sequence[str], state):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_modalities must be in [0, 1), got {rate}")
        self.rate, self.modalities, self.state = rate, tuple(modalities), state

    def dropped(self, key, here: Sequence[str]) -> list[str]:
        """The modalities of `here` (those the sample has) that sample `key` loses this epoch."""
        rng = np.random.default_rng(np.random.SeedSequence(
            [int(self.state.seed), int(self.state.epoch), _key_seed(key), _TAG_DROP]))
        draws = rng.random(len(self.modalities))  # one per modality: independent of `here`
        spare = int(rng.integers(len(self.modalities)))
        drop = [m for m, u in zip(self.modalities, draws) if m in here and u < self.rate]
        if len(drop) == len(here):  # never all: keep one, drawn from the same generator
            drop.remove(here[spare % len(here)])
        return drop

    def __call__(self, src):
        for sample in src:
            here = [m for m in self.modalities if m in sample]
            for m in self.dropped(sample.get("__key__"), here):
                del sample[m]
            yield sample


def placeholders(modalities: Sequence[str], spec: dict | None) -> dict[str, tuple[str, np.ndarray]]:
    """Zero (kind, value) per modality from the manifest's spec (file key -> spec)."""
    out = {}
    for m in modalities:
        entry = next((v for k, v in (spec or {}).items()
                      if (k == m or k.partition(".")[0] == m) and "shape" in v), None)
        if entry is None:
            raise ShardsError(f"modality {m!r} may be missing but the manifest has no spec with "
                              f"its shape to fill it in; rebuild the shards (the writer records "
                              f"the spec)")
        out[m] = (entry["kind"], np.zeros(entry["shape"], dtype=entry["dtype"]))
    return out


class FillAbsent:
    """Stage ``fill_absent``: put a zero placeholder where a modality is absent and the
    sample's presence row under ``present`` (kind ``mask``: collated to a (B, M) bool tensor)."""

    def __init__(self, modalities: Sequence[str], spec: dict | None):
        self.modalities = tuple(modalities)
        self.fill = placeholders(self.modalities, spec)

    def __call__(self, src):
        for sample in src:
            row = np.array([m in sample for m in self.modalities], dtype=bool)
            for m, value in self.fill.items():
                sample.setdefault(m, value)
            sample[PRESENT] = ("mask", row)
            yield sample
