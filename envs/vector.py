"""Gymnasium vector envs over any registered family, for code written against Gymnasium's API.

vla's own callers (collect, eval, benchmarks) run episodes through :mod:`vla.envs.rollout` over
the pools of :mod:`vla.envs.pool` instead, which step only the envs that run an episode and
survive a lost worker.

``make_vector_env`` builds a ``gymnasium.vector.AsyncVectorEnv`` whose workers start with the
``spawn`` method: a forked child inherits the parent's OpenGL/EGL state and crashes on its first
render, a spawned one makes its own context. ``asynchronous=False`` gives a ``SyncVectorEnv``
(one process; for tests and debugging). Sub-envs reset automatically on the step after an
episode ends (Gymnasium's default ``NEXT_STEP`` autoreset).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


def _make_one(family: str, task: str, seed: int | None, env_kwargs: dict[str, Any]):
    # Module-level so it pickles into spawned workers.
    from vla.envs.registry import make_env

    return make_env(family, task, seed=seed, **env_kwargs)


def make_vector_env(
    family: str,
    tasks: str | Sequence[str],
    seeds: int | Sequence[int] | None = None,
    n_envs: int | None = None,
    *,
    asynchronous: bool = True,
    autoreset_mode: Any = "NextStep",
    **env_kwargs: Any,
):
    """A vector env with one sub-env per task (a single task is repeated ``n_envs`` times).

    ``seeds``: one per sub-env, or an int ``s`` meaning ``s, s+1, ...``; it seeds each sub-env's
    generator, so ``reset()`` without a seed is reproducible. ``env_kwargs`` go to the family's
    ``make_env`` (cameras, image_size, instruction_split, max_episode_steps, terminate_on_success).
    ``autoreset_mode``: Gymnasium's ``"NextStep"`` (default), ``"SameStep"`` or ``"Disabled"``; an
    explicit ``reset(options={"reset_mask": mask})`` works in every mode.
    """
    import gymnasium as gym
    from vla.envs.registry import get_family

    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list:
        raise ValueError("make_vector_env needs at least one task")
    if n_envs is None:
        n_envs = len(task_list)
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if len(task_list) == 1:
        task_list = task_list * n_envs
    elif len(task_list) != n_envs:
        raise ValueError(f"got {len(task_list)} tasks for n_envs={n_envs}; pass one task or exactly n_envs")
    if seeds is None:
        seed_list: list[int | None] = [None] * n_envs
    elif isinstance(seeds, int):
        seed_list = [seeds + i for i in range(n_envs)]
    else:
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != n_envs:
            raise ValueError(f"got {len(seed_list)} seeds for {n_envs} envs")
    fam = get_family(family)
    known = set(fam.list_tasks())
    unknown = sorted({t for t in task_list if t not in known})
    if unknown:
        raise ValueError(f"unknown {family} task(s) {unknown}; available tasks: {', '.join(sorted(known))}")
    modes = {m.value: m for m in gym.vector.AutoresetMode}
    if isinstance(autoreset_mode, gym.vector.AutoresetMode):
        autoreset_mode = autoreset_mode.value
    if autoreset_mode not in modes:
        raise ValueError(f"autoreset_mode must be one of {sorted(modes)}, got {autoreset_mode!r}")
    fns = [functools.partial(_make_one, family, t, s, dict(env_kwargs)) for t, s in zip(task_list, seed_list)]
    if asynchronous:
        return gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=modes[autoreset_mode])
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=modes[autoreset_mode])
