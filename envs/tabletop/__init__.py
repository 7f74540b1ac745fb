"""The native tabletop suite: MuJoCo scenes with compositional, multi-step language tasks.

A mocap-driven two-finger gripper, a table, coloured cubes and cylinders, a bowl, a plate and a
cabinet with a drawer; ten task families from one-step ("open the drawer") to four-step ("put
the red cube in the drawer": open, pick, place, close). Parts:

- `scene`  — MJCF assembled from small XML-fragment functions,
- `tasks`  — families, instruction templates, train/eval splits, plans, privileged layout,
- `env`    — `TabletopEnv` (Gymnasium), success and partial-progress checks,
- `expert` — `TabletopExpert`, scripted plan executor that emits subtask labels,
Expert success rates, env steps/s and pictures: ``python -m vla.bench.tabletop`` (it drives the
expert through the rollout engine, so it sits with the benchmarks).

`FAMILY` registers the suite with `vla.envs.registry` as ``"tabletop"``.
"""

from __future__ import annotations

from typing import Any

from vla.envs.tabletop.tasks import FAMILIES, list_tasks

DEFAULT_CAMERAS: tuple[str, ...] = ("front", "wrist")


def make_env(task: str, *, seed: int | None = None, cameras: tuple[str, ...] | list[str] = DEFAULT_CAMERAS,
             image_size: int | tuple[int, int] = 96, instruction_split: str = "train",
             max_episode_steps: int | None = None, **kwargs: Any):
    """Build a `TabletopEnv` for one task family (see `list_tasks()`)."""
    from vla.envs.tabletop.env import TabletopEnv

    return TabletopEnv(task, seed=seed, cameras=cameras, image_size=image_size,
                       instruction_split=instruction_split, max_episode_steps=max_episode_steps, **kwargs)


def make_expert(task: str):
    """The scripted expert for one task family: ``action, subtask = expert.act(obs, info)``."""
    from vla.envs.tabletop.expert import TabletopExpert

    return TabletopExpert(task)


def max_episode_steps(task: str) -> int:
    """Default episode length of a task family."""
    from vla.envs.tabletop.tasks import get_family

    return get_family(task).max_episode_steps


def goal_frame(obs: dict, info: dict):
    """(goal_state, plan labels) of a freshly reset episode; see `expert.first_grasp_state`."""
    from vla.envs.tabletop.expert import first_grasp_state

    return first_grasp_state(obs, info)


def _family():
    try:
        from vla.envs.registry import EnvFamily
    except ImportError:   # the registry is optional for using the suite directly
        return None
    return EnvFamily(name="tabletop", list_tasks=list_tasks, make_env=make_env, make_expert=make_expert,
                     default_cameras=DEFAULT_CAMERAS, max_episode_steps=max_episode_steps,
                     goal_frame=goal_frame)


FAMILY = _family()

__all__ = ["FAMILY", "FAMILIES", "DEFAULT_CAMERAS", "list_tasks", "make_env", "make_expert", "max_episode_steps"]
