"""`vla.envs`: MuJoCo Gymnasium environments, scripted experts and vector envs.

Every family (MetaWorld, the tabletop suite) sits behind one registry (:mod:`vla.envs.registry`)
and one observation contract: ``{"images": {cam: uint8[H, W, 3]}, "state": float32[S]}`` with
``info["instruction"]``, ``info["task"]``, ``info["success"]`` and ``info["privileged"]`` (see
docs/contracts.md "Environments").

Seeds: collection uses ``[COLLECT_SEED_START, EVAL_SEED_START)``, evaluation defaults to
``EVAL_SEED_START + i``, so demonstrations never share a layout with evaluation episodes.

Importing this package is cheap: families load on first use. On Linux rendering defaults to EGL
(``MUJOCO_GL=egl``, set here unless the user chose a backend, e.g. ``osmesa``) so headless
machines work.
"""

from __future__ import annotations

import os
import sys

if sys.platform.startswith("linux"):  # headless default; macOS/Windows keep MuJoCo's own backend
    os.environ.setdefault("MUJOCO_GL", "egl")

from vla.envs.registry import (  # noqa: E402
    EnvFamily,
    ScriptedExpert,
    family_status,
    get_family,
    gym_id,
    list_families,
    list_tasks,
    make_env,
    make_expert,
    register_family,
    register_gym_envs,
    register_gym_ids,
)
from vla.envs.vector import make_vector_env  # noqa: E402

COLLECT_SEED_START: int = 0
EVAL_SEED_START: int = 1_000_000


def _register_metaworld_ids() -> None:
    # MetaWorld's task names are static data: register its gym ids without importing MetaWorld.
    from vla.envs.metaworld_tasks import TASK_NAMES

    register_gym_ids("metaworld", TASK_NAMES)


_register_metaworld_ids()

__all__ = [
    "COLLECT_SEED_START",
    "EVAL_SEED_START",
    "EnvFamily",
    "ScriptedExpert",
    "family_status",
    "get_family",
    "gym_id",
    "list_families",
    "list_tasks",
    "make_env",
    "make_expert",
    "make_vector_env",
    "register_family",
    "register_gym_envs",
    "register_gym_ids",
]
