"""The observation format every part of vla agrees on, and the one validator for it.

An observation is a plain dict, exactly as the envs return it::

    {"images": {camera: uint8[H, W, 3]},   # one entry per camera, RGB
     "state":  float32[S]}                 # proprioception in raw env units

With a history of ``n_obs_steps = T > 1`` frames (stacked by the policy, or by a remote client
before it sends), every leaf gains a leading time axis: images ``uint8[T, H, W, 3]``, state
``float32[T, S]``, oldest first. The instruction travels beside the observation as a ``str``.

:func:`validate_observation` checks one observation against an :class:`ObservationSpec` (the
cameras with their sizes, the state size, the history length) and is what the policy server,
``VLAPolicy`` and ``Processor.observation_batch`` all call; every error names where the
observation came from, the key, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Observation = dict[str, Any]  # {"images": {cam: u8[H, W, 3] or u8[T, H, W, 3]}, "state": f32[S] or f32[T, S]}


class ObservationError(ValueError):
    """An observation that does not match the spec it was checked against."""


@dataclass(frozen=True)
class ObservationSpec:
    """What a model reads: ``cameras`` ``{name: (H, W)}``, ``state_dim`` and ``n_obs_steps``."""

    cameras: dict[str, tuple[int, int]]
    state_dim: int
    n_obs_steps: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> ObservationSpec:
        """The spec of a ``VLAConfig`` (its cameras all share ``image_hw``)."""
        h, w = cfg.image_hw
        return cls({cam: (int(h), int(w)) for cam in cfg.cameras}, int(cfg.state_dim), int(cfg.n_obs_steps))


def _describe(x: Any) -> str:
    return f"{x.dtype}{list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__


def validate_observation(obs: Any, spec: ObservationSpec, where: str = "observation", *,
                         strict: bool = False, stacked: bool | None = None) -> Observation:
    """Check ``obs`` against ``spec``; returns ``{"images": {cam: u8 array}, "state": f32 array}``
    holding the spec's cameras only.

    ``strict`` (the server, where data crossed a wire): images and state must already be numpy
    arrays and the camera set must be exactly the spec's. Otherwise array-likes are converted and
    extra cameras are ignored (an env may render more cameras than a model reads).
    ``stacked``: whether the history axis is present; ``None`` decides from the state's rank
    (a policy stacks its own history, a caller may also pass it stacked).
    """
    if not isinstance(obs, Mapping):
        raise ObservationError(f"{where}: expected a map {{'images': {{cam: u8[H, W, 3]}}, 'state': f32[S]}}, "
                               f"got {type(obs).__name__}")
    for key in ("images", "state"):
        if key not in obs:
            raise ObservationError(f"{where}: missing key '{key}' (expected images, state)")
    images, state = obs["images"], obs["state"]
    if not isinstance(images, Mapping):
        raise ObservationError(f"{where}['images']: expected a map camera -> u8[H, W, 3], got {type(images).__name__}")
    if strict and set(images) != set(spec.cameras):
        raise ObservationError(f"{where}['images']: expected cameras {sorted(spec.cameras)}, "
                               f"got {sorted(map(str, images))}")
    if strict and not isinstance(state, np.ndarray):
        raise ObservationError(f"{where}['state']: expected float32[{spec.state_dim}], got {_describe(state)}")
    if stacked is None:
        stacked = spec.n_obs_steps > 1 and np.ndim(state) == 2
    lead = (spec.n_obs_steps,) if stacked and spec.n_obs_steps > 1 else ()
    lead_txt = f"{lead[0]}, " if lead else ""
    out_images = {}
    for cam, (h, w) in spec.cameras.items():
        if cam not in images:
            raise ObservationError(f"{where}: missing camera '{cam}' (expected cameras {sorted(spec.cameras)}, "
                                   f"got {sorted(map(str, images))})")
        img = images[cam]
        if strict and not isinstance(img, np.ndarray):
            raise ObservationError(f"{where}['images']['{cam}']: expected an ndarray, got {type(img).__name__}")
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.shape != (*lead, h, w, 3):
            raise ObservationError(f"{where}['images']['{cam}']: expected uint8[{lead_txt}{h}, {w}, 3], "
                                   f"got {_describe(img)}")
        out_images[cam] = img
    arr = np.asarray(state)
    if arr.dtype.kind not in "fiu" or arr.shape != (*lead, spec.state_dim):
        raise ObservationError(f"{where}['state']: expected float32[{lead_txt}{spec.state_dim}], got {_describe(arr)}")
    if strict and arr.dtype.kind != "f":
        raise ObservationError(f"{where}['state']: expected float32[{lead_txt}{spec.state_dim}], got {_describe(arr)}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ObservationError(f"{where}['state']: contains NaN or inf")
    return {"images": out_images, "state": arr}
