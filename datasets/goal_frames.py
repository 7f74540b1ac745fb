"""Goal frames: first frames of episodes labelled with where the hand will first grasp.

A demonstration teaches the goal head (``model.goal_loss_weight``) which object the words name
only once per demonstration: every frame before the first grasp has the same target, so 200
demonstrations are 200 examples of binding a colour and shape to a place. A goal frame is the
same example without the demonstration: an env reset (a few milliseconds) gives the first frame,
the instruction and the full plan, and the scene gives the target, the state the hand will have
where the expert first closes the gripper. Thousands of arrangements cost less than one
expert episode each. ``vla collect goal_frames=N`` writes them; ``vla train
dataset.goal_frames=PATH`` adds ``dataset.goal_frames_batch`` of them to every batch, where only
the goal and plan losses see them (their action chunk and future frame are padding).

On disk (a Zarr v3 group, written to a temporary folder and renamed into place when complete):

    images/<camera>  u8[N, H, W, 3]
    state            f32[N, S]     the observed state at reset
    goal_state       f32[N, S]     the state at the first gripper close (see ``first_grasp_state``)
    attrs            format, version, env, env_options, cameras, image_hw, fps, and per frame
                     task, instruction, plan ("a; b; c": every subtask label in order), seed
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.sampler import PLAN_SEP
from vla.datasets.store import StoreError

FORMAT = "vla-goal-frames"
VERSION = 1


def write_goal_frames(path: str | Path, frames: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a goal-frame store at ``path`` (must not exist). ``frames``: ``images`` {cam: u8[N, H, W, 3]},
    ``state``/``goal_state`` f32[N, S], lists ``task``/``instruction``/``plan``/``seed`` of length N.
    ``meta``: env, env_options, fps. Written beside ``path`` and renamed, so ``path`` is whole or absent."""
    import zarr

    path = Path(path)
    if path.exists():
        raise StoreError(f"goal frames: {path} exists; goal-frame stores are written once "
                         "(remove it or pick another out=)")
    n = len(frames["task"])
    cams = list(frames["images"])
    if n == 0 or not cams:
        raise StoreError(f"goal frames: nothing to write to {path} ({n} frames, cameras {cams})")
    for key in ("instruction", "plan", "seed"):
        if len(frames[key]) != n:
            raise StoreError(f"goal frames: {key} has {len(frames[key])} entries, task has {n}")
    arrays = {f"images/{c}": np.asarray(frames["images"][c], np.uint8) for c in cams}
    arrays["state"] = np.asarray(frames["state"], np.float32)
    arrays["goal_state"] = np.asarray(frames["goal_state"], np.float32)
    for key, a in arrays.items():
        if a.shape[0] != n:
            raise StoreError(f"goal frames: {key} has {a.shape[0]} rows, expected {n}")
    hw = list(arrays[f"images/{cams[0]}"].shape[1:3])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(str(tmp)), mode="w")
        for key, a in arrays.items():
            chunks = (min(256, n), *a.shape[1:])
            z = root.create_array(key, shape=a.shape, dtype=a.dtype, chunks=chunks,
                                  compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3))
            z[...] = a
        root.attrs.update({
            "format": FORMAT, "version": VERSION, "env": str(meta.get("env", "")),
            "env_options": dict(meta.get("env_options") or {}), "fps": float(meta.get("fps", 0.0)),
            "cameras": cams, "image_hw": hw,
            "task": [str(t) for t in frames["task"]], "instruction": [str(t) for t in frames["instruction"]],
            "plan": [str(t) for t in frames["plan"]], "seed": [int(s) for s in frames["seed"]],
        })
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class GoalFrames:
    """A goal-frame store held in memory; :meth:`batch` gives training samples in the layout of
    ``collate_windows`` (action chunk and future frame padded, so only goal and plan losses count)."""

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"goal frames: {self.path} not found (write one with `vla collect goal_frames=N ...`)")
        try:
            root = zarr.open_group(zarr.storage.LocalStore(str(self.path)), mode="r")
            attrs = dict(root.attrs)
        except Exception as e:  # noqa: BLE001 - one clear line for a folder that is not a goal-frame store
            raise StoreError(f"goal frames: {self.path} is not a goal-frame store ({type(e).__name__}: {e})") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(f"goal frames: {self.path} has format {attrs.get('format')!r}, expected {FORMAT!r} "
                             "(an episode store goes in dataset.path, goal frames in dataset.goal_frames)")
        if int(attrs.get("version", 0)) > VERSION:
            raise StoreError(f"goal frames: {self.path} is version {attrs['version']}, newer than {VERSION}")
        self.cameras: list[str] = list(attrs["cameras"])
        self.image_hw = tuple(int(x) for x in attrs["image_hw"])
        self.env, self.env_options = str(attrs["env"]), dict(attrs.get("env_options") or {})
        self.tasks, self.instructions = list(attrs["task"]), list(attrs["instruction"])
        self.plans, self.seeds = list(attrs["plan"]), list(attrs["seed"])
        self.images = {c: np.asarray(root[f"images/{c}"][...]) for c in self.cameras}  # {cam: (N, H, W, 3)}
        self.state = np.asarray(root["state"][...], np.float32)  # (N, S)
        self.goal_state = np.asarray(root["goal_state"][...], np.float32)  # (N, S)
        self.subtasks = [p.split(PLAN_SEP)[0] for p in self.plans]

    def __len__(self) -> int:
        return len(self.tasks)

    def check_compatible(self, store, cameras: Sequence[str], tasks: Sequence[str]) -> None:
        """Raise a StoreError naming the mismatch if these frames cannot join batches of ``store``."""
        where = f"dataset.goal_frames={self.path} with dataset.path={store.path}"
        missing = [c for c in cameras if c not in self.cameras]
        if missing:
            raise StoreError(f"{where}: the model's cameras {list(cameras)} are not all in the goal frames "
                             f"(they have {self.cameras})")
        for c in cameras:
            want = tuple(store.cameras[c])
            if want != self.image_hw:
                raise StoreError(f"{where}: camera {c} is {self.image_hw[0]}x{self.image_hw[1]} in the goal frames "
                                 f"but {want[0]}x{want[1]} in the store")
        if self.state.shape[1] != store.state_dim:
            raise StoreError(f"{where}: state has {self.state.shape[1]} dims in the goal frames, "
                             f"{store.state_dim} in the store")
        if store.env != self.env:
            raise StoreError(f"{where}: the goal frames come from env {self.env!r}, the store from {store.env!r}")
        if self.env_options != store.env_options:
            raise StoreError(f"{where}: env options differ (goal frames {self.env_options}, store "
                             f"{store.env_options}): the frames must show the scenes the store shows")
        other = sorted(set(self.tasks) - set(tasks))
        if other:
            raise StoreError(f"{where}: goal frames of tasks {other} that are not trained on (training tasks: "
                             f"{sorted(set(tasks))})")

    def batch(self, idx: np.ndarray, cameras: Sequence[str], n_obs_steps: int, horizon: int, action_dim: int,
              frame_camera: str) -> dict[str, Any]:
        """Frames ``idx`` as a collated training batch (tensors, like ``collate_windows``): the frame
        repeated over the history (an episode's first step), zero action chunk with every step padding,
        zero future frame marked padding, the full plan, and ``goal_state``."""
        import torch

        idx = np.asarray(idx, np.int64)  # (G,)
        g = len(idx)
        images = {c: torch.from_numpy(np.repeat(self.images[c][idx][:, None], n_obs_steps, 1)) for c in cameras}
        fut = np.zeros((g, *self.images[frame_camera].shape[1:]), np.uint8)  # (G, H, W, 3)
        return {
            "images": images,  # {cam: (G, n_obs, H, W, 3)}
            "state": torch.from_numpy(np.repeat(self.state[idx][:, None], n_obs_steps, 1)),  # (G, n_obs, S)
            "goal_state": torch.from_numpy(self.goal_state[idx]),  # (G, S)
            "action": torch.zeros(g, horizon, action_dim),
            "action_is_pad": torch.ones(g, horizon, dtype=torch.bool),
            "future_image": torch.from_numpy(fut),
            "future_is_pad": torch.ones(g, dtype=torch.bool),
            "episode": torch.full((g,), -1, dtype=torch.int64),
            "step": torch.zeros(g, dtype=torch.int64),
            "instruction": [self.instructions[i] for i in idx.tolist()],
            "subtask": [self.subtasks[i] for i in idx.tolist()],
            "plan": [self.plans[i] for i in idx.tolist()],
            "task": [self.tasks[i] for i in idx.tolist()],
        }


def concat_batches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two collated batches as one (tensors concatenated on dim 0, lists joined); keys only ``a`` has
    (the loader's bookkeeping, e.g. the corrupt-episode notes) stay ``a``'s."""
    import torch

    out: dict[str, Any] = {}
    for key, va in a.items():
        if key not in b:
            out[key] = va
            continue
        vb = b[key]
        if isinstance(va, dict):
            out[key] = {c: torch.cat([va[c], vb[c]]) for c in va}
        elif torch.is_tensor(va):
            out[key] = torch.cat([va, vb.to(va.dtype)])
        else:
            out[key] = list(va) + list(vb)
    return out
