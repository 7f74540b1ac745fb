"""`vla collect`: record scripted-expert demonstrations into a Zarr episode store.

    vla collect env=metaworld tasks=[drawer-open-v3] episodes=40 workers=2 out=data/drawer.zarr \
        image_size=64 cameras=[corner,gripperPOV] seed_start=0 keep_failed=false

Episodes run through the rollout engine (``vla.envs.rollout``) with the scripted expert as the
policy, in a pool of ``workers`` spawned env workers (``vla.envs.pool``; 0 = in-process). The main
process alone writes, with ``vla.datasets.EpisodeWriter``, one atomic append per finished episode
(:class:`StoreRecorder`). So Ctrl-C or a killed worker loses at most the episodes in flight: every
episode already received is in the store, the writer closes cleanly, and a lost worker's episode
is re-run from its seed on a restarted worker.

Seeds. Episode ``k`` of a task uses seed ``seed_start + k`` (the seed fixes the object/goal
layout and the sampled instruction), within ``[COLLECT_SEED_START, EVAL_SEED_START)`` so that
evaluation never sees a training layout. Appending to a store continues after the largest seed
it already holds for that task, so no seed is recorded twice. Failed attempts use up their
seed; they are dropped unless ``keep_failed=true``.

Each step stores the observation (images, state), the expert's action at it, its subtask label,
the reward and the success flag after the action; each episode its instruction, task and seed.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import numpy as np

USAGE = """usage: vla collect [key=value ...]   (Hydra overrides of configs/collect.yaml)

  env=metaworld|tabletop  tasks=[a,b]|all  episodes=N (kept per task)  workers=N (0 = in-process)
  out=PATH  image_size=64  cameras=[corner,gripperPOV]  seed_start=0  keep_failed=false
  goal_frames=N  instead of demonstrations: N reset frames per task labelled with the first grasp
                 (tabletop; for `vla train dataset.goal_frames=PATH`)
