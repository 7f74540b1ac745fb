"""The optimizer side of training: the learning-rate schedule, AdamW over the model's own
parameter groups (``VLA.optimizer_groups``), and the loss wrapper DDP/FSDP see as ``forward``."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def strip_wrapper_prefixes(name: str) -> str:
    """A parameter name without the path parts DDP / torch.compile / FSDP1 insert (``module.x`` -> ``x``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def build_optimizer(model: nn.Module, tcfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over ``model.optimizer_groups(weight_decay)``: the model decides what decays."""
    groups = model.optimizer_groups(float(tcfg.weight_decay))
    return torch.optim.AdamW(groups, lr=float(tcfg.lr), betas=tuple(tcfg.betas), eps=float(tcfg.eps))


class LossModule(nn.Module):
    """Wraps the model so DDP/FSDP see ``compute_loss`` as ``forward`` (their gradient hooks need it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.compute_loss(batch, per_sample=True)
