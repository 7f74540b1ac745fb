"""MetaWorld v3 adapter: the 50 Sawyer tasks behind the `vla.envs` observation contract.

``MetaWorldEnv`` wraps one MetaWorld task as a Gymnasium env with

* observations ``{"images": {cam: uint8[H, W, 3]}, "state": float32[4]}`` — images upright from
  any MetaWorld camera (default ``corner`` and ``gripperPOV``), rendered with the fast CPU flags
  of :mod:`vla.envs.rendering`; ``state`` is proprioception only: hand xyz and gripper opening
  (``obs[:4]`` of MetaWorld's 39-dim vector). Object and goal positions are *not* in the state —
  a learned policy must find them in the images, as on a real robot;
* ``info["privileged"]``: the raw 39-dim MetaWorld vector (hand, gripper, object poses, goal),
  which only the scripted expert reads;
* ``info["instruction"]`` from the task's paraphrases (:mod:`vla.envs.metaworld_tasks`), train or
  held-out eval split, sampled from the reset seed or set with ``reset(options={"instruction": s})``;
* actions in ``[-1, 1]^4`` (xyz hand displacement, gripper effort), 80 control steps per second.

Seeding. ``gym.make("Meta-World/MT1")`` samples tasks from a fixed list of 50 goals drawn with
NumPy's global RNG, and each make costs ~1-1.5 s. Instead we construct the task's env class once
(~0.15 s), give it the goal-observable task data MT1 uses, and switch it to MetaWorld's own
"seeded rand_vec" mode: every ``reset(seed=s)`` re-seeds the env's generator with ``s`` and
MetaWorld draws the object/goal placement from the task's ``_random_reset_space`` (with its own
rejection rules, e.g. object and goal not too close). So one env serves many episodes, each
episode seed gives a different but exactly reproducible layout, and ``reset()`` without a seed
continues deterministically from the last seeded reset. The same seed always gives the same
first observation.

Episode length. MetaWorld's 500 steps are far more than the experts need. Measured over 20 seeds
per task (`vla bench env`): successful expert episodes take 36-125 steps on average, at most 143
steps for all but six tasks; those get longer limits (bin-picking-v3 max 264, peg-insert-side-v3
249, push-back-v3 356, disassemble-v3 182, stick-pull-v3 197, peg-unplug-side-v3 165). The default
limit is ``DEFAULT_MAX_EPISODE_STEPS`` = 200 with those per-task overrides, see
:func:`default_max_episode_steps`; the experts' remaining failures are not cut off by it (they
fail at 500 steps too). Success does not end an episode unless
``terminate_on_success=True`` (collection and evaluation use it to save time).

``MetaWorldExpert`` wraps ``metaworld.policies.ENV_POLICY_MAP[task]`` and labels every step with a
subtask (:class:`SubtaskLabeler`).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from vla.envs.metaworld_tasks import TASK_NAMES, TASK_TEXT, MetaWorldTaskText
from vla.envs.registry import EnvFamily

CAMERAS: tuple[str, ...] = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
DEFAULT_CAMERAS: tuple[str, ...] = ("corner", "gripperPOV")
STATE_NAMES: tuple[str, ...] = ("hand_x", "hand_y", "hand_z", "gripper_opening")
ACTION_NAMES: tuple[str, ...] = ("dx", "dy", "dz", "grip")
FPS = 80  # MetaWorld: frame_skip 5 x timestep 2.5 ms = 12.5 ms per control step
DEFAULT_MAX_EPISODE_STEPS = 200
# Tasks whose expert sometimes needs longer (measured with `vla bench env`, 20+ seeds each).
_MAX_STEPS_OVERRIDES: dict[str, int] = {
    "bin-picking-v3": 300,
    "disassemble-v3": 300,
    "peg-insert-side-v3": 300,
    "peg-unplug-side-v3": 300,
    "push-back-v3": 400,
    "stick-pull-v3": 300,
}


def list_tasks() -> list[str]:
    """All 50 MetaWorld v3 task names, sorted."""
    return list(TASK_NAMES)


def default_max_episode_steps(task: str) -> int:
    """Default episode limit of ``task``: enough for the scripted expert with margin."""
    _check_task(task)
    return _MAX_STEPS_OVERRIDES.get(task, DEFAULT_MAX_EPISODE_STEPS)


def _check_task(task: str) -> MetaWorldTaskText:
    if task not in TASK_TEXT:
        raise ValueError(f"unknown MetaWorld task {task!r}; available tasks: {', '.join(TASK_NAMES)}")
    return TASK_TEXT[task]


def instructions(task: str, split: str = "train") -> tuple[str, ...]:
    """The paraphrases of ``task`` in ``split`` ("train" or "eval"; "all" gives both). MetaWorld's eval
    split holds out wording only, so "paraphrase" (the tabletop suite's wording-only split) is "eval"."""
    text = _check_task(task)
    if split == "train":
        return text.train
    if split in ("eval", "paraphrase"):
        return text.eval
    if split == "all":
        return text.train + text.eval
    raise ValueError(f"instruction_split must be 'train', 'eval', 'paraphrase' or 'all', got {split!r}")


def _make_metaworld_env(task: str) -> Any:
    """The task's raw MetaWorld env, goal-observable, drawing a fresh layout on every reset."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.types import Task

    cls = ALL_V3_ENVIRONMENTS[task]
    env = cls()
    # Same task data as MT1 (goal in the observation; the experts read it), with a placeholder
    # rand_vec: we unfreeze the rand_vec right after, so each reset samples its own from the seed.
    data = {"rand_vec": np.zeros(env._random_reset_space.low.size), "env_cls": cls, "partially_observable": False}
    env.set_task(Task(env_name=task, data=pickle.dumps(data)))
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    return env


class MetaWorldEnv(gym.Env):
    """One MetaWorld v3 task with image + proprioception observations (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": FPS}
    action_names = ACTION_NAMES
    state_names = STATE_NAMES

    def __init__(
        self,
        task: str,
        *,
        seed: int | None = None,
        cameras: Sequence[str] = DEFAULT_CAMERAS,
        image_size: int | Sequence[int] = 64,
        instruction_split: str = "train",
        max_episode_steps: int | None = None,
        terminate_on_success: bool = False,
        render_mode: str | None = None,
    ) -> None:
        from vla.envs.rendering import image_hw

        self.task = task
        self._text = _check_task(task)
        self._instructions = instructions(task, instruction_split)
        self.instruction_split = instruction_split
        if isinstance(cameras, str):
            cameras = (cameras,)
        self.cameras = tuple(cameras)
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown MetaWorld camera(s) {unknown}; available cameras: {list(CAMERAS)}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be distinct, got {list(self.cameras)}")
        self.image_size = image_hw(image_size)
        if max_episode_steps is None:
            max_episode_steps = default_max_episode_steps(task)
        if int(max_episode_steps) < 1:
            raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
        self.max_episode_steps = int(max_episode_steps)
        self.terminate_on_success = bool(terminate_on_success)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode

        self._mw = _make_metaworld_env(task)
        # Our own limit truncates; keep MetaWorld's internal limit out of the way.
        self._mw.max_path_length = max(self._mw.max_path_length, self.max_episode_steps + 1)
        self._renderer = None  # created on first render: the GL context lives in the process that renders

        h, w = self.image_size
        self.observation_space = gym.spaces.Dict(
            {
                "images": gym.spaces.Dict(
                    {c: gym.spaces.Box(0, 255, (h, w, 3), np.uint8) for c in self.cameras}
                ),
                "state": gym.spaces.Box(-np.inf, np.inf, (len(STATE_NAMES),), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (len(ACTION_NAMES),), np.float32)
        self.instruction: str = self._instructions[0]
        self.episode_seed: int | None = None
        self._raw: np.ndarray | None = None
        self._images: dict[str, np.ndarray] = {}
        # False: step() returns {"state"} without "images" (nothing rendered; reset always renders). The
        # rollout engine clears it for steps whose images nobody reads (mid-chunk, no video, no store).
        self.observe_images = True
        self._steps = 0
        self._done = True
        if seed is not None:
            self.np_random, _ = gym.utils.seeding.np_random(seed)

    # -- gym API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        import mujoco

        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"instruction"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; supported: ['instruction']")
        # The episode seed fixes the layout: the given seed, or the next draw from our generator.
        self.episode_seed = int(seed) if seed is not None else int(self.np_random.integers(0, 2**31 - 1))
        instruction = options.get("instruction")
        if instruction is None:
            instruction = self._instructions[int(self.np_random.integers(len(self._instructions)))]
        elif not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"options['instruction'] must be a non-empty string, got {instruction!r}")
        self.instruction = instruction

        mw = self._mw
        mw.seed(self.episode_seed)
        mw.reset()
        # MetaWorld moves bodies in reset_model without recomputing positions; without this the
        # first observation and image show the previous episode's layout.
        mujoco.mj_forward(mw.model, mw.data)
        raw = mw._get_obs()
        mw._prev_obs = raw[:18].copy()
        raw[18:36] = raw[:18]
        self._raw = np.asarray(raw, dtype=np.float64)
        self._steps = 0
        self._done = False
        obs = self._observation()
        return obs, self._info(success=False)

    def step(self, action):
        if self._done:
            raise RuntimeError(f"{self.task}: step() after the episode ended; call reset() first")
        a = np.asarray(action, dtype=np.float32)
        if a.shape != self.action_space.shape:
            raise ValueError(
                f"{self.task}: action must have shape {self.action_space.shape}, got {a.shape} at step {self._steps}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.task}: action has NaN/inf at step {self._steps}: {a.tolist()}")
        a = np.clip(a, -1.0, 1.0)
        raw, reward, _, _, mw_info = self._mw.step(a)
        self._raw = np.asarray(raw, dtype=np.float64)
        self._steps += 1
        success = bool(mw_info.get("success", 0.0))
        terminated = self.terminate_on_success and success
        truncated = (not terminated) and self._steps >= self.max_episode_steps
        self._done = terminated or truncated
        return (self._observation(self.observe_images), float(reward), terminated, truncated,
                self._info(success=success))

    def render(self) -> np.ndarray | None:
        """The current camera images side by side (``rgb_array``), e.g. for videos."""
        if self.render_mode is None or not self.cameras or self._raw is None:
            return None
        if not self._images:  # the last step skipped its images (observe_images=False): render them now
            self._observation()
        return np.concatenate([self._images[c] for c in self.cameras], axis=1)  # (H, W * n_cams, 3)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        mw, self._mw = getattr(self, "_mw", None), None
        if mw is not None:
            mw.close()

    # -- helpers ---------------------------------------------------------------------------------
    def _observation(self, images: bool = True) -> dict[str, Any]:
        state = self._raw[:4].astype(np.float32)  # (4,) hand xyz + gripper opening
        if not images:
            self._images = {}
            return {"state": state}
        if self.cameras:
            if self._renderer is None:
                from vla.envs.rendering import CameraRenderer

                self._renderer = CameraRenderer(self._mw.model, self.cameras, self.image_size)
            self._images = self._renderer.render(self._mw.data)
        return {"images": dict(self._images), "state": state}

    def _info(self, success: bool) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "task": self.task,
            "success": success,
            "privileged": self._raw.copy(),  # (39,) MetaWorld's full state vector, expert only
            "seed": self.episode_seed,
            "step": self._steps,
        }


def _door_close_pushing(hand: np.ndarray, obj: np.ndarray, prev_obj: np.ndarray) -> bool:
    # The door swings on its own (up to ~7 mm/step) and the hand pushes the door leaf, not the
    # handle, so neither plain object motion nor hand-handle distance marks the switch.
    # SawyerDoorCloseV3Policy steers to the leaf's outer edge (handle + [0.03, 0.12, 0.1]) and
    # pushes from there; a pushed door moves 2-3 cm/step.
    edge = obj + np.array([0.03, 0.12, 0.1])
    return bool(np.linalg.norm(hand - edge) < 0.1 or np.linalg.norm(obj - prev_obj) > 0.015)


# Tasks whose second label needs a task-specific switch: f(hand, obj, previous obj) -> bool.
_SECOND_LABEL_WHEN: dict[str, Any] = {"door-close-v3": _door_close_pushing}


class SubtaskLabeler:
    """Turns a MetaWorld expert's progress into subtask labels, one per step, in a fixed order.

    MetaWorld's 50 policies are memoryless if/elif chains over the observation; rather than
    mirroring each chain, the labeler watches three signals every policy shares and latches
    forward through the task's labels (never backwards):

    * ``grasp`` tasks: label 0 ("reach the puck") until the expert's gripper command rises above
      its first value (it starts closing on the object), label 1 ("grasp the puck") until the object
      has moved 2 cm from where it was when the grasp began (objects settle after reset, so the
      start pose is no reference), then label 2 ("carry the puck to the goal"); an object pushed
      2 cm before the gripper closes (sweep-into) skips straight to label 2;
    * ``contact`` tasks: label 0 ("reach the drawer handle") until the object moves 1 cm (or the
      hand comes within ``near`` of it), then label 1 ("pull the drawer open");
    * ``reach`` tasks: label 0 until the hand has covered half its start distance to the goal;
    * a few tasks use the policy's own switch condition instead (``_SECOND_LABEL_WHEN``).

    ``obs`` is MetaWorld's 39-dim vector: hand ``[:3]``, main object ``[4:7]``, goal ``[36:39]``.
    """

    GRIP_RISE = 0.05
    GRASP_MOVE = 0.02
    CONTACT_MOVE = 0.01
    FAR = 0.12  # a hand farther than this from the object cannot be moving it

    def __init__(self, text: MetaWorldTaskText, task: str = "") -> None:
        self.text = text
        self._custom = _SECOND_LABEL_WHEN.get(task)
        self.reset()

    def reset(self) -> None:
        self.phase = 0
        self._obj0: np.ndarray | None = None
        self._obj_far: np.ndarray | None = None
        self._obj_prev: np.ndarray | None = None
        self._grip0 = 0.0
        self._goal_dist0 = 0.0

    def update(self, obs: np.ndarray, action: np.ndarray) -> str:
        hand, obj, goal = obs[:3], obs[4:7], obs[36:39]
        if self._obj0 is None:
            self._obj0 = self._obj_prev = obj.copy()
            self._grip0 = float(action[3])
            self._goal_dist0 = float(np.linalg.norm(hand - goal))
        if float(np.linalg.norm(hand - obj)) > self.FAR:
            self._obj_far = obj.copy()  # where the object was before the hand could touch it
        moved = float(np.linalg.norm(obj - self._obj0))
        kind = self.text.kind
        if self._custom is not None:
            if self.phase == 0 and self._custom(hand, obj, self._obj_prev):
                self.phase = 1
        elif kind == "grasp":
            if self.phase == 0 and float(action[3]) > self._grip0 + self.GRIP_RISE:
                self.phase = 1
                self._obj0 = obj.copy()  # displacement counts from the start of the grasp
            elif self.phase == 0 and self._pushed_before_grasp(obj):
                self.phase = 2  # pushed along before the gripper closed (e.g. sweep-into): no grasp label
            elif self.phase == 1 and moved > self.GRASP_MOVE:
                self.phase = 2
        elif kind == "contact":
            near = self.text.near is not None and float(np.linalg.norm(hand - obj)) < self.text.near
            if self.phase == 0 and ((self.text.move and moved > self.CONTACT_MOVE) or near):
                self.phase = 1
        elif kind == "reach":
            if self.phase == 0 and float(np.linalg.norm(hand - goal)) < 0.5 * self._goal_dist0:
                self.phase = 1
        self._obj_prev = obj.copy()
        return self.text.labels[self.phase]

    def _pushed_before_grasp(self, obj: np.ndarray) -> bool:
        return self._obj_far is not None and float(np.linalg.norm(obj - self._obj_far)) > self.GRASP_MOVE


class MetaWorldExpert:
    """MetaWorld's scripted policy for one task, emitting ``(action f32[4], subtask label)``.

    Reads only ``info["privileged"]`` (MetaWorld's 39-dim vector); ``obs`` is accepted for the
    common expert interface and ignored.
    """

    def __init__(self, task: str) -> None:
        import warnings

        from metaworld.policies import ENV_POLICY_MAP

        # MetaWorld's policies warn on every step whose raw command exceeds [-1, 1]; we clip anyway.
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
        self.task = task
        text = _check_task(task)
        self.labels: tuple[str, ...] = text.labels
        self._policy = ENV_POLICY_MAP[task]()
        self._labeler = SubtaskLabeler(text, task)

    def reset(self) -> None:
        self._labeler.reset()

    def act(self, obs: dict[str, Any] | None, info: dict[str, Any]) -> tuple[np.ndarray, str]:
        raw = info.get("privileged") if isinstance(info, dict) else None
        if raw is None or np.shape(raw) != (39,):
            got = None if raw is None else np.shape(raw)
            raise ValueError(f"{self.task} expert needs info['privileged'] with shape (39,), got {got}")
        raw = np.asarray(raw, dtype=np.float64)
        # MetaWorld's policies modify the parsed observation in place: give them a copy.
        action = np.clip(self._policy.get_action(raw.copy()), -1.0, 1.0).astype(np.float32)  # (4,)
        return action, self._labeler.update(raw, action)


def make_env(
    task: str,
    *,
    seed: int | None = None,
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    image_size: int | Sequence[int] = 64,
    instruction_split: str = "train",
    max_episode_steps: int | None = None,
    **kwargs: Any,
) -> MetaWorldEnv:
    """Make a :class:`MetaWorldEnv` (extra kwargs: ``terminate_on_success``, ``render_mode``)."""
    return MetaWorldEnv(
        task,
        seed=seed,
        cameras=cameras,
        image_size=image_size,
        instruction_split=instruction_split,
        max_episode_steps=max_episode_steps,
        **kwargs,
    )


def make_expert(task: str) -> MetaWorldExpert:
    """The scripted expert of ``task``."""
    return MetaWorldExpert(task)


FAMILY = EnvFamily(
    name="metaworld",
    list_tasks=list_tasks,
    make_env=make_env,
    make_expert=make_expert,
    default_cameras=DEFAULT_CAMERAS,
    max_episode_steps=default_max_episode_steps,
)
