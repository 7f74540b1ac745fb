"""``WindowDataset``: training windows over an ``EpisodeStore`` (a torch ``Dataset``).

One sample per step t of every selected episode (global row r, episode rows [s, e)):

- ``images[cam]``  u8[n_obs_steps, H, W, 3]  rows max(r - n_obs_steps + 1 + k, s), k = 0..n-1
- ``state``        f32[n_obs_steps, S]       same rows
- ``action``       f32[horizon, A]           rows min(r + k, e - 1); ``action_is_pad`` = r + k > e - 1
- ``future_image`` u8[H, W, 3]               ``frame_camera`` at min(r + frame_offset, e - 1);
                                             ``future_is_pad`` = r + frame_offset > e - 1
- ``subtask``      the label at t; ``plan`` the remaining *distinct consecutive* labels from t
                   to the episode end joined by "; " (labels a,a,b,b,c: t=1 -> "a; b; c",
                   t=3 -> "b; c"); ``instruction``, ``task``, ``episode``, ``step`` (t).
- ``goal_state``   f32[S]                    the state at the episode's next gripper switch after t
                   (the first row k > r whose gripper command, the action's last entry, has the
                   other sign than at row k - 1: where the hand grasps or lets go), else at e - 1.
                   The auxiliary target of ``model.goal_loss_weight``: where the named object or
                   receptacle is, read from the demonstration's own future.

Speed: all index math is precomputed per row as numpy arrays, plan strings are interned per
(episode, segment), and ``__getitems__`` (used by torch's DataLoader for batched fetching)
gathers a whole batch with one fancy-index per array. It returns a ``WindowBatch`` -- a lazy
sequence of per-sample dicts that torch's default collate accepts -- and ``collate_windows``
turns a ``WindowBatch`` into tensors without re-stacking. Use
``DataLoader(ds, batch_size=64, collate_fn=collate_windows)`` for the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from vla.datasets.store import EpisodeStore, StoreError

try:  # torch is a hard dependency of vla, but keep the store usable without it
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


PLAN_SEP = "; "


def join_plan(labels: Sequence[str]) -> str:
    """A plan's text: its labels with consecutive repeats merged, joined by ``PLAN_SEP`` (a,a,b -> "a; b")."""
    return PLAN_SEP.join(lab for i, lab in enumerate(labels) if i == 0 or lab != labels[i - 1])


class WindowBatch(Sequence):
    """A batch of windows as stacked numpy arrays; indexing gives the per-sample dict (views)."""

    def __init__(self, arrays: dict[str, Any]) -> None:
        self.arrays = arrays
        self._n = len(arrays["step"])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not -self._n <= i < self._n:
            raise IndexError(f"WindowBatch index {i} out of range for batch of {self._n}")
        a = self.arrays
        return {
            "images": {cam: v[i] for cam, v in a["images"].items()},
            "state": a["state"][i],
            "goal_state": a["goal_state"][i],
            "action": a["action"][i],
            "action_is_pad": a["action_is_pad"][i],
            "instruction": a["instruction"][i],
            "subtask": a["subtask"][i],
            "plan": a["plan"][i],
            "future_image": a["future_image"][i],
            "future_is_pad": bool(a["future_is_pad"][i]),
            "task": a["task"][i],
            "episode": int(a["episode"][i]),
            "step": int(a["step"][i]),
        }


