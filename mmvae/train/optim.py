"""The optimiser: Adam with amsgrad over trainable parameters (REFERENCE.md §5)."""
from __future__ import annotations

import torch


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, amsgrad=True)
