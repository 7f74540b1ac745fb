"""The scripted expert as a :class:`Policy`: the ceiling in evaluations and a sanity check.

Wraps ``vla.envs.make_expert``. Experts are closed-loop controllers that read privileged
simulator state (``info["privileged"]``), so unlike learned policies they need the env's info
dict on every call: ``act(obs, instruction, info)``. The evaluation loop passes infos to every
policy; learned policies ignore them. The subtask label the expert emits is exposed as
``current_subtask`` so expert videos carry the same overlay as VLA videos.

``action_noise > 0`` perturbs what is executed, not what is taught (DART-style collection): each
step, Gaussian noise of that standard deviation (in action units) is added to the move components
(every component but the last, the gripper), clipped to [-1, 1], and the env executes the perturbed
action, while ``recorded_action`` returns the expert's own action for the store. The states then
wander off the expert's path by a few millimetres and the store shows how the expert steers back,
which clean demonstrations never show. The noise of an episode is seeded by its first privileged
vector and ``noise_seed``, so a collection is reproducible whatever order workers finish in.

``noise_corr`` (in [0, 1)) makes that noise a first-order autoregressive process, ``n_t = c n_(t-1) +
sqrt(1 - c^2) e_t`` with ``e_t`` of std ``action_noise``: the same std per step, but a slowly turning push
instead of jitter. The expert's P-control undoes one step's push on the next step, so white noise keeps the
hand within ~``action_noise`` x 2 cm of the expert's path; a correlated push of the same size holds it off the
path for ~1/(1 - c) steps in a row (the hand hovering beside the cube while the label steers it back).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .base import Chunk, Observation, Policy


class ExpertPolicy(Policy):
    """``ExpertPolicy("metaworld", "drawer-open-v3")``; ``task=None`` picks the expert from ``info["task"]``.

    One expert instance per env slot (experts may keep per-episode state), created on demand.
    """

    name = "expert"

    def __init__(self, family: str, task: str | None = None, action_noise: float = 0.0,
                 noise_seed: int = 0, noise_corr: float = 0.0) -> None:
        super().__init__(n_action_steps=1)
        if not (float(action_noise) >= 0.0):
            raise ValueError(f"ExpertPolicy: action_noise must be >= 0 (a standard deviation in action units), "
                             f"got {action_noise}")
        if not (0.0 <= float(noise_corr) < 1.0):
            raise ValueError(f"ExpertPolicy: noise_corr must be in [0, 1) (the noise's correlation from one step "
                             f"to the next), got {noise_corr}")
        self.noise_corr = float(noise_corr)
        self.family = family
        self.task = task
        self.action_noise = float(action_noise)
        self.noise_seed = int(noise_seed)
        self._experts: dict[int, tuple[str, Any]] = {}  # slot -> (task, expert)
        self._subtasks: dict[int, str] = {}
        self._rngs: dict[int, np.random.Generator] = {}  # slot -> the running episode's noise
        self._clean: dict[int, np.ndarray] = {}  # slot -> the expert's own last action (action_noise > 0)
        self._push: dict[int, np.ndarray] = {}  # slot -> the noise of the last step (noise_corr > 0)
        if task is not None:
            self._make(task)  # fail early on an unknown family/task

    def _make(self, task: str) -> Any:
        from vla.envs import make_expert

        return make_expert(self.family, task)

    def _expert_for(self, slot: int, info: dict) -> Any:
        task = self.task or info.get("task")
        if not task:
            raise ValueError(f"ExpertPolicy({self.family}): no task given and info has no 'task' (slot {slot})")
        held = self._experts.get(slot)
        if held is None or held[0] != task:
            expert = self._make(task)
            expert.reset()
            held = (task, expert)
            self._experts[slot] = held
        return held[1]

    def reset(self, env_index: int | None = None) -> None:
        super().reset(env_index)
        slots = list(self._experts) if env_index is None else [int(env_index)]
        for s in slots:
            if s in self._experts:
                self._experts[s][1].reset()
            self._subtasks.pop(s, None)
            self._rngs.pop(s, None)
            self._clean.pop(s, None)
            self._push.pop(s, None)

    def predict_chunks(
        self,
        obs_list: list[Observation],
        instructions: list[str],
        infos: list[dict] | None = None,
        env_indices: list[int] | None = None,
        **_: Any,
    ) -> list[Chunk]:
        if infos is None or any(i is None for i in infos):
            raise ValueError(
                "ExpertPolicy needs the env info dicts (info['privileged']): call act(obs, instruction, info)"
            )
        env_indices = list(range(len(obs_list))) if env_indices is None else env_indices
        chunks = []
        for obs, info, slot in zip(obs_list, infos, env_indices):
            action, subtask = self._expert_for(slot, info).act(obs, info)
            action = np.asarray(action, np.float32)
            self._subtasks[slot] = str(subtask)
            if self.action_noise > 0:
                self._clean[slot] = action
                action = self._perturb(slot, action, info)
            chunks.append(Chunk(action[None], plan=[str(subtask)]))  # (1, A)
        return chunks

    def _perturb(self, slot: int, action: np.ndarray, info: dict) -> np.ndarray:
        rng = self._rngs.get(slot)
        if rng is None:  # the episode's first step: its scene decides the noise
            key = zlib.crc32(np.ascontiguousarray(info["privileged"], np.float64).tobytes())
            rng = self._rngs[slot] = np.random.default_rng([self.noise_seed, key])
        push = rng.normal(0.0, self.action_noise, action.shape[0] - 1)
        if self.noise_corr > 0:
            c = self.noise_corr
            last = self._push.get(slot)
            if last is not None:  # the first step draws from the stationary distribution (std action_noise)
                push = c * last + np.sqrt(1.0 - c * c) * push
            self._push[slot] = push
        noisy = action.copy()
        noisy[:-1] = np.clip(noisy[:-1] + push, -1.0, 1.0)
        return noisy

    def recorded_action(self, env_index: int = 0) -> np.ndarray | None:
        """The expert's own action of slot ``env_index``'s last step when ``action_noise > 0`` (what a store
        keeps); None without noise, where the executed action is the expert's."""
        return self._clean.get(int(env_index))

    def needs_observations(self, env_indices: list[int]) -> list[bool]:
        """Never: the scripted expert acts on the env's privileged state (``info``), not on images."""
        return [False] * len(env_indices)

    def expert(self, env_index: int = 0) -> Any:
        """The scripted expert driving slot ``env_index`` (to read its progress, e.g. ``.k``)."""
        held = self._experts.get(int(env_index))
        if held is None:
            raise KeyError(f"ExpertPolicy: no expert for slot {env_index} yet (it is made on the first act)")
        return held[1]

    def current_subtask(self, env_index: int = 0) -> str | None:
        return self._subtasks.get(int(env_index))