def collate_windows(batch: WindowBatch | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate windows into tensors: images u8[B, n_obs, H, W, 3], state f32[B, n_obs, S],
    goal_state f32[B, S], action f32[B, horizon, A], action_is_pad bool[B, horizon], future_image u8[B, H, W, 3],
    future_is_pad bool[B], episode/step int64[B]; strings stay lists of str."""
    import torch

    if isinstance(batch, WindowBatch):
        a = batch.arrays
    else:
        samples = list(batch)
        if not samples:
            raise ValueError("collate_windows: empty batch")
        a = {
            "images": {cam: np.stack([s["images"][cam] for s in samples]) for cam in samples[0]["images"]},
            **{k: np.stack([np.asarray(s[k]) for s in samples]) for k in
               ("state", "goal_state", "action", "action_is_pad", "future_image", "future_is_pad", "episode", "step")},
            **{k: [s[k] for s in samples] for k in ("instruction", "subtask", "plan", "task")},
        }
    return {
        "images": {cam: torch.from_numpy(np.ascontiguousarray(v)) for cam, v in a["images"].items()},
        "state": torch.from_numpy(np.ascontiguousarray(a["state"], np.float32)),
        "goal_state": torch.from_numpy(np.ascontiguousarray(a["goal_state"], np.float32)),
        "action": torch.from_numpy(np.ascontiguousarray(a["action"], np.float32)),
        "action_is_pad": torch.from_numpy(np.ascontiguousarray(a["action_is_pad"], np.bool_)),
        "future_image": torch.from_numpy(np.ascontiguousarray(a["future_image"])),
        "future_is_pad": torch.from_numpy(np.ascontiguousarray(a["future_is_pad"], np.bool_)),
        "episode": torch.from_numpy(np.asarray(a["episode"], np.int64)),
        "step": torch.from_numpy(np.asarray(a["step"], np.int64)),
        "instruction": list(a["instruction"]),
        "subtask": list(a["subtask"]),
        "plan": list(a["plan"]),
        "task": list(a["task"]),
    }


class WindowDataset(_TorchDataset):
    """Windows of history, action chunk, text and future frame; see the module docstring.

    ``cameras`` (default: all of the store's) are the observation cameras; ``frame_camera``
    (default: the first of them) provides ``future_image``; ``episodes`` selects episodes
    (default: all).
    """

    def __init__(
        self,
        store: EpisodeStore,
        n_obs_steps: int = 1,
        horizon: int = 16,
        frame_offset: int = 8,
        frame_camera: str | None = None,
        cameras: Sequence[str] | None = None,
        episodes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if not isinstance(store, EpisodeStore):
            raise StoreError(f"WindowDataset: store must be an EpisodeStore, got {type(store).__name__}")
        checks = (("n_obs_steps", n_obs_steps, 1), ("horizon", horizon, 1), ("frame_offset", frame_offset, 0))
        for name, val, lo in checks:
            if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < lo:
                raise StoreError(f"WindowDataset: {name} must be an int >= {lo}, got {val!r}")
        self.store = store
        self.n_obs_steps, self.horizon, self.frame_offset = int(n_obs_steps), int(horizon), int(frame_offset)
        have = list(store.cameras)
        self.cameras = list(have if cameras is None else cameras)
        unknown = [c for c in self.cameras if c not in have]
        if unknown or not self.cameras:
            raise StoreError(f"WindowDataset: cameras {unknown or self.cameras} not in the store's cameras {have}")
        self.frame_camera = self.cameras[0] if frame_camera is None else frame_camera
        if self.frame_camera not in have:
            raise StoreError(f"WindowDataset: frame_camera '{self.frame_camera}' not in the store's cameras {have}")

        n_ep = store.num_episodes
        if episodes is None:
            eps = np.arange(n_ep, dtype=np.int64)
        else:
            eps = np.asarray(list(episodes), dtype=np.int64).reshape(-1)
            bad = eps[(eps < 0) | (eps >= n_ep)]
            if bad.size:
                raise StoreError(f"WindowDataset: episodes {bad.tolist()} out of range; the store has {n_ep} episodes")
        self.episodes = eps
        starts_all, ends_all = store.episode_starts, store.episode_ends
        lengths = ends_all[eps] - starts_all[eps]  # (E_sel,)
        # Per-sample arrays (one entry per selected step).
        self._ep = np.repeat(eps, lengths)  # (M,)
        self._start = np.repeat(starts_all[eps], lengths)  # (M,)
        self._last = np.repeat(ends_all[eps] - 1, lengths)  # (M,) last row of the episode
        offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self._row = self._start + offsets  # (M,) global row of step t
        self._obs_off = np.arange(-self.n_obs_steps + 1, 1, dtype=np.int64)  # (n_obs,)
        self._act_off = np.arange(self.horizon, dtype=np.int64)  # (horizon,)

        self._action = store.lowdim("action")  # (N, A)
        self._state = store.lowdim("state")  # (N, S)
        subtask = store.lowdim("subtask")  # (N,)
        self._subtask_ids = subtask
        self._plan_id, self._plan_table, self._stage = self._build_plans(subtask, eps, starts_all, ends_all)
        self._instr = np.array(store.episode_instructions, dtype=object)  # (E,)
        self._task = np.array(store.episode_tasks, dtype=object)  # (E,)
        self._subtask_table = np.array(store.subtask_table, dtype=object)
        self._goal_row = self._gripper_switch_rows(starts_all[eps], ends_all[eps])  # (M,)

    def _gripper_switch_rows(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per sample row r: the first row k > r of its episode where the gripper command (the last
        action entry, closed when > 0) differs from row k - 1's, else the episode's last row."""
        closed = self._action[:, -1] > 0  # (N,)
        goal = np.empty(len(self._row), np.int64)  # (M,)
        pos = 0
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            switch = s + 1 + np.flatnonzero(closed[s + 1:e] != closed[s:e - 1])  # (K,) rows where it changes
            rows = np.arange(s, e)
            k = np.searchsorted(switch, rows, side="right")  # first switch row > r
            goal[pos:pos + e - s] = np.append(switch, e - 1)[k]
            pos += e - s
        return goal

    def _build_plans(self, subtask, eps, starts, ends) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-row plan id into a table of plan strings (one per (episode, label segment)), the table, and
        per-row stage: the index of the row's label segment in its episode (0 = the first subtask)."""
        table_index: dict[str, int] = {}
        table: list[str] = []
        plan_id = np.zeros(len(self._row), np.int64)  # (M,)
        stage = np.zeros(len(self._row), np.int64)  # (M,)
        pos = 0
        names = self.store.subtask_table
        for e in eps:
            s, t_end = int(starts[e]), int(ends[e])
            lab = subtask[s:t_end]  # (T,)
            change = np.flatnonzero(np.diff(lab)) + 1  # first row of each new segment
            seg_start = np.concatenate([[0], change])  # (K,)
            seg_labels = [names[j] for j in lab[seg_start]]
            ids = []
            for k in range(len(seg_labels)):
                text = join_plan(seg_labels[k:])
                j = table_index.get(text)
                if j is None:
                    j = table_index[text] = len(table)
                    table.append(text)
                ids.append(j)
            seg_of_row = np.cumsum(np.isin(np.arange(len(lab)), change))  # (T,) segment index per step
            plan_id[pos:pos + len(lab)] = np.asarray(ids, np.int64)[seg_of_row]
            stage[pos:pos + len(lab)] = seg_of_row
            pos += len(lab)
        return plan_id, np.array(table, dtype=object), stage

    def __len__(self) -> int:
        return int(len(self._row))

    @property
    def sample_tasks(self) -> list[str]:
        """The task of every sample, in sample order (for task-balanced sampling)."""
        return self._task[self._ep].tolist()

    @property
    def sample_stages(self) -> np.ndarray:
        """int64[M]: the stage of every sample, in sample order: which of its episode's subtasks (label
        segments, 0 = the first) the step belongs to (for subtask-balanced sampling)."""
        return self._stage.copy()

    def index_of(self, episode: int, step: int) -> int:
        """Sample index of (episode, step) -- the inverse of the "episode"/"step" fields."""
        hits = np.flatnonzero(self._ep == episode)
        if hits.size == 0 or not 0 <= step < hits.size:
            raise IndexError(f"WindowDataset: (episode {episode}, step {step}) is not in this dataset")
        return int(hits[0] + step)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not -n <= i < n:
            raise IndexError(f"WindowDataset: index {i!r} out of range for {n} samples")
        return self.__getitems__([int(i) % n])[0]

    def __getitems__(self, indices: Sequence[int]) -> WindowBatch:
        """A whole batch at once (torch's DataLoader calls this when it exists)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (B,)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"WindowDataset: indices out of range for {n} samples")
        idx = idx % max(n, 1)
        row, start, last = self._row[idx], self._start[idx], self._last[idx]  # (B,) each
        obs_rows = np.maximum(row[:, None] + self._obs_off[None, :], start[:, None])  # (B, n_obs)
        act_raw = row[:, None] + self._act_off[None, :]  # (B, horizon)
        act_pad = act_raw > last[:, None]  # (B, horizon)
        act_rows = np.minimum(act_raw, last[:, None])  # (B, horizon)
        fut_raw = row + self.frame_offset  # (B,)
        fut_pad = fut_raw > last  # (B,)
        fut_rows = np.minimum(fut_raw, last)  # (B,)
        b, k = obs_rows.shape
        images = {}
        for cam in self.cameras:
            if cam == self.frame_camera:  # one read for history + future frame
                both = np.concatenate([obs_rows.reshape(-1), fut_rows])  # (B*n_obs + B,)
                frames = self.store.read_frames(cam, both)  # (B*n_obs + B, H, W, 3)
                images[cam] = frames[: b * k].reshape((b, k) + frames.shape[1:])  # (B, n_obs, H, W, 3)
                future = frames[b * k:]  # (B, H, W, 3)
            else:
                frames = self.store.read_frames(cam, obs_rows.reshape(-1))  # (B*n_obs, H, W, 3)
                images[cam] = frames.reshape((b, k) + frames.shape[1:])  # (B, n_obs, H, W, 3)
        if self.frame_camera not in self.cameras:
            future = self.store.read_frames(self.frame_camera, fut_rows)  # (B, H, W, 3)
        ep = self._ep[idx]  # (B,)
        arrays = {
            "images": images,
            "state": self._state[obs_rows],  # (B, n_obs, S)
            "goal_state": self._state[self._goal_row[idx]],  # (B, S)
            "action": self._action[act_rows],  # (B, horizon, A)
            "action_is_pad": act_pad,
            "future_image": future,
            "future_is_pad": fut_pad,
            "episode": ep,
            "step": row - start,  # (B,)
            "instruction": self._instr[ep].tolist(),
            "task": self._task[ep].tolist(),
            "subtask": self._subtask_table[self._subtask_ids[row]].tolist(),
            "plan": self._plan_table[self._plan_id[idx]].tolist(),
        }
        return WindowBatch(arrays)
