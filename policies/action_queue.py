"""How a chunking policy turns predicted chunks into one action per env step, per env slot.

- :class:`ActionQueue` (openpi's action-chunk broker, LeRobot's ``select_action``): execute the
  first ``n_action_steps`` actions of each chunk in order, then ask for a new chunk.
- :class:`TemporalEnsemble` (ACT, Zhao et al. 2023): keep every chunk predicted so far that still
  covers the current step and execute the weighted mean of their actions for this step, with
  weights ``w_i = exp(-coeff * i)`` where ``i = 0`` is the *oldest* chunk (ACT's convention: a
  positive ``coeff`` trusts older predictions slightly more, which smooths the motion; ``coeff = 0``
  is a plain mean). A new chunk is still asked for every ``n_action_steps`` steps.

Both answer ``needs_chunk()``, ``add(actions, step)`` with ``actions`` f32[H, A] predicted at env
step ``step``, and ``pop(step) -> f32[A]``.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class ActionQueue:
    """The first ``n_action_steps`` actions of each chunk, executed in order."""

    def __init__(self, n_action_steps: int) -> None:
        self.n_action_steps = int(n_action_steps)
        self._actions: deque[np.ndarray] = deque()  # of f32[A]

    def needs_chunk(self) -> bool:
        return not self._actions

    def left(self) -> int:
        """Actions still queued."""
        return len(self._actions)

    def clear(self) -> None:
        self._actions.clear()

    def add(self, actions: np.ndarray, step: int) -> None:
        self._actions.extend(actions[: self.n_action_steps])

    def pop(self, step: int) -> np.ndarray:
        return self._actions.popleft()


class TemporalEnsemble:
    """ACT's temporal ensembling over all chunks that still cover the current step."""

    def __init__(self, n_action_steps: int, coeff: float) -> None:
        self.n_action_steps = int(n_action_steps)
        self.coeff = float(coeff)
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start step, f32[H, A]), oldest first
        self._since_chunk = 0

    def needs_chunk(self) -> bool:
        return not self._chunks or self._since_chunk >= self.n_action_steps

    def left(self) -> int:
        return 0  # nothing to drop early: every step already averages over the live chunks

    def clear(self) -> None:
        self._chunks.clear()

    def add(self, actions: np.ndarray, step: int) -> None:
        self._chunks.append((int(step), actions))
        self._since_chunk = 0

    def pop(self, step: int) -> np.ndarray:
        self._chunks = [(start, acts) for start, acts in self._chunks if step - start < len(acts)]
        rows = np.stack([acts[step - start] for start, acts in self._chunks])  # (K, A), oldest first
        weights = np.exp(-self.coeff * np.arange(len(rows)))  # (K,)
        self._since_chunk += 1
        return (weights[:, None] * rows).sum(0) / weights.sum()  # (A,)
