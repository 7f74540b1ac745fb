"""The env registry: every environment family (MetaWorld, the tabletop suite, ...) behind one API.

A family is an :class:`EnvFamily` object named ``FAMILY`` in its module. Families are listed here
by import path and imported on first use, so ``import vla.envs`` stays cheap and a family that
fails to import (a missing optional dependency, a module not written yet) does not break the
others: :func:`family_status` reports why, and :func:`get_family` raises a ``ValueError`` that says
so. Every family gets Gymnasium ids ``vla/<Prefix>-<task>`` (e.g. ``vla/MetaWorld-drawer-open-v3``):
MetaWorld's at ``import vla.envs``, other families' when they are first loaded (or call
:func:`register_gym_envs`).

The family contract (what the collector, the evaluator and the tests rely on):

* ``make_env(task, *, seed=None, cameras=..., image_size=..., instruction_split="train",
  max_episode_steps=None, **kw)`` returns a ``gym.Env`` whose observations are
  ``{"images": {cam: uint8[H, W, 3]}, "state": float32[S]}`` (upright images), whose ``info`` has
  ``instruction``, ``task``, ``success`` (bool) and ``privileged``, that takes
  ``reset(options={"instruction": ...})``, truncates at ``max_episode_steps`` and accepts
  ``terminate_on_success=True``. ``cameras=()`` renders nothing (fast, for experts and benchmarks).
  Optional env attributes ``action_names`` / ``state_names`` name the vector entries.
* ``make_expert(task)`` returns a scripted expert: ``expert.reset()``;
  ``action, subtask = expert.act(obs, info)`` with ``action`` float32[A] and a label string.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import gymnasium as gym

# make_env options beyond cameras and image size that shape the episodes (the tabletop `layout`):
# `vla collect` records them in the store (``EpisodeStore.env_options``), checkpoints copy them, and
# `vla eval` rebuilds the same world unless its env group names another value.
ENV_OPTIONS: tuple[str, ...] = ("layout",)


class ScriptedExpert(Protocol):
    """A scripted expert: reads ``info["privileged"]``, returns ``(action f32[A], subtask label)``."""

    def reset(self) -> None: ...

    def act(self, obs: Any, info: dict[str, Any]) -> tuple[Any, str]: ...


@dataclass(frozen=True)
class EnvFamily:
    """One family of tasks: how to list them, make an env and its scripted expert."""

    name: str
    list_tasks: Callable[[], list[str]]
    make_env: Callable[..., gym.Env]  # make_env(task, *, seed=None, cameras=..., image_size=..., ...)
    make_expert: Callable[[str], ScriptedExpert]
    default_cameras: tuple[str, ...]
    max_episode_steps: int | Callable[[str], int]
    # Optional: goal_frame(obs, info) -> (goal_state f32[S], plan labels) for a freshly reset env: the
    # state the hand will have where the expert first closes the gripper, and every subtask label in
    # order (`vla collect goal_frames=N`). None: the family has no goal frames.
    goal_frame: Callable[[Any, dict[str, Any]], tuple[Any, list[str]]] | None = None

    def episode_limit(self, task: str) -> int:
        """The default ``max_episode_steps`` of ``task``."""
        limit = self.max_episode_steps
        return int(limit(task) if callable(limit) else limit)


# family name -> "module:attribute" of its EnvFamily, imported on first use.
_FAMILY_MODULES: dict[str, str] = {
    "metaworld": "vla.envs.metaworld:FAMILY",
    "tabletop": "vla.envs.tabletop:FAMILY",
}
# Gymnasium id prefix per family: vla/<Prefix>-<task>.
_GYM_PREFIX: dict[str, str] = {"metaworld": "MetaWorld", "tabletop": "Tabletop"}

_LOADED: dict[str, EnvFamily] = {}
_FAILED: dict[str, str] = {}
_GYM_REGISTERED: set[str] = set()


def _load(name: str) -> EnvFamily:
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED:
        raise ValueError(f"env family {name!r} is unavailable: {_FAILED[name]}")
    module_name, _, attr = _FAMILY_MODULES[name].partition(":")
    try:
        family = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # any import failure makes just this family unavailable
        _FAILED[name] = f"cannot import {module_name}.{attr}: {type(e).__name__}: {e}"
        raise ValueError(f"env family {name!r} is unavailable: {_FAILED[name]}") from None
    if not isinstance(family, EnvFamily):
        _FAILED[name] = f"{module_name}.{attr} is a {type(family).__name__}, not an EnvFamily"
        raise ValueError(f"env family {name!r} is unavailable: {_FAILED[name]}")
    _LOADED[name] = family
    register_gym_ids(name, family.list_tasks())
    return family


def get_family(name: str) -> EnvFamily:
    """The family called ``name``; ``ValueError`` naming the known families if there is none."""
    if name not in _FAMILY_MODULES:
        raise ValueError(f"unknown env family {name!r}; available families: {', '.join(list_families())}")
    return _load(name)


def register_family(name: str, target: str, gym_prefix: str | None = None) -> None:
    """Add a family by import path ``"package.module:ATTRIBUTE"`` (loaded on first use)."""
    if ":" not in target:
        raise ValueError(f"family target must look like 'package.module:FAMILY', got {target!r}")
    _FAMILY_MODULES[name] = target
    _LOADED.pop(name, None)
    _FAILED.pop(name, None)
    if gym_prefix:
        _GYM_PREFIX[name] = gym_prefix


def family_status() -> dict[str, str | None]:
    """Every registered family -> ``None`` if it loads, else the reason it does not."""
    status: dict[str, str | None] = {}
    for name in _FAMILY_MODULES:
        try:
            _load(name)
            status[name] = None
        except ValueError:
            status[name] = _FAILED[name]
    return status


def list_families(include_unavailable: bool = False) -> list[str]:
    """Names of the families that load (all registered names with ``include_unavailable``)."""
    if include_unavailable:
        return list(_FAMILY_MODULES)
    return [name for name, reason in family_status().items() if reason is None]


def list_tasks(family: str) -> list[str]:
    """The task names of ``family``."""
    return list(get_family(family).list_tasks())


def _check_task(family: EnvFamily, task: str) -> None:
    tasks = family.list_tasks()
    if task not in tasks:
        raise ValueError(f"unknown {family.name} task {task!r}; available tasks: {', '.join(tasks)}")


def make_env(family: str, task: str, **kwargs: Any) -> gym.Env:
    """Make ``task`` of ``family``; keyword arguments go to the family's ``make_env``."""
    fam = get_family(family)
    _check_task(fam, task)
    return fam.make_env(task, **kwargs)


