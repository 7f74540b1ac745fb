"""Image augmentation for training: random shift (pad + crop, DrQ style) and colour jitter.

Applied by the training loop (``vla.training``) to ``batch["images"]`` — f32[B, V, 3, H, W] in
[-1, 1] — on the training device, after normalization and before the model.

Random parameters are drawn on the CPU from an explicit ``torch.Generator`` for the whole
*global* batch (all ranks together) and each rank keeps its own slice. Seeding that generator
from (seed, step) makes augmentation independent of the number of processes and exactly
reproducible on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Strengths; 0 disables a transform. ``shift`` is in pixels (max translation each way)."""

    enabled: bool = True
    shift: int = 4
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentConfig:
        if d is None:
            return cls(enabled=False)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"trainer.augment: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**d)


def draw_params(cfg: AugmentConfig, n: int, views: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters for ``n`` samples x ``views`` cameras (CPU tensors, shape (n, views))."""

    def uniform(strength: float) -> torch.Tensor:
        u = torch.rand(n, views, generator=generator)  # (n, V) in [0, 1)
        return 1.0 + strength * (2.0 * u - 1.0)

    s = int(cfg.shift)
    return {
        "dy": torch.randint(0, 2 * s + 1, (n, views), generator=generator),  # (n, V) crop offsets
        "dx": torch.randint(0, 2 * s + 1, (n, views), generator=generator),
        "brightness": uniform(cfg.brightness),
        "contrast": uniform(cfg.contrast),
        "saturation": uniform(cfg.saturation),
    }


def random_shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Translate each image by (dy - pad, dx - pad) pixels with edge replication.

    x: (N, C, H, W); dy, dx: (N,) integer offsets in [0, 2 * pad].
    """
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (N, C, H+2p, W+2p)
    dev = x.device
    rows = dy.to(dev)[:, None] + torch.arange(h, device=dev)[None, :]  # (N, H)
    cols = dx.to(dev)[:, None] + torch.arange(w, device=dev)[None, :]  # (N, W)
    idx = torch.arange(n, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def _gray(x01: torch.Tensor) -> torch.Tensor:
    """Luma of (N, 3, H, W) images in [0, 1] -> (N, 1, H, W)."""
    r, g, b = x01[:, 0:1], x01[:, 1:2], x01[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def augment_images(
    images: torch.Tensor, cfg: AugmentConfig, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Apply shift + colour jitter to images f32[B, V, 3, H, W] in [-1, 1]; params from ``draw_params``.

    ``params`` tensors are (B, V) — already sliced to this rank's samples.
    """
    if not cfg.enabled:
        return images
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"augment: expected images f32[B, V, 3, H, W], got shape {tuple(images.shape)}")
    b, v, c, h, w = images.shape
    if params["dy"].shape != (b, v):
        raise ValueError(f"augment: params for shape {tuple(params['dy'].shape)}, images have (B, V) = {(b, v)}")
    dev, dtype = images.device, images.dtype
    x = images.reshape(b * v, c, h, w)  # (N, 3, H, W)
    x = random_shift(x, params["dy"].reshape(-1), params["dx"].reshape(-1), int(cfg.shift))
    x = (x + 1.0) * 0.5  # (N, 3, H, W) in [0, 1]

    def factor(key: str) -> torch.Tensor:
        return params[key].reshape(-1, 1, 1, 1).to(dev, dtype)  # (N, 1, 1, 1)

    if cfg.brightness > 0:
        x = x * factor("brightness")
    if cfg.contrast > 0:
        mean = _gray(x).mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1)
        x = (x - mean) * factor("contrast") + mean
    if cfg.saturation > 0:
        g = _gray(x)  # (N, 1, H, W)
        x = (x - g) * factor("saturation") + g
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0  # back to [-1, 1]
    return x.reshape(b, v, c, h, w)
