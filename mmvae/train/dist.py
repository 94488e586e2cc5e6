"""The trainer's distributed concerns: the Accelerator, the rank layout, particle groups.
The collectives (gather, broadcast, any, sum) are `mmvae.ranks.Ranks`, which the evaluation
(below train) shares; the functions here apply them with the trainer's Accelerator.

World = data-parallel groups x P particle shards. Ranks g*P .. g*P+P-1 form particle group g:
they read the same batch (data-parallel rank g) and split its K particles (shard index
rank % P). Everything else asks this module for `Layout` and never reads rank variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator

from mmvae.config import Config, ConfigError
from mmvae.parallel import GroupReducer
from mmvae.ranks import Ranks
from mmvae.train.precision import resolve_precision


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

    @property
    def ranks(self) -> Ranks:
        """This process among all of them, for what every rank computes a share of (the
        periodic evaluation): the round-robin rule and the object collectives of `mmvae.ranks`."""
        return Ranks(self.rank, self.world)


def is_main_process() -> bool:
    """Rank 0 of the launch (also after `release`, which keeps the process group)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this variable for every rank."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config, *, announce: bool = True) -> Accelerator:
    """CPU runs use Accelerator(cpu=True), which `accelerate launch --multi_gpu` needs to start
    several gloo processes on a machine without GPUs (ENVIRONMENT.md) -- except under DeepSpeed,
    whose plugin `cpu=True` would silently drop (DeepSpeed then runs on its CPU accelerator)."""
    deepspeed = deepspeed_requested()
    if deepspeed and cfg.objective.k_chunk:
        raise ConfigError("objective.k_chunk is not supported under DeepSpeed (its engine steps "
                          "inside every backward); set objective.k_chunk=0 or launch without "
                          "DeepSpeed")
    use_cpu = not torch.cuda.is_available() and not deepspeed
    log_with = None if cfg.logging.wandb == "disabled" else "wandb"
    acc = Accelerator(cpu=use_cpu, mixed_precision=resolve_precision(cfg, announce=announce),
                      log_with=log_with)
    if acc.state.deepspeed_plugin is not None:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        # We do not `prepare` the (WebDataset) loader, so DeepSpeed cannot infer the batch size;
        # and accelerate fills "auto" clipping with 1.0, while train.grad_clip=0 means none.
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_clipping"] = cfg.train.grad_clip
    return acc


def make_eval_accelerator() -> Accelerator:
    """The evaluation's Accelerator: no precision, trackers or DeepSpeed settings (evaluation
    runs the networks in fp32 and logs nothing to W&B); CPU runs use gloo as in
    `make_accelerator` (ENVIRONMENT.md)."""
    return Accelerator(cpu=not torch.cuda.is_available())


def autocast(accelerator: Accelerator):
    """The networks' mixed precision. Accelerate's autocast, except under DeepSpeed, where it does
    nothing (the engine holds bf16/fp16 weights itself): there torch's autocast casts the fp32
    inputs, noise and latents to the weights' precision at every layer, and densities still go up
    to fp32 (mmvae.dists)."""
    precision = str(accelerator.mixed_precision)
    if accelerator.state.deepspeed_plugin is not None and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


def release(accelerator: Accelerator, *, finished: bool = False) -> None:
    """End the trackers, close the process group and forget the Accelerator's settings, so `fit`
    can run again in the same process with other settings (tests, notebooks).

    `finished`: every rank got here by finishing its work, so they first meet at a barrier.
    Without it a rank may tear down its gloo group while a peer is still finishing its last
    collective, and the peer then aborts at exit ("terminate called without an active
    exception", SIGABRT; ENVIRONMENT.md). After a failure the ranks may not all get here, so
    there is no barrier (it could wait forever)."""
    from accelerate.state import AcceleratorState

    if finished:
        accelerator.wait_for_everyone()
    accelerator.end_training()  # also destroys the process group (accelerate >= 0.30)
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


# The collectives themselves live in `mmvae.ranks` (eval, below train, uses them too); these take
# the Accelerator the trainer holds.
def accelerator_ranks(accelerator: Accelerator) -> Ranks:
    return Ranks(accelerator.process_index, accelerator.num_processes)


def broadcast(obj, accelerator: Accelerator):
    """The main process's value of a picklable object, on every rank."""
    return accelerator_ranks(accelerator).broadcast(obj)


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank if `flag` is True on any rank (for stop decisions all must share)."""
    return accelerator_ranks(accelerator).any_rank(flag, accelerator.device)


def all_sum(values: list[float], accelerator: Accelerator) -> list[float]:
    return accelerator_ranks(accelerator).all_sum(values, accelerator.device)
