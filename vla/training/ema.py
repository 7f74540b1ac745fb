"""Exponential moving average of model weights, with a warmup of the decay.

The training loop (``vla.training``) keeps one ``EMA`` next to the model and checkpoints both
(``model.safetensors`` and ``ema.safetensors``); policies load the EMA weights by default.

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` (n = number of updates), the schedule
Diffusion Policy and timm use, so early averages are not dominated by the random init. The
shadow tensors mirror whatever parameters the (possibly FSDP-sharded) module exposes, so the
same code works for a plain module, DDP and FSDP2 (sharded DTensor parameters): to write a full EMA
state dict, ``swapped_into(model)`` puts the shadow values into the live parameters for the
duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class EMA:
    """Shadow copy of ``model``'s floating-point parameters and buffers, updated after each step."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        # Parameters kept in fp32 even if the live model runs in lower precision.
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().clone().float() for name, t in self._tensors(model) if t.is_floating_point()
        }

    @staticmethod
    def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        # Frozen parameters (e.g. the pretrained text encoder) never change, so their average is
        # themselves: they are left out rather than averaged every step.
        yield from ((n, p) for n, p in model.named_parameters() if p.requires_grad)
        yield from model.named_buffers()

    def current_decay(self) -> float:
        """The decay applied at the next update (ramped up during warmup)."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * live, for every tracked tensor."""
        d = self.current_decay()
        for name, t in self._tensors(model):
            s = self.shadow.get(name)
            if s is None:
                continue
            s.lerp_(t.detach().float(), 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (restored on exit)."""
        backup: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, t in self._tensors(model):
                s = self.shadow.get(name)
                if s is None:
                    continue
                backup[name] = t.detach().clone()
                t.copy_(s.to(t.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in self._tensors(model):
                    if name in backup:
                        t.copy_(backup[name])

    def state_dict(self) -> dict:
        """Counters only; the weights themselves are saved as ``ema.safetensors``."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