def make_expert(family: str, task: str) -> ScriptedExpert:
    """The scripted expert of ``task`` in ``family``."""
    fam = get_family(family)
    _check_task(fam, task)
    return fam.make_expert(task)


def gym_id(family: str, task: str) -> str:
    """The Gymnasium id of ``task``: ``vla/<Prefix>-<task>``."""
    prefix = _GYM_PREFIX.get(family, family.capitalize())
    return f"vla/{prefix}-{task}"


def _gym_entry_point(family: str, task: str, **kwargs: Any) -> gym.Env:
    return make_env(family, task, **kwargs)


def register_gym_ids(family: str, tasks: list[str]) -> None:
    """Register ``vla/<Prefix>-<task>`` for each task so ``gym.make`` builds it (idempotent)."""
    import gymnasium as gym

    for task in tasks:
        env_id = gym_id(family, task)
        if env_id in _GYM_REGISTERED:
            continue
        gym.register(
            id=env_id,
            entry_point=_gym_entry_point,
            kwargs={"family": family, "task": task},
            disable_env_checker=True,  # our obs spaces are exact; the checker only costs time
        )
        _GYM_REGISTERED.add(env_id)


def register_gym_envs() -> list[str]:
    """Load every family that loads and register its Gymnasium ids; returns all our ids."""
    for name in list_families():
        register_gym_ids(name, get_family(name).list_tasks())
    return sorted(_GYM_REGISTERED)
