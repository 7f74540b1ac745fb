"""Validation loss on held-out episodes: fixed batches and fixed flow noise, so numbers compare across steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vla.datasets import collate_windows
from vla.training.data_order import mix_seed


@torch.no_grad()
def validation_losses(model: torch.nn.Module, val_data: Any, processor: Any, device: torch.device, batch_size: int,
                      val_batches: int, seed: int, autocast: Callable[[], Any]) -> dict[str, float]:
    """Mean scalar losses over up to ``val_batches`` batches of ``val_data`` (the same windows and
    flow noise every time)."""
    n = len(val_data)
    bs = min(batch_size, n)
    nb = min(val_batches, max(1, n // bs))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: nb * bs].tolist()
    sums: dict[str, float] = {}
    model.eval()
    try:
        for b in range(nb):
            raw = collate_windows(val_data.__getitems__(idx[b * bs : (b + 1) * bs]))
            batch = processor.training_batch(raw, device)
            torch.manual_seed(mix_seed(seed, 0x7A1, b))  # the same flow noise at every validation
            with autocast():
                losses = model(batch)
            for k, v in losses.items():
                if torch.is_tensor(v) and v.ndim == 0:
                    sums[k] = sums.get(k, 0.0) + float(v.float()) / nb
    finally:
        model.train()
    return sums
