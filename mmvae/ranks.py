"""`Ranks`: this process's place among the processes of a launch, the rule of which rank
computes which batch (round robin), and the object collectives (gather in batch order, broadcast,
barrier, main-first) every layer above uses: the trainer (`mmvae.train.dist.Layout.ranks`) and the
evaluation (`mmvae.eval.distributed`). It never reads rank variables or touches the Accelerator
(only `mmvae.train` does): the caller passes (rank, world), and the process group it set up is
used through ``torch.distributed``. With ``Ranks()`` (one process) every call is a no-op.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

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

    def any_rank(self, flag: bool, device=None) -> bool:
        """True on every rank if `flag` is True on any rank (decisions all ranks must share).
        `device`: where the backend reduces (the GPU under NCCL)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def all_sum(self, values: list[float], device=None) -> list[float]:
        """Element-wise sums of `values` over the ranks (in float64), on every rank."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

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
