"""`train.compile: true`: torch.compile the per-modality encoders and decoders.

Only the networks are compiled, not the estimators: the nets are plain conv/linear stacks that
compile without graph breaks, while the estimators' particle bookkeeping (chunks, shards,
DReG's gradient surgery) would break graphs and recompile. `nn.Module.compile` compiles in
place, so parameter names -- and therefore checkpoints and saved models -- are those of eager.
Compilation happens at the first call (the first step pays it) and again when a shape changes
(the last, smaller batch; K-chunks), after which the shape is treated as dynamic.
"""
from __future__ import annotations

from torch import nn


def compile_nets(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Compile every expert's `enc` and `dec` in place when `enabled`; returns `model`."""
    if enabled:
        for expert in model.experts:
            expert.enc.compile()
            expert.dec.compile()
    return model
