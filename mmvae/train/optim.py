"""The optimiser: Adam with amsgrad over trainable parameters (REFERENCE.md §5)."""
from __future__ import annotations

import torch


def make_optimizer(model: torch.nn.Module, lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam(amsgrad) as the paper code. Its loss is a batch sum, ours a batch mean: the same
    updates with `eps` / batch_size (train.adam_eps, docs/estimators.md)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, eps=eps, amsgrad=True)
