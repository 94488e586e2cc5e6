"""`launch/grad_snr.py`'s work: the weights along a run, one fixed batch, the SNR measurements
of `mmvae.eval.gradsnr` at each point, a rich table and a plot.

A *point* is the model's weights at one training step: ``init`` (the run's initial parameters,
rebuilt from ``train.seed`` exactly as the trainer builds them), a checkpoint step
(``RUN_DIR/checkpoints/<step>/``), or ``final`` (``RUN_DIR/model/``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from mmvae.config import Config, ConfigError
from mmvae.data.pipeline import make_loader
from mmvae.eval import gradsnr
from mmvae.eval.context import is_reference
from mmvae.registry import build_model, load_weights

CHECKPOINT_WEIGHTS = "pytorch_model.bin"  # what accelerator.save_state writes (keys model.*)


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) \
        if root.is_dir() else []


def resolve_points(spec: str, run_dir: Path | None) -> list[str]:
    """'all' -> init, every checkpoint step, final (those that exist); else a comma list."""
    if spec != "all":
        return [s.strip() for s in spec.split(",") if s.strip()]
    points = ["init"] + [str(s) for s in checkpoint_steps(run_dir)] if run_dir else ["init"]
    if run_dir and (run_dir / "model").is_dir():
        points.append("final")
    return points


def fresh_model(cfg: Config, model_kwargs: dict) -> tuple[torch.nn.Module, dict]:
    """A model with the initial parameters of a run with this config (the trainer's seeding and
    build), and a copy of them (the `init` point, restored after other points were loaded)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, **model_kwargs)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def load_point(model: torch.nn.Module, point: str, run_dir: Path | None,
               initial: dict) -> int | None:
    """Load the weights of `point` into `model` (in place); returns the step (None for final).
    `initial`: the initial state (`fresh_model`)."""
    if point == "init":
        model.load_state_dict(initial)
        return 0
    if point == "final":
        if run_dir is None:
            raise ConfigError("point 'final' needs --run")
        load_weights(model, run_dir)
        return None
    if not point.isdigit():
        raise ConfigError(f"point {point!r}: use init, final, all or a checkpoint step")
    path = run_dir / "checkpoints" / f"{int(point):09d}" / CHECKPOINT_WEIGHTS if run_dir else None
    if path is None or not path.is_file():
        raise ConfigError(f"no checkpoint of step {point} ({path}); steps there: "
                          f"{checkpoint_steps(run_dir) if run_dir else 'none (no --run)'}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return int(point)


def fixed_batch(model, cfg: Config, batch_size: int, split: str, seed: int) -> list[torch.Tensor]:
    """The first `batch_size` datapoints of `split` in shard order (no shuffle), or for the
    reference models `batch_size` seeded samples."""
    if is_reference(model):
        data = model.sample_data(batch_size, generator=torch.Generator().manual_seed(seed))
        return data if isinstance(data, list) else [data]
    loader = make_loader(cfg.data.shards, split, batch_size=batch_size,
                         modalities=model.modalities, shuffle=False, drop_last=False,
                         incomplete="skip")
    batch = next(iter(loader))
    return [batch[m] for m in model.modalities]


def measure_points(model, cfg: Config, points: Sequence[str], run_dir: Path | None, *,
                   initial: dict, xs, K: int, estimators: Sequence[str], draws: int, seed: int,
                   decompose: bool, say=print) -> list[dict]:
    """One record per point: {"point", "step", "weights" (`gradsnr.weight_stats`), "snr": {estimator: {group: summary}},
    "decomposition": {group: parts} (multimodal, when asked), "seconds"}."""
    looser = cfg.objective.looser
    rows = []
    for point in points:
        start = time.perf_counter()
        step = load_point(model, point, run_dir, initial)
        row = {"point": point, "step": step,
               "weights": gradsnr.weight_stats(model, xs, K, seed=seed, looser=looser),
               "snr": gradsnr.measure(model, xs, K, estimators=estimators, draws=draws,
                                      seed=seed, looser=looser)}
        if decompose and model.multimodal:
            row["decomposition"] = gradsnr.decompose(model, xs, K, draws=draws, seed=seed,
                                                     looser=looser)
        row["seconds"] = round(time.perf_counter() - start, 1)
        say(f"point {point}: {row['seconds']} s")
        rows.append(row)
    return rows


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float))
    tmp.replace(path)


def table(payload: dict):
    """Rich table: rows (point, estimator), columns each group's median SNR (mean in brackets),
    then the score share of the unbiased encoder variance per encoder."""
    from rich.table import Table

    rows = payload["points"]
    groups = list(next(iter(rows[0]["snr"].values())))
    encs = list(rows[0].get("decomposition", {}))
    t = Table(title=f"gradient SNR, median (mean) over elements; K={payload['K']}, "
                    f"B={payload['batch_size']}, {payload['draws']} draws", title_justify="left")
    for name in ["point", "ESS/K", "estimator", *groups, *[f"score var share {g}" for g in encs]]:
        t.add_column(name, justify="left" if name in ("point", "estimator") else "right")
    for row in rows:
        for i, (est, per_group) in enumerate(row["snr"].items()):
            cells = [f"{per_group[g]['snr_median']:.3g} ({per_group[g]['snr_mean']:.3g})"
                     for g in groups]
            shares = [f"{row['decomposition'][g]['score_share']:.2g}" if i == 0 else ""
                      for g in encs]
            ess = f"{row['weights']['ess_fraction']:.3g}" if i == 0 and "weights" in row else ""
            t.add_row(row["point"] if i == 0 else "", ess, est, *cells, *shares,
                      end_section=i == len(row["snr"]) - 1)
    return t


def plot(payload: dict, path: Path) -> None:
    """Median SNR against the training step, one panel per group, one line per estimator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["points"] if r["step"] is not None]
    groups = list(next(iter(rows[0]["snr"].values())))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.0), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, g in zip(axes[0], groups):
        for est in rows[0]["snr"]:
            ax.plot(steps, [r["snr"][est][g]["snr_median"] for r in rows], marker="o", label=est)
        ax.set_title(g)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.axhline(payload.get("snr_floor", 0), color="grey", lw=0.8, ls=":")
    axes[0][0].set_ylabel("median SNR |mean|/sd")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

