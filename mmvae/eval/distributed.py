"""Evaluation on several processes: which batches a rank computes, and how results meet.

The evaluation never reads rank variables: the entry point (``launch/evaluate.py``) or the
trainer passes a ``Ranks(rank, world)`` (`mmvae.ranks`, the one owner of the rank rule and the
object collectives); with ``Ranks()`` (one process) every call is a no-op.

Sharded metrics (likelihoods, cross, conditional and joint coherence, latent accuracy per
subset, CCA coherence) follow one rule, so that any number of processes gives the numbers of one
process:

* every rank walks the same sequence of batches (the same test stream, or the same chunks of
  prior samples) and computes only batch i with ``i % world == rank`` (``owns``);
* batch i draws its noise from a generator seeded by (seed, i) (``batch_generator``), never from
  a stream shared across batches, so its numbers do not depend on who computes it;
* per-batch results are gathered and reduced in batch order (``gather_by_index``), so even the
  floating-point sums are those of one process;
* work that is not a batch is split the same way: the linear probes of the latent accuracy per
  subset (subset j on rank j % world), gathered in subset order.

Reading is not split: each rank reads the test stream it walks (the batches it skips are
decoded but not computed). For the likelihoods (K = 1000 decodes per datapoint) reading is
negligible; cross coherence on the duplicated shard pairs is read-bound and gains little from
more processes (the default, unique pairs, are in memory). Metrics that are not sharded
(latent accuracy, pictures, fitting the classifiers or the CCA space) run on the main process;
the others wait (``main_first``) or skip them.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from mmvae.ranks import SINGLE, Ranks  # noqa: F401 - re-exported for the evaluation's callers


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
