"""The policy interface every controller in vla implements, and the action-queue broker they share.

A policy maps a raw environment observation (``{"images": {cam: u8[H, W, 3]}, "state": f32[S]}``)
plus a language instruction to actions in raw env units. Chunking policies predict ``H`` actions
at once (:class:`Chunk`) and execute the first ``n_action_steps`` of them from a queue before they
query the model again (LeRobot's ``select_action`` / openpi's action-chunk broker).

Everything is batched across environments: a policy keeps one queue per *env slot*, so a vector
env of N sub-environments calls ``act_batch(obs_list, instructions, env_indices=...)`` and only the
slots whose queues ran dry are sent to the model, in one batch. ``act(obs, instruction)`` is the
single-env case (slot 0).

Batches stay full with ``refill_below = k``: when some env's queue runs dry, every env with at most
``k`` actions left also drops them and takes a fresh chunk from the same model call. Envs whose
episodes started at different steps then share one call per cycle instead of one call each (at
the price of executing a few chunks only partly, which is also what a more reactive policy does).

Optional temporal ensembling (ACT) instead of the plain queue: see ``action_queue.py``, which
holds both ways of turning chunks into per-step actions. :class:`PolicyProtocol` is what the
evaluation loop and the policy server rely on; :class:`Policy` implements it once for every policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vla.observation import Observation  # the one documented format (vla/observation.py)

from .action_queue import ActionQueue, TemporalEnsemble


@dataclass
class Chunk:
    """One prediction of a policy.

    ``actions``: f32[H, A] in raw env units (unnormalized), the first row is for the current step.
    ``plan``: the remaining subtasks as decoded text (one string per subtask), or None when the
    policy does not plan. ``frame``: the predicted future camera image u8[h, w, 3], or None.
    """

    actions: np.ndarray
    plan: list[str] | None = None
    frame: np.ndarray | None = None

    def __post_init__(self) -> None:
        actions = np.asarray(self.actions, dtype=np.float32)
        if actions.ndim == 1:
            actions = actions[None]  # (1, A): a closed-loop policy predicts one step
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise ValueError(f"Chunk.actions: expected f32[H, A] with H >= 1, got shape {tuple(actions.shape)}")
        if not np.all(np.isfinite(actions)):
            raise ValueError("Chunk.actions: contains NaN or inf")
        self.actions = actions
        if self.frame is not None:
            frame = np.asarray(self.frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"Chunk.frame: expected u8[h, w, 3], got {frame.dtype}{list(frame.shape)}")

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])


class PolicyProtocol(Protocol):
    """What the evaluation loop (``vla.envs.rollout``) and the policy server call on a policy."""

    name: str
    n_action_steps: int

    def reset(self, env_index: int | None = None) -> None: ...

    def act(self, obs: Observation, instruction: str, info: dict | None = None) -> np.ndarray: ...

    def act_batch(self, obs_list: list[Observation], instructions: list[str], infos: list[dict] | None = None,
                  env_indices: list[int] | None = None) -> np.ndarray: ...

    def current_plan(self, env_index: int = 0) -> list[str] | None: ...

    def current_subtask(self, env_index: int = 0) -> str | None: ...

    def close(self) -> None: ...


@dataclass
class _Slot:
    """Per-environment state: how chunks become actions (queue or ensemble) and the latest plan."""

    actions: ActionQueue | TemporalEnsemble
    steps: int = 0  # env steps taken since reset
    plan: list[str] | None = None
    plan_step: int = -1  # the step at which `plan` was decoded
    frame: np.ndarray | None = None
    chunks_predicted: int = 0
    history: list = field(default_factory=list)  # the last n_obs_steps observations, oldest first


class Policy:
    """Base class: per-env action queues over ``predict_chunks``.

    Subclasses implement ``predict_chunks`` (batched; preferred) or ``predict_chunk`` (single),
    and may override ``act_batch`` entirely when they are closed-loop (the scripted expert).
    ``infos`` (the env's info dicts) are passed through for policies that need privileged state;
    learned policies ignore them.
    """

    n_obs_steps: int = 1  # observations per model input (history); subclasses set it from their model

    def __init__(self, n_action_steps: int = 1, temporal_ensemble: float | None = None) -> None:
        if int(n_action_steps) < 1:
            raise ValueError(f"n_action_steps: expected an integer >= 1, got {n_action_steps}")
        if temporal_ensemble is not None and not math.isfinite(float(temporal_ensemble)):
            raise ValueError(f"temporal_ensemble: expected None or a finite coefficient, got {temporal_ensemble}")
        self.n_action_steps = int(n_action_steps)
        self.temporal_ensemble = None if temporal_ensemble is None else float(temporal_ensemble)
        # When > 0, a batched model call also refreshes envs with at most this many queued actions
        # left (see act_batch); vla.evaluation sets it for vector envs to keep batches full.
        self.refill_below = 0
        self._slots: dict[int, _Slot] = {}

    # ---- to implement -------------------------------------------------------------------------
    def predict_chunk(self, obs: Observation, instruction: str, info: dict | None = None) -> Chunk:
        """Predict one chunk for one observation (no queue involved)."""
        if type(self).predict_chunks is Policy.predict_chunks:
            raise NotImplementedError(f"{type(self).__name__} implements neither predict_chunk nor predict_chunks")
        return self.predict_chunks([obs], [instruction], None if info is None else [info])[0]

    def predict_chunks(
        self,
        obs_list: list[Observation],
        instructions: list[str],
        infos: list[dict] | None = None,
        env_indices: list[int] | None = None,
    ) -> list[Chunk]:
        """Predict one chunk per observation. ``env_indices`` name the slots (for per-env plan state)."""
        if type(self).predict_chunk is Policy.predict_chunk:
            raise NotImplementedError(f"{type(self).__name__} implements neither predict_chunk nor predict_chunks")
        infos = infos or [None] * len(obs_list)
        return [self.predict_chunk(o, s, i) for o, s, i in zip(obs_list, instructions, infos)]

    # ---- queue broker -------------------------------------------------------------------------
    def reset(self, env_index: int | None = None) -> None:
        """Forget queues and plans: of every env (``None``) or of one env slot."""
        if env_index is None:
            self._slots.clear()
        else:
            self._slots.pop(int(env_index), None)

    def slot(self, env_index: int = 0) -> _Slot:
        i = int(env_index)
        if i not in self._slots:
            self._slots[i] = _Slot(ActionQueue(self.n_action_steps) if self.temporal_ensemble is None
                                   else TemporalEnsemble(self.n_action_steps, self.temporal_ensemble))
        return self._slots[i]

    def act(self, obs: Observation, instruction: str, info: dict | None = None) -> np.ndarray:
        """One action f32[A] for a single env (slot 0), popped from the queue."""
        return self.act_batch([obs], [instruction], None if info is None else [info], env_indices=[0])[0]

    def act_batch(
        self,
        obs_list: list[Observation],
        instructions: list[str],
        infos: list[dict] | None = None,
        env_indices: list[int] | None = None,
    ) -> np.ndarray:
        """One action per env, f32[N, A]. Envs whose queue is empty are predicted together in one batch."""
        n = len(obs_list)
        if len(instructions) != n:
            raise ValueError(f"act_batch: {n} observations but {len(instructions)} instructions")
        if infos is not None and len(infos) != n:
            raise ValueError(f"act_batch: {n} observations but {len(infos)} infos")
        env_indices = list(range(n)) if env_indices is None else [int(i) for i in env_indices]
        if len(env_indices) != n or len(set(env_indices)) != n:
            raise ValueError(f"act_batch: env_indices must be {n} distinct slots, got {env_indices}")
        slots = [self.slot(i) for i in env_indices]
        self.observe(obs_list, env_indices)
        need = [k for k, s in enumerate(slots) if s.actions.needs_chunk()]
        if need and self.refill_below > 0:
            # Piggyback: envs whose queue is nearly empty drop its tail and take a fresh chunk in this
            # batch, so envs that started at different steps fall back into one model call per cycle.
            extra = [k for k, s in enumerate(slots)
                     if 0 < s.actions.left() <= self.refill_below and "images" in obs_list[k]]  # rendered
            for k in extra:
                slots[k].actions.clear()
            need = sorted(need + extra)
        if need:
            chunks = self.predict_chunks(
                [obs_list[k] for k in need],
                [instructions[k] for k in need],
                None if infos is None else [infos[k] for k in need],
                env_indices=[env_indices[k] for k in need],
            )
            for k, chunk in zip(need, chunks):
                self._take_chunk(slots[k], chunk)
        actions = [self._pop(s) for s in slots]
        return np.stack(actions).astype(np.float32)  # (N, A)

    def needs_observations(self, env_indices: list[int]) -> list[bool]:
        """Whether the next ``act_batch`` will read each slot's next observation (called by the rollout
        engine after this step's actions were popped, so the env can skip rendering the rest): a slot
        whose queue is empty predicts a chunk; with ``refill_below`` a slot with at most that many
        actions left joins when another slot predicts; with history (``n_obs_steps > 1``) every
        observation is kept. A temporal ensemble reads every step."""
        if self.n_obs_steps > 1:
            return [True] * len(env_indices)
        left = [self.slot(i).actions.left() for i in env_indices]
        due = any(n == 0 for n in left)
        return [n == 0 or (due and n <= self.refill_below) for n in left]

    def observe(self, obs_list: list[Observation], env_indices: list[int]) -> None:
        """Called with every observation before actions are chosen: keeps ``n_obs_steps`` of history."""
        if self.n_obs_steps > 1:
            for obs, i in zip(obs_list, env_indices):
                self._push_history(self.slot(i), obs)

    def _push_history(self, slot: _Slot, obs: Observation) -> None:
        if not slot.history:  # before the episode start: the first observation repeated (as in training)
            slot.history.extend([obs] * self.n_obs_steps)
        else:
            slot.history.append(obs)
        del slot.history[: -self.n_obs_steps]

    def stacked_observation(self, env_index: int, obs: Observation) -> Observation:
        """``obs`` itself, or with ``n_obs_steps > 1`` the env's history stacked oldest first:
        ``{"images": {cam: u8[T, H, W, 3]}, "state": f32[T, S]}``. Already stacked input passes through."""
        if self.n_obs_steps == 1 or np.ndim(obs["state"]) == 2:
            return obs
        slot = self.slot(env_index)
        if not slot.history:  # predict_chunk called directly, without act
            self._push_history(slot, obs)
        hist = slot.history
        return {
            "images": {cam: np.stack([h["images"][cam] for h in hist]) for cam in obs["images"]},  # (T, H, W, 3)
            "state": np.stack([np.asarray(h["state"], np.float32) for h in hist]),  # (T, S)
        }

    def _take_chunk(self, slot: _Slot, chunk: Chunk) -> None:
        slot.chunks_predicted += 1
        if chunk.plan is not None:
            slot.plan = list(chunk.plan)
        if chunk.frame is not None:
            slot.frame = chunk.frame
        slot.actions.add(chunk.actions, slot.steps)

    def _pop(self, slot: _Slot) -> np.ndarray:
        action = slot.actions.pop(slot.steps)
        slot.steps += 1
        return action

    # ---- introspection for videos and records ---------------------------------------------------
    def current_plan(self, env_index: int = 0) -> list[str] | None:
        """The most recently decoded plan of one env (remaining subtasks), or None."""
        s = self._slots.get(int(env_index))
        return None if s is None or s.plan is None else list(s.plan)

    def current_subtask(self, env_index: int = 0) -> str | None:
        """The subtask being executed now: the first entry of the current plan."""
        plan = self.current_plan(env_index)
        return plan[0] if plan else None

    def chunks_predicted(self, env_index: int = 0) -> int:
        s = self._slots.get(int(env_index))
        return 0 if s is None else s.chunks_predicted

    def close(self) -> None:
        """Release resources (connections, processes). The base policy holds none."""

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
