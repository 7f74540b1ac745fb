"""Normalization of actions and states to roughly [-1, 1], stored with the checkpoint.

``Normalizer(stats, mode)`` takes the store's statistics (``EpisodeStore.stats``:
``{key: {"mean", "std", "min", "max", "q01", "q99"}}``) and maps each key:

    quantile:  x -> 2 (x - q01) / (q99 - q01) - 1      (q01 -> -1, q99 -> +1)
    meanstd:   x -> (x - mean) / std

A dimension whose range (q99 - q01, or std) is below ``eps`` is treated as constant: it maps to
``x - centre`` (zero for the constant value) instead of dividing by ~0. ``clip`` (quantile mode)
clamps normalized values to [-clip, clip] (``None`` = no clipping); ``unnormalize`` is the exact
inverse where no clipping happened. Works on numpy arrays and torch tensors (the last axis is the
feature axis); the statistics travel as JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MODES = ("quantile", "meanstd")
REQUIRED_KEYS = ("action", "state")  # keys whose statistics must be complete when present


class Normalizer:
    """Per-key affine normalization: ``y = (x - centre) / scale``."""

    version = 1

    def __init__(self, stats: dict[str, dict[str, Any]], mode: str = "quantile", clip: float | None = 1.5,
                 eps: float = 1e-4) -> None:
        if mode not in MODES:
            raise ValueError(f"Normalizer: mode must be one of {MODES}, got {mode!r}")
        self.mode, self.clip, self.eps = mode, clip, eps
        self.stats = {k: {s: np.asarray(v, dtype=np.float32).reshape(-1) for s, v in d.items()}
                      for k, d in stats.items()}
        self._centre: dict[str, np.ndarray] = {}
        self._scale: dict[str, np.ndarray] = {}
        for key, st in self.stats.items():
            need = ("q01", "q99") if mode == "quantile" else ("mean", "std")
            missing = [s for s in need if s not in st]
            if missing and key not in REQUIRED_KEYS:
                continue  # other recorded statistics (e.g. reward) are not normalized here
            if missing:
                raise ValueError(f"Normalizer: stats['{key}'] lacks {missing} needed by mode '{mode}'; has {list(st)}")
            a, b = st[need[0]], st[need[1]]
            if a.shape != b.shape:
                raise ValueError(f"Normalizer: stats['{key}'] {need[0]} has shape {a.shape}, {need[1]} has {b.shape}")
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ValueError(f"Normalizer: stats['{key}'] contains NaN/inf in {need}")
            if mode == "quantile":
                centre, scale = (a + b) / 2, (b - a) / 2
            else:
                centre, scale = a, b
            self._centre[key] = centre.astype(np.float32)
            self._scale[key] = np.where(scale < eps, 1.0, scale).astype(np.float32)  # constant dims: x - centre

    def dim(self, key: str) -> int:
        self._check_key(key)
        return int(self._centre[key].shape[0])

    def _check_key(self, key: str) -> None:
        if key not in self._centre:
            raise ValueError(f"Normalizer: no statistics for key '{key}'; have {sorted(self._centre)}")

    def _params(self, key: str, x: np.ndarray | torch.Tensor) -> tuple[Any, Any]:
        self._check_key(key)
        c, s = self._centre[key], self._scale[key]
        if x.shape[-1] != c.shape[0]:
            raise ValueError(f"Normalizer: '{key}' expects last dim {c.shape[0]}, got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor):
            return (torch.as_tensor(c, device=x.device, dtype=x.dtype),
                    torch.as_tensor(s, device=x.device, dtype=x.dtype))
        return c, s

    def normalize(self, key: str, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Raw ``x`` (..., D) -> normalized, same type/shape."""
        c, s = self._params(key, x)
        y = (x - c) / s
        if self.clip is not None and self.mode == "quantile":
            y = y.clamp(-self.clip, self.clip) if isinstance(y, torch.Tensor) else np.clip(y, -self.clip, self.clip)
        return y

    def unnormalize(self, key: str, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalized ``y`` (..., D) -> raw units, same type/shape."""
        c, s = self._params(key, y)
        return y * s + c

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Normalizer", "version": self.version, "mode": self.mode, "clip": self.clip, "eps": self.eps,
                "stats": {k: {s: v.tolist() for s, v in d.items()} for k, d in self.stats.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        if d.get("type") != "Normalizer":
            raise ValueError(f"Normalizer.from_dict: expected type 'Normalizer', got {d.get('type')!r}")
        if int(d.get("version", 0)) > cls.version:
            raise ValueError(f"Normalizer.from_dict: version {d.get('version')} is newer than {cls.version}")
        return cls(d["stats"], mode=d["mode"], clip=d.get("clip"), eps=float(d.get("eps", 1e-4)))
