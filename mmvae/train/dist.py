"""The one place for distributed concerns: the Accelerator, ranks, particle groups, trackers.

World = data-parallel groups x P particle shards. Ranks g*P .. g*P+P-1 form particle group g:
they read the same batch (data-parallel rank g) and split its K particles (shard index
rank % P). Everything else asks this module for `Layout` and never reads rank variables.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mmvae.config import Config, ConfigError
from mmvae.parallel import GroupReducer


@dataclass
class Layout:
    rank: int
    world: int
    particle_shards: int
    dp_rank: int
    dp_size: int
    shard_index: int
    reducer: object  # GroupReducer, or None when P == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_accelerator(cfg: Config) -> Accelerator:
    """CPU runs use Accelerator(cpu=True), which `accelerate launch --multi_gpu` needs to start
    several gloo processes on a machine without GPUs (ENVIRONMENT.md)."""
    use_cpu = not torch.cuda.is_available()
    log_with = None if cfg.logging.wandb == "disabled" else "wandb"
    return Accelerator(cpu=use_cpu, mixed_precision=cfg.train.mixed_precision, log_with=log_with)


def release(accelerator: Accelerator) -> None:
    """End the trackers and forget the Accelerator's settings (the process group stays), so
    `fit` can run again in the same process with other settings (tests, notebooks)."""
    from accelerate.state import AcceleratorState

    accelerator.end_training()
    AcceleratorState._reset_state()


def make_layout(accelerator: Accelerator, cfg: Config) -> Layout:
    world, rank, P = accelerator.num_processes, accelerator.process_index, cfg.parallel.particle_shards
    if world % P:
        raise ConfigError(f"parallel.particle_shards={P} does not divide the {world} processes; "
                          f"launch a multiple of {P} processes")
    reducer = None
    if P > 1:
        groups = [dist.new_group(list(range(g * P, (g + 1) * P))) for g in range(world // P)]
        reducer = GroupReducer(groups[rank // P], P)
    return Layout(rank, world, P, rank // P, world // P, rank % P, reducer)


def broadcast(obj, accelerator: Accelerator):
    """The main process's value of a picklable object, on every rank."""
    box = [obj]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank if `flag` is True on any rank (for stop decisions all must share)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: list[float], accelerator: Accelerator) -> list[float]:
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(t)
    return t.tolist()


def wandb_mode(requested: str) -> str:
    """online without credentials falls back to offline with one warning (no network here)."""
    if requested != "online":
        return requested
    has_key = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file()
    if not has_key:
        warnings.warn("logging.wandb=online but no W&B credentials: logging offline "
                      "(upload later with `wandb sync`)", stacklevel=2)
        return "offline"
    return requested


def start_trackers(accelerator: Accelerator, cfg: Config, run_dir: Path, run_id: str) -> None:
    if cfg.logging.wandb == "disabled":
        return
    from mmvae.config import to_dict

    mode = wandb_mode(cfg.logging.wandb)
    kwargs = {"wandb": {"dir": str(run_dir), "mode": mode, "id": run_id, "resume": "allow",
                        "name": run_dir.name}}
    try:
        accelerator.init_trackers(cfg.logging.project, config=to_dict(cfg), init_kwargs=kwargs)
    except Exception as err:  # an unreachable server must not stop training
        if mode == "offline":
            raise
        warnings.warn(f"W&B init failed ({err}); logging offline", stacklevel=2)
        kwargs["wandb"]["mode"] = "offline"
        accelerator.init_trackers(cfg.logging.project, config=to_dict(cfg), init_kwargs=kwargs)
