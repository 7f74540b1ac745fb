"""Synthetic episodes for the store/sampler tests (not collected by pytest: no test_ prefix)."""

from __future__ import annotations

import numpy as np
from vla.datasets import EpisodeWriter

CAMERAS = {"front": (8, 10), "wrist": (6, 6)}
A, S = 3, 4


def make_episode(seed: int, length: int, labels: list[str] | None = None, with_optional: bool = False) -> dict:
    """One deterministic episode with two cameras; ``labels`` defaults to two subtask segments."""
    rng = np.random.default_rng(seed)
    if labels is None:
        k = max(1, length // 2)
        labels = ["reach"] * k + ["grasp"] * (length - k)
    ep = {
        "action": rng.normal(size=(length, A)).astype(np.float32),
        "state": rng.normal(size=(length, S)).astype(np.float32),
        "images": {
            cam: rng.integers(0, 256, size=(length, h, w, 3), dtype=np.uint8) for cam, (h, w) in CAMERAS.items()
        },
        "subtasks": list(labels),
        "instruction": f"instruction {seed % 3}",
        "task": f"task-{seed % 2}",
        "seed": int(seed),
    }
    if with_optional:
        ep["reward"] = rng.normal(size=(length,)).astype(np.float32)
        ep["success"] = np.arange(length) == length - 1
    return ep


def open_writer(path, **overrides) -> EpisodeWriter:
    kw = {"env": "synthetic", "fps": 10, "cameras": CAMERAS, "action_dim": A, "state_dim": S}
    kw.update(overrides)
    return EpisodeWriter(path, **kw)


def write_store(path, lengths=(5, 7, 4), with_optional: bool = False) -> list[dict]:
    """Write episodes of these lengths (seeds 0, 1, ...) and return them."""
    eps = [make_episode(i, n, with_optional=with_optional) for i, n in enumerate(lengths)]
    with open_writer(path) as w:
        for ep in eps:
            w.add_episode(**ep)
    return eps


# Points of the writer's commit protocol where the crash tests stop it, found from outside the
# library by wrapping zarr's array methods: (method, array path). "after_data": the data rows are
# written, the meta entries are not; "before_commit": everything but meta/episode_ends is
# written; "torn_commit": episode_ends is resized but its new entry not yet written.
STOP_POINTS = {
    "after_data": ("resize", "meta/episode_instruction"),
    "before_commit": ("resize", "meta/episode_ends"),
    "torn_commit": ("__setitem__", "meta/episode_ends"),
}


def stop_writer_at(stage: str, action, patch=None) -> None:
    """Call ``action(stage)`` when the writer reaches ``stage`` of its commit protocol.

    ``patch(obj, name, value)`` installs the wrapper (pytest's ``monkeypatch.setattr`` in-process;
    plain ``setattr`` in a subprocess that is killed anyway).
    """
    import zarr

    method, array_path = STOP_POINTS[stage]
    original = getattr(zarr.Array, method)

    def wrapper(self, *args, **kwargs):
        if self.path == array_path:
            action(stage)
        return original(self, *args, **kwargs)

    (patch or setattr)(zarr.Array, method, wrapper)
