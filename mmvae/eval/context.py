"""`EvalContext`: what every metric gets (the run, its config and model, options, seed, device,
progress and ranks) and the data it reads: the run's shards, or the reference models' own
seeded samples."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from mmvae.config import Config, EvalConfig, apply_override, validate
from mmvae.log import track
from mmvae.models.toy import GaussianPair, GaussianVAE
from mmvae.ranks import SINGLE, Ranks

EVAL_DIR = "eval"
# The linear-Gaussian reference models (`mmvae.models.toy`) have no shards and no labels: they are
# evaluated on their own seeded samples (`sample_data`), on the CPU (their sampler is CPU-only).
REFERENCE_MODELS = (GaussianVAE, GaussianPair)


def is_reference(model: torch.nn.Module) -> bool:
    """Whether `model` is one of the linear-Gaussian reference models (by its class, not by
    what attributes it happens to have)."""
    return isinstance(model, REFERENCE_MODELS)


def resolve_options(cfg: Config, **explicit) -> EvalConfig:
    """The run's `eval` config section with explicit keyword options applied (validated like
    command-line overrides)."""
    for key, value in explicit.items():
        apply_override(cfg, f"eval.{key}", value)
    validate(cfg)
    return cfg.eval


@dataclass
class EvalContext:
    """What every metric gets: the run, its config and model, options, seed and outputs."""

    run_dir: Path
    cfg: Config
    model: torch.nn.Module
    options: EvalConfig
    seed: int
    device: torch.device
    progress: object | None = None  # rich Progress or None
    ranks: Ranks = SINGLE

    @property
    def out_dir(self) -> Path:
        return self.run_dir / EVAL_DIR

    @property
    def shards_dir(self) -> Path:
        return Path(self.cfg.data.shards)

    @property
    def is_toy(self) -> bool:
        """Linear-Gaussian reference models evaluate on their own seeded samples."""
        return is_reference(self.model)

    @property
    def has_labels(self) -> bool:
        """Whether the batches carry class labels (the reference models' samples do not)."""
        return not self.is_toy

    def has_unique(self, split: str) -> bool:
        return (self.shards_dir / f"unique_{split}.npz").is_file()

    def track(self, iterable: Iterable, description: str, total: int | None = None):
        """`mmvae.log.track`: a task with count and eta under the evaluation's progress bar."""
        return track(iterable, description, total, enabled=self.progress is not None)

    def labelled_batches(self, split: str = "test", batch_size: int | None = None):
        """(xs, labels) batches, xs in model.modalities order (on CPU: a metric moves the
        batches it computes); labels None for the toy models. The split is read once in shard
        order, the last batch partial; every rank reads the same batches."""
        batch_size = batch_size or self.options.batch_size
        if self.is_toy:
            gen = torch.Generator().manual_seed(self.seed + (split == "test"))
            data = self.model.sample_data(self.options.toy_datapoints, gen)
            data = data if isinstance(data, list) else [data]
            for i in range(0, self.options.toy_datapoints, batch_size):
                yield [x[i:i + batch_size] for x in data], None
            return
        for batch in self.shard_batches(split, self.model.modalities, batch_size):
            yield [batch[m] for m in self.model.modalities], batch.get("label")

    def shard_batches(self, split: str, modalities: Sequence[str], batch_size: int):
        """Dict batches of the shards in shard order (no shuffle, last batch partial); lists
        (captions from .json) become tensors. Shards that may omit modalities give only the
        samples that have every one of `modalities` (what the metric reads): a metric never
        sees a placeholder."""
        from mmvae.data import make_loader

        loader = make_loader(self.shards_dir, split, batch_size=batch_size, modalities=modalities,
                             num_workers=self.cfg.data.num_workers, seed=self.seed, shuffle=False,
                             drop_last=False, on_error=self.cfg.data.on_error, incomplete="skip",
                             tar_reader=self.cfg.data.tar_reader)
        for batch in loader:
            yield {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in batch.items()}

    def num_batches(self, split: str = "test", limit: int = 0,
                    batch_size: int | None = None) -> int | None:
        n = self.options.toy_datapoints if self.is_toy else self.num_samples(split)
        if n is None:
            return None
        n = min(n, limit) if limit else n
        return -(-n // (batch_size or self.options.batch_size))

    def num_samples(self, split: str) -> int | None:
        try:
            manifest = json.loads((self.shards_dir / "manifest.json").read_text())
            return int(manifest["splits"][split]["num_samples"])
        except (OSError, KeyError, ValueError):
            return None

    def dataset(self) -> str:
        if self.is_toy:
            return self.cfg.model.name
        try:
            return json.loads((self.shards_dir / "manifest.json").read_text())["dataset"]
        except (OSError, KeyError, ValueError):
            return "unknown"
