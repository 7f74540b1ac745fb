"""`vla bench env [key=value ...]`: env speed, collection speed and scripted-expert success (JSON).

    vla bench env                                   # every family, all tasks, 20 episodes each
    vla bench env families=[metaworld] tasks=[drawer-open-v3,reach-v3] episodes=5 collect_episodes=4

For every registered family that loads (so new families are covered automatically):

* ``step_rate``: env steps/s driven by the scripted expert on the family's first task (or
  ``speed_task``), without rendering and with rendering 1 camera and the default cameras at
  ``image_size``;
* ``collect``: ``vla collect`` frames/s (a frame = one step with all its camera images) with
  ``workers`` spawned workers over ``collect_episodes`` episodes, start-up included, and the
  steady rate after the first episode is stored;
* ``expert``: scripted-expert success rate per task over ``episodes`` seeds starting at
  ``seed_start``, without rendering, episodes ending at success or the task's default limit, with
  the steps-to-success (mean / p95 / max) that justify the per-task episode limits and the
  fewest distinct subtask labels in a successful episode. Runs in ``workers`` spawned processes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from vla.bench import parse_bench_args
from vla.envs.rollout import Recorder

DEFAULTS: dict[str, Any] = {
    "families": "all",
    "tasks": "all",
    "episodes": 20,
    "seed_start": 0,
    "speed_task": None,
    "speed_steps": 300,
    "image_size": 64,
    "collect_episodes": 10,
    "workers": 2,
    "expert": True,
    "collect": True,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    return parse_bench_args("env", argv, DEFAULTS, str_lists=("families", "tasks"))


def _expert_steps(family: str, task: str, env_kwargs: dict, seed: int, steps: int) -> tuple[int, float]:
    """Run the scripted expert for ``steps`` env steps (episodes from seeds ``seed, seed+1, ...``,
    one in-process env) through the rollout engine; (steps, seconds)."""
    from vla.envs.pool import InProcessPool
    from vla.envs.rollout import rollout
    from vla.policies import ExpertPolicy

    with InProcessPool(family, 1, env_kwargs) as pool:
        pool.reset({0: (task, seed)})  # warm-up outside the timing: env construction, GL context
        jobs = [(task, seed + k) for k in range(steps)]  # more episodes than the step budget can use
        run = rollout(ExpertPolicy(family), pool, jobs, max_env_steps=steps, lazy_images=False)  # time the renders
    return run.env_steps, run.seconds


def step_rate(family: str, task: str, image_size: int, steps: int) -> dict[str, Any]:
    """Expert-driven steps/s without rendering, with one camera and with the default cameras."""
    from vla.envs import get_family

    fam = get_family(family)
    out: dict[str, Any] = {"task": task, "image_size": image_size}
    variants = {"no_render": (), "1_camera": fam.default_cameras[:1], "default_cameras": fam.default_cameras}
    for name, cams in variants.items():
        kw = {"cameras": tuple(cams), "image_size": image_size, "terminate_on_success": True}
        n, dt = _expert_steps(family, task, kw, 1, steps if cams else steps * 3)
        out[f"{name}_steps_per_s"] = round(n / dt, 1)
    out["default_cameras"] = list(fam.default_cameras)
    return out


def collect_rate(family: str, task: str, episodes: int, workers: int, image_size: int) -> dict[str, Any]:
    """``vla collect`` into a temporary store; frames/s including worker start-up."""
    from vla.commands.collect import collect
    from vla.config import compose

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(
            "collect",
            [f"env={family}", f"tasks=[{task}]", f"episodes={episodes}", f"workers={workers}",
             f"out={tmp}/bench.zarr", f"image_size={image_size}", "progress=false"],
        )
        summary = collect(cfg)
    return {
        "task": task, "workers": workers, "episodes": summary["kept"], "failed": summary["failed"],
        "frames": summary["frames"], "seconds": summary["seconds"], "frames_per_s": summary["frames_per_s"],
        "first_episode_s": summary["first_episode_s"], "steady_frames_per_s": summary["steady_frames_per_s"],
        "cameras": summary["cameras"], "image_size": image_size,
    }


class _Labels(Recorder):
    """How many distinct subtask labels (runs of equal labels) each successful episode went through."""

    def __init__(self) -> None:
        self.labels: dict[int, list[str]] = {}
        self.per_success: list[int] = []

    def start(self, ep, obs, info) -> None:
        self.labels[ep.slot] = []

    def step(self, ep, obs, action, subtask, reward, next_obs, info) -> None:
        labels = self.labels[ep.slot]
        if not labels or labels[-1] != subtask:
            labels.append(subtask)

    def needs_images(self, ep) -> bool:
        return False

    def end(self, ep) -> None:
        labels = self.labels.pop(ep.slot)
        if ep.success:
            self.per_success.append(len(labels))


def _expert_success_one(family: str, task: str, episodes: int, seed_start: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    from vla.envs.pool import InProcessPool
    from vla.envs.rollout import rollout
    from vla.policies import ExpertPolicy

    labels = _Labels()
    with InProcessPool(family, 1, {"cameras": (), "terminate_on_success": True}) as pool:
        jobs = [(task, seed_start + k) for k in range(episodes)]
        run = rollout(ExpertPolicy(family), pool, jobs, [labels])
        env = pool.env(0)
        limit = int(env.max_episode_steps) if hasattr(env, "max_episode_steps") else None
    successes = [ep.success for ep in run.episodes]
    success_steps = [ep.length for ep in run.episodes if ep.success]
    steps = np.asarray(success_steps) if success_steps else np.zeros(1)
    return {
        "success": round(float(np.mean(successes)), 3),
        "episodes": episodes,
        "steps_mean": round(float(steps.mean()), 1),
        "steps_p95": int(np.percentile(steps, 95)),
        "steps_max": int(steps.max()),
        "limit": limit,
        "min_distinct_labels": int(min(labels.per_success)) if labels.per_success else 0,  # over successful episodes
        "steps_per_s": round(run.env_steps / run.seconds, 1),
    }


def expert_success(family: str, tasks: list[str], episodes: int, seed_start: int, workers: int) -> dict[str, Any]:
    """Per-task scripted-expert success over ``episodes`` seeds (no rendering)."""
    import multiprocessing as mp

    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {t: pool.submit(_expert_success_one, family, t, episodes, seed_start) for t in tasks}
            per_task = {t: f.result() for t, f in futures.items()}
    else:
        per_task = {t: _expert_success_one(family, t, episodes, seed_start) for t in tasks}
    rates = [r["success"] for r in per_task.values()]
    return {
        "tasks": len(tasks),
        "episodes_per_task": episodes,
        "seeds": [seed_start, seed_start + episodes - 1],
        "mean_success": round(float(np.mean(rates)), 3),
        "tasks_below_90pct": {t: r["success"] for t, r in per_task.items() if r["success"] < 0.9},
        "per_task": per_task,
    }


def main(argv: list[str]) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    args = parse_args(argv)
    from vla.envs import family_status, get_family

    status = family_status()
    families = [f for f, reason in status.items() if reason is None] if args["families"] == "all" else args["families"]
    result: dict[str, Any] = {
        "benchmark": "env",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),  # the machine may be shared: context for the rates
        "args": args,
        "unavailable_families": {f: r for f, r in status.items() if r is not None},
        "families": {},
    }
    for family in families:
        all_tasks = get_family(family).list_tasks()
        if args["tasks"] == "all":
            tasks = list(all_tasks)
        else:
            tasks = [t for t in args["tasks"] if t in all_tasks]
            if not tasks:
                continue
        speed_task = args["speed_task"] if args["speed_task"] in all_tasks else tasks[0]
        parts = {"step_rate": partial(step_rate, family, speed_task, args["image_size"], args["speed_steps"])}
        if args["collect"]:
            parts["collect"] = partial(
                collect_rate, family, speed_task, args["collect_episodes"], args["workers"], args["image_size"]
            )
        if args["expert"]:
            parts["expert"] = partial(expert_success, family, tasks, args["episodes"], args["seed_start"],
                                      args["workers"])
        fam: dict[str, Any] = {}
        for name, run in parts.items():
            try:
                fam[name] = run()
            except Exception as e:  # one broken family or part must not lose the other numbers
                fam[name] = {"error": f"{type(e).__name__}: {e}"}
        result["families"][family] = fam
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))
    return 0