"""


# -- the store recorder ---------------------------------------------------------------------------


class StoreRecorder:
    """Rollout recorder (:class:`vla.envs.rollout.Recorder`) that keeps each step's observation,
    the expert's action and subtask label, reward and success, and appends every finished episode
    that ``plan`` keeps to ``writer`` (one atomic append each)."""

    def __init__(self, writer: Any, plan: _Plan, on_stored=None) -> None:
        self.writer = writer
        self.plan = plan
        self.on_stored = on_stored
        self._steps: dict[int, dict[str, Any]] = {}  # slot -> arrays of the running episode

    def start(self, ep, obs, info) -> None:
        self._steps[ep.slot] = {"action": [], "state": [], "subtasks": [], "reward": [], "success": [],
                                "images": defaultdict(list)}

    def step(self, ep, obs, action, subtask, reward, next_obs, info) -> None:
        s = self._steps[ep.slot]
        for cam, img in obs["images"].items():
            s["images"][cam].append(img)
        s["state"].append(obs["state"])
        s["action"].append(np.asarray(action, np.float32))
        s["subtasks"].append(str(subtask))
        s["reward"].append(float(reward))
        s["success"].append(bool(info["success"]))

    def end(self, ep) -> None:
        s = self._steps.pop(ep.slot)
        if not self.plan.finished(ep.task, ep.success):
            return
        episode = {
            "action": np.stack(s["action"]),  # (T, A)
            "state": np.stack(s["state"]).astype(np.float32),  # (T, S)
            "images": {cam: np.stack(frames) for cam, frames in s["images"].items()},  # {cam: (T, H, W, 3)}
            "subtasks": s["subtasks"],
            "instruction": ep.instruction,
            "task": ep.task,
            "seed": int(ep.seed),
            "reward": np.asarray(s["reward"], np.float32),  # (T,)
            "success": np.asarray(s["success"], bool),  # (T,)
        }
        self.writer.add_episode(**episode)
        if self.on_stored is not None:
            self.on_stored(len(episode["action"]))

    def discard(self, ep) -> None:
        self._steps.pop(ep.slot, None)


# -- the collection loop (main process) ----------------------------------------------------------


class _Plan:
    """Which seeds to run per task, and when a task is done."""

    def __init__(self, tasks: list[str], episodes: int, first_seed: dict[str, int], max_attempts: int,
                 keep_failed: bool) -> None:
        from vla.envs import EVAL_SEED_START

        self.tasks = tasks
        self.episodes = episodes
        self.next_seed = dict(first_seed)
        self.kept = dict.fromkeys(tasks, 0)
        self.failed = dict.fromkeys(tasks, 0)
        self.attempts = dict.fromkeys(tasks, 0)
        self.in_flight = dict.fromkeys(tasks, 0)
        self.retry: deque[tuple[str, int]] = deque()  # seeds lost with a dead worker
        self.max_attempts = max_attempts
        self.keep_failed = keep_failed
        self.seed_limit = EVAL_SEED_START

    def next_job(self) -> tuple[str, int] | None:
        if self.retry:
            task, seed = self.retry.popleft()
            self.in_flight[task] += 1
            return task, seed
        for task in self.tasks:
            if self.kept[task] + self.in_flight[task] >= self.episodes or self.attempts[task] >= self.max_attempts:
                continue
            seed = self.next_seed[task]
            if seed >= self.seed_limit:
                raise ValueError(
                    f"task {task}: collection seed {seed} reached EVAL_SEED_START={self.seed_limit}; "
                    "collection seeds must stay below the evaluation seeds"
                )
            self.next_seed[task] = seed + 1
            self.attempts[task] += 1
            self.in_flight[task] += 1
            return task, seed
        return None

    def finished(self, task: str, success: bool) -> bool:
        """Record a finished episode; returns whether to store it."""
        self.in_flight[task] -= 1
        keep = success or self.keep_failed
        if keep:
            self.kept[task] += 1
        if not success:
            self.failed[task] += 1
        return keep

    def lost(self, job: tuple[str, int]) -> None:
        self.in_flight[job[0]] -= 1
        self.retry.append(job)


def _store_seeds(path: Path) -> dict[str, int]:
    """Largest seed per task already in the store at ``path`` (empty if there is no store)."""
    if not (path / "zarr.json").exists():
        return {}
    from vla.datasets import EpisodeStore

    store = EpisodeStore(path)
    largest: dict[str, int] = {}
    for task, seed in zip(store.episode_tasks, np.asarray(store.episode_seeds).tolist()):
        largest[task] = max(largest.get(task, -1), int(seed))
    return largest


def _resolve(cfg) -> dict[str, Any]:
    """Checked settings from the composed config (ValueError with a clear message otherwise)."""
    from omegaconf import OmegaConf

    from vla.envs import COLLECT_SEED_START, EVAL_SEED_START, get_family

    family_name = cfg.env.family
    family = get_family(family_name)
    all_tasks = family.list_tasks()
    tasks = cfg.tasks
    if tasks is None:
        tasks = [all_tasks[0]]
    elif isinstance(tasks, str):
        tasks = list(all_tasks) if tasks == "all" else [tasks]
    else:
        tasks = list(OmegaConf.to_container(tasks))
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"unknown {family_name} task(s) {unknown}; available tasks: {', '.join(all_tasks)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct, got {tasks}")
    cameras = cfg.cameras if cfg.cameras is not None else cfg.env.get("cameras")
    if cameras is None:
        cameras = tuple(family.default_cameras)
    elif isinstance(cameras, str):
        cameras = (cameras,)
    else:
        cameras = tuple(OmegaConf.to_container(cameras))
    if not cameras:
        raise ValueError("cameras must name at least one camera (a store needs images)")
    image_size = cfg.image_size if cfg.image_size is not None else cfg.env.get("image_size", 64)
    if not isinstance(image_size, int):
        image_size = tuple(OmegaConf.to_container(image_size))
    episodes, workers = int(cfg.episodes), int(cfg.workers)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
    seed_start = COLLECT_SEED_START if cfg.seed_start is None else int(cfg.seed_start)
    if not COLLECT_SEED_START <= seed_start < EVAL_SEED_START:
        raise ValueError(
            f"seed_start must be in [COLLECT_SEED_START={COLLECT_SEED_START}, EVAL_SEED_START={EVAL_SEED_START}), "
            f"got {seed_start}"
        )
    try:
        action_noise = float(cfg.get("action_noise") or 0.0)
    except (TypeError, ValueError):
        action_noise = float("nan")  # refused just below, naming what came
    if not action_noise >= 0.0:
        raise ValueError(f"action_noise must be >= 0 (std of the noise on the expert's move actions, in action units), "
                         f"got {cfg.get('action_noise')}")
    try:
        noise_corr = float(cfg.get("noise_corr") or 0.0)
    except (TypeError, ValueError):
        noise_corr = float("nan")
    if not 0.0 <= noise_corr < 1.0:
        raise ValueError(f"noise_corr must be in [0, 1) (the action noise's correlation from one step to the next), "
                         f"got {cfg.get('noise_corr')}")
    out = Path(cfg.out) if cfg.out else Path("data") / f"{family_name}.zarr"
    max_steps = cfg.max_episode_steps if cfg.max_episode_steps is not None else cfg.env.get("max_episode_steps")
    env_kwargs = {
        "cameras": cameras,
        "image_size": image_size,
        "instruction_split": str(cfg.instruction_split),
        "max_episode_steps": None if max_steps is None else int(max_steps),
        "terminate_on_success": bool(cfg.terminate_on_success),
    }
    from vla.envs.registry import ENV_OPTIONS  # e.g. tabletop layout; recorded in the store

    env_kwargs.update({k: cfg.env[k] for k in ENV_OPTIONS if cfg.env.get(k) is not None})
    return {
        "family": family_name, "tasks": tasks, "episodes": episodes, "workers": workers, "out": out,
        "seed_start": seed_start, "env_kwargs": env_kwargs, "keep_failed": bool(cfg.keep_failed),
        "max_attempts": episodes * int(cfg.max_attempts_factor) + 5, "progress": bool(cfg.progress),
        "action_noise": action_noise, "noise_seed": int(cfg.get("noise_seed") or 0),
        "noise_corr": noise_corr,
    }


def _open_writer(s: dict[str, Any]):
    from vla.envs.registry import ENV_OPTIONS

    """Make one env (checks task, cameras, image size before any worker starts), read its dims,
    fps and names, and open (or create) the store with them."""
    from vla.datasets import EpisodeWriter
    from vla.envs import make_env
    from vla.envs.rendering import image_hw

    probe = make_env(s["family"], s["tasks"][0], **s["env_kwargs"])  # renders nothing until reset
    try:
        fps = float(probe.metadata.get("render_fps") or 10)
        action_dim = int(np.prod(probe.action_space.shape))
        state_dim = int(np.prod(probe.observation_space["state"].shape))
        action_names = getattr(probe.unwrapped, "action_names", None)
        state_names = getattr(probe.unwrapped, "state_names", None)
    finally:
        probe.close()
    hw = image_hw(s["env_kwargs"]["image_size"])
    s["out"].parent.mkdir(parents=True, exist_ok=True)
    return EpisodeWriter(
        s["out"], env=s["family"], fps=fps, cameras={c: hw for c in s["env_kwargs"]["cameras"]},
        action_dim=action_dim, state_dim=state_dim,
        action_names=list(action_names) if action_names else None,
        state_names=list(state_names) if state_names else None,
        env_options={k: v for k, v in s["env_kwargs"].items() if k in ENV_OPTIONS},
    )


def collect(cfg) -> dict[str, Any]:
    """Run a collection from a composed ``collect`` config; returns the summary dict."""
    from tqdm import tqdm

    s = _resolve(cfg)
    largest = _store_seeds(s["out"])
    first_seed = {t: max(s["seed_start"], largest.get(t, -1) + 1) for t in s["tasks"]}
    plan = _Plan(s["tasks"], s["episodes"], first_seed, s["max_attempts"], s["keep_failed"])
    writer = _open_writer(s)
    total = s["episodes"] * len(s["tasks"])
    bar = tqdm(total=total, desc="collect", unit="ep", disable=not s["progress"], file=sys.stderr, dynamic_ncols=True)
    frames = 0
    first: tuple[float, int] | None = None  # (seconds, frames) when the first episode was stored
    t0 = time.perf_counter()
    status = "done"

    def stored(n_frames: int) -> None:
        nonlocal frames, first
        frames += n_frames
        bar.update(1)
        if first is None:
            first = (time.perf_counter() - t0, frames)
        bar.set_postfix(failed=sum(plan.failed.values()), fps=f"{frames / max(time.perf_counter() - t0, 1e-6):.0f}")

    from vla.envs.pool import make_pool
    from vla.envs.rollout import rollout
    from vla.policies import ExpertPolicy

    pool = None
    try:
        pool = make_pool(s["family"], max(1, s["workers"]), s["env_kwargs"], workers=s["workers"] > 0)
        expert = ExpertPolicy(s["family"], action_noise=s["action_noise"], noise_seed=s["noise_seed"],
                              noise_corr=s["noise_corr"])
        result = rollout(expert, pool, plan, [StoreRecorder(writer, plan, stored)],
                         lockstep=False)  # the expert acts per env: a fast worker never waits
        for slot, code in getattr(pool, "lost", []):
            print(f"vla collect: worker {slot} died (exit code {code}); its episode was re-run", file=sys.stderr)
        if result.status == "workers lost":
            status = "workers died"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if pool is not None:
            pool.close()
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - t0
    summary = {
        "status": status,
        "path": str(s["out"]),
        "kept": sum(plan.kept.values()),
        "failed": sum(plan.failed.values()),
        "frames": frames,
        "seconds": round(elapsed, 2),
        "frames_per_s": round(frames / max(elapsed, 1e-6), 1),
        # after start-up (worker spawn, imports, first env): the rate a longer collection approaches
        "first_episode_s": round(first[0], 2) if first else None,
        "steady_frames_per_s": (
            round((frames - first[1]) / max(elapsed - first[0], 1e-6), 1) if first and frames > first[1] else None
        ),
        "store_episodes": writer.num_episodes,
        "cameras": list(s["env_kwargs"]["cameras"]),
        "image_size": s["env_kwargs"]["image_size"],
        "per_task": {t: {"kept": plan.kept[t], "failed": plan.failed[t]} for t in s["tasks"]},
    }
    short = [t for t in s["tasks"] if plan.kept[t] < s["episodes"]]
    if short and status == "done":
        summary["status"] = "incomplete"
        summary["short_tasks"] = {t: plan.kept[t] for t in short}
    return summary


def collect_goal_frames(cfg) -> dict[str, Any]:
    """``goal_frames=N``: N reset frames per task, each labelled with the state at the expert's first
    grasp (``vla.datasets.goal_frames``); written once, whole or not at all. Returns the summary."""
    from vla.datasets.goal_frames import write_goal_frames
    from vla.datasets.sampler import join_plan
    from vla.envs import get_family, make_env

    s = _resolve(cfg)
    n = int(cfg.goal_frames)
    family = get_family(s["family"])
    if family.goal_frame is None:
        raise ValueError(f"goal_frames={n}: env {s['family']!r} has no goal frames (the tabletop family has)")
    if s["out"].exists():
        raise ValueError(f"goal_frames={n}: out={s['out']} exists; goal frames are written to a new path")
    frames: dict[str, Any] = {"images": defaultdict(list), "state": [], "goal_state": [], "task": [],
                              "instruction": [], "plan": [], "seed": []}
    t0 = time.perf_counter()
    fps = 0.0
    for task in s["tasks"]:
        env = make_env(s["family"], task, **s["env_kwargs"])
        try:
            fps = float(env.metadata.get("render_fps") or 10)
            for k in range(n):
                seed = s["seed_start"] + k
                obs, info = env.reset(seed=seed)
                goal, labels = family.goal_frame(obs, info)
                for cam, img in obs["images"].items():
                    frames["images"][cam].append(img)
                frames["state"].append(obs["state"])
                frames["goal_state"].append(goal)
                frames["plan"].append(join_plan(labels))
                frames["task"].append(task)
                frames["instruction"].append(info["instruction"])
                frames["seed"].append(seed)
        finally:
            env.close()
    frames["images"] = {cam: np.stack(v) for cam, v in frames["images"].items()}
    from vla.envs.registry import ENV_OPTIONS

    meta = {"env": s["family"], "fps": fps,
            "env_options": {k: v for k, v in s["env_kwargs"].items() if k in ENV_OPTIONS}}
    write_goal_frames(s["out"], frames, meta)
    elapsed = time.perf_counter() - t0
    return {"status": "done", "path": str(s["out"]), "frames": len(frames["task"]), "seconds": round(elapsed, 2),
            "tasks": s["tasks"], "seed_start": s["seed_start"]}


def format_summary(summary: dict[str, Any]) -> str:
    """The one-line summary printed at the end of a collection."""
    line = (
        f"vla collect: {summary['status']}: kept {summary['kept']} episodes, {summary['failed']} failed, "
        f"{summary['frames']} frames in {summary['seconds']:.1f} s ({summary['frames_per_s']:.1f} frames/s); "
        f"store {summary['path']} has {summary['store_episodes']} episodes"
    )
    if summary.get("short_tasks"):
        line += f"; fewer episodes than asked for: {summary['short_tasks']}"
    return line


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from vla.config import compose

    cfg = compose("collect", argv)
    if int(cfg.get("goal_frames") or 0) > 0:
        summary = collect_goal_frames(cfg)
        print(f"vla collect: goal frames: {summary['frames']} frames of {summary['tasks']} (seeds from "
              f"{summary['seed_start']}) in {summary['seconds']:.1f} s -> {summary['path']}")
        return 0
    summary = collect(cfg)
    print(format_summary(summary))
    return {"done": 0, "interrupted": 130}.get(summary["status"], 1)
