"""Flow-matching helpers shared by the action and frame experts (docs/architecture.md).

Convention (pi0 / openpi): time runs from t = 1 (pure noise) to t = 0 (data).

    x_t = t * noise + (1 - t) * x          interpolation
    u   = noise - x                        target velocity, d x_t / d t
    t   ~ Beta(1.5, 1) scaled into (0.001, 1]   (more weight near the noisy end)

Inference integrates ``dx/dt = v(x_t, t)`` with Euler steps from t = 1 down to t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

T_MIN = 0.001


def sample_time(
    batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flow time per sample, Beta(1.5, 1) scaled into (0.001, 1]. f32[B]."""
    # Beta(a, 1) has CDF x^a, so x = U^(1/a) samples it exactly (and honours `generator`).
    u = torch.rand(batch_size, generator=generator, device=device)  # (B,)
    beta = u.clamp_min(1e-12) ** (1.0 / 1.5)  # (B,) ~ Beta(1.5, 1)
    return T_MIN + (1.0 - T_MIN) * beta  # (B,)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy sample and target velocity for data ``x`` (B, ...), ``noise`` like x, ``t`` (B,)."""
    if x.shape != noise.shape:
        raise ValueError(f"flow.interpolate: noise shape {tuple(noise.shape)} != data shape {tuple(x.shape)}")
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
    x_t = tt * noise + (1.0 - tt) * x  # (B, ...)
    return x_t, noise - x


def euler_integrate(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, num_steps: int
) -> torch.Tensor:
    """Integrate from ``noise`` at t=1 to t=0 with ``num_steps`` Euler steps; ``velocity(x_t, t[B])``."""
    if num_steps < 1:
        raise ValueError(f"flow.euler_integrate: num_steps must be >= 1, got {num_steps}")
    x = noise
    dt = -1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((x.shape[0],), 1.0 + i * dt, device=x.device, dtype=torch.float32)  # (B,)
        x = x + dt * velocity(x, t)
    return x


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sine-cosine embedding of flow time t (B,) -> (B, dim); periods span [min_period, max_period] (openpi)."""
    if dim % 2:
        raise ValueError(f"flow.time_embedding: dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device)  # (dim/2,)
    period = min_period * (max_period / min_period) ** frac  # (dim/2,)
    angle = t.float()[:, None] * (2 * math.pi / period)[None, :]  # (B, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (B, dim)
