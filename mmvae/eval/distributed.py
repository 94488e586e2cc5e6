"""Evaluation on several processes: which batches a rank computes, and how results meet.

The evaluation never reads rank variables: the entry point (``launch/evaluate.py``) asks its
Accelerator for (rank, world) and passes ``Ranks(rank, world)``; the process group it set up is
then used through ``torch.distributed``. With ``Ranks()`` (one process) every call is a no-op.

Sharded metrics (likelihoods, cross and joint coherence, CCA coherence) follow one rule, so that
any number of processes gives the numbers of one process:

* every rank walks the same sequence of batches (the same test stream, or the same chunks of
  prior samples) and computes only batch i with ``i % world == rank`` (``owns``);
* batch i draws its noise from a generator seeded by (seed, i) (``batch_generator``), never from
  a stream shared across batches, so its numbers do not depend on who computes it;
* per-batch results are gathered and reduced in batch order (``gather_by_index``), so even the
  floating-point sums are those of one process.

Reading is not split: each rank reads the test stream it walks (the batches it skips are
decoded but not computed). For the likelihoods (K = 1000 decodes per datapoint) reading is
negligible; cross coherence on the duplicated shard pairs is read-bound and gains little from
more processes (the default, unique pairs, are in memory). Metrics that are not sharded
(latent accuracy, pictures, fitting the classifiers or the CCA space) run on the main process;
the others wait (``main_first``) or skip them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluation processes (defaults: one process)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={self.rank}, world={self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether this rank computes batch `index` (round robin)."""
        return index % self.world == self.rank

    def mine(self, items: Iterable) -> Iterator[tuple[int, Any]]:
        """(index, item) of the items this rank computes; the others are consumed and dropped."""
        for index, item in enumerate(items):
            if self.owns(index):
                yield index, item

    def gather_by_index(self, items: dict[int, Any]) -> list:
        """Every rank's {batch index: result}, merged and ordered by index (on every rank)."""
        if self.world > 1:
            parts: list = [None] * self.world
            torch.distributed.all_gather_object(parts, items)
            items = {i: v for part in parts for i, v in part.items()}
        return [items[i] for i in sorted(items)]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """The main process's value of a picklable object, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block first (e.g. fits and caches an artifact); the others
        wait, then run it (and find the cache). If it fails on the main process, it raises
        RuntimeError on the others instead of running there."""
        if self.world == 1:
            yield
        elif self.is_main:
            try:
                yield
            except BaseException:
                self.broadcast(False)
                raise
            self.broadcast(True)
        else:
            if not self.broadcast(None):
                raise RuntimeError("the main process failed; see its error")
            yield


SINGLE = Ranks()


def batch_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for batch `index` of random stream `stream` (one per metric)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def batch_generator(seed: int, index: int, device, stream: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(batch_seed(seed, index, stream))


def sum_in_order(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise sums of per-batch dicts, added in batch order."""
    total: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            total[key] = total.get(key, 0.0) + value
    return total


def capped_batches(batches: Iterable[list], max_datapoints: int | None) -> Iterator[tuple[int, list]]:
    """(index, batch) over `batches` (each a list of tensors sharing their first dimension), the
    last one cut so that at most `max_datapoints` datapoints are seen in all (None: all).

    Every rank walks the same batches and computes those it `owns`; the index is what the
    per-batch noise is seeded from, so the results do not depend on the number of ranks."""
    seen = 0
    for index, batch in enumerate(batches):
        if max_datapoints is not None:
            batch = [t[: max_datapoints - seen] for t in batch]
        size = len(batch[0])
        if size == 0:
            return
        yield index, batch
        seen += size
        if max_datapoints is not None and seen >= max_datapoints:
            return
