"""`vla collect`: record scripted-expert demonstrations into a Zarr episode store.

    vla collect env=metaworld tasks=[drawer-open-v3] episodes=40 workers=2 out=data/drawer.zarr \
        image_size=64 cameras=[corner,gripperPOV] seed_start=0 keep_failed=false

Worker processes (``spawn``: a forked child would inherit the parent's GL state) each own one
env + scripted expert per task and roll out whole episodes for the seeds the main process hands
them; the main process alone writes, with ``vla.datasets.EpisodeWriter``, one atomic append per
finished episode. So Ctrl-C or a killed worker loses at most the episodes in flight: every
episode already received is in the store, and the writer closes cleanly (a lost worker's seeds
are handed to the others).

Seeds. Episode ``k`` of a task uses seed ``seed_start + k`` (the seed fixes the object/goal
layout and the sampled instruction), within ``[COLLECT_SEED_START, EVAL_SEED_START)`` so that
evaluation never sees a training layout. Appending to a store continues after the largest seed
it already holds for that task, so no seed is recorded twice. Failed attempts use up their
seed; they are dropped unless ``keep_failed=true``.

Each step stores the observation (images, state), the expert's action at it, its subtask label,
the reward and the success flag after the action; each episode its instruction, task and seed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict, defaultdict, deque
from pathlib import Path
from typing import Any

import numpy as np

USAGE = """usage: vla collect [key=value ...]   (Hydra overrides of configs/collect.yaml)

  env=metaworld|tabletop  tasks=[a,b]|all  episodes=N (kept per task)  workers=N (0 = in-process)
  out=PATH  image_size=64  cameras=[corner,gripperPOV]  seed_start=0  keep_failed=false
"""


# -- one episode (runs in workers, or in-process with workers=0) ---------------------------------


def rollout(env: Any, expert: Any, task: str, seed: int) -> dict[str, Any]:
    """Run one expert episode from ``env.reset(seed=seed)``; returns the arrays to store."""
    obs, info = env.reset(seed=seed)
    expert.reset()
    actions, states, subtasks, rewards, successes = [], [], [], [], []
    images: dict[str, list[np.ndarray]] = defaultdict(list)
    instruction = info["instruction"]
    success = False
    while True:
        action, label = expert.act(obs, info)
        for cam, img in obs["images"].items():
            images[cam].append(img)
        states.append(obs["state"])
        actions.append(np.asarray(action, np.float32))
        subtasks.append(str(label))
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(float(reward))
        successes.append(bool(info["success"]))
        success = success or bool(info["success"])
        if terminated or truncated:
            break
    return {
        "task": task,
        "seed": int(seed),
        "instruction": instruction,
        "success": success,
        "episode": {
            "action": np.stack(actions),  # (T, A)
            "state": np.stack(states).astype(np.float32),  # (T, S)
            "images": {cam: np.stack(frames) for cam, frames in images.items()},  # {cam: (T, H, W, 3)}
            "subtasks": subtasks,
            "instruction": instruction,
            "task": task,
            "seed": int(seed),
            "reward": np.asarray(rewards, np.float32),  # (T,)
            "success": np.asarray(successes, bool),  # (T,)
        },
    }


class _EpisodeRunner:
    """Keeps the env + expert of the last few tasks (making a MetaWorld env costs ~0.2-1 s; tasks
    are handed out mostly one after another, and each env holds a GL context, so few are kept)."""

    def __init__(self, family: str, env_kwargs: dict[str, Any], keep: int = 2) -> None:
        self.family = family
        self.env_kwargs = env_kwargs
        self.keep = keep
        self._envs: OrderedDict[str, tuple[Any, Any]] = OrderedDict()

    def run(self, task: str, seed: int) -> dict[str, Any]:
        from vla.envs import make_env, make_expert

        if task not in self._envs:
            self._envs[task] = (make_env(self.family, task, **self.env_kwargs), make_expert(self.family, task))
            while len(self._envs) > self.keep:
                _, (old_env, _) = self._envs.popitem(last=False)
                old_env.close()
        self._envs.move_to_end(task)
        env, expert = self._envs[task]
        return rollout(env, expert, task, seed)

    def close(self) -> None:
        for env, _ in self._envs.values():
            with contextlib.suppress(Exception):
                env.close()
        self._envs.clear()


# Crash-test hook (tests only): with VLA_COLLECT_KILL_ONCE="<seed>:<marker path>" the first worker
# handed that seed dies at once (os._exit), as if killed, and leaves the marker so it happens once.
_KILL_ENV = "VLA_COLLECT_KILL_ONCE"


def _crash_test_hook(seed: int) -> None:
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return
    kill_seed, _, marker = spec.partition(":")
    if int(kill_seed) == seed and marker and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _worker_main(wid: int, family: str, env_kwargs: dict, jobs, results) -> None:
    # The main process handles Ctrl-C and tells workers to stop; a worker ignores SIGINT so an
    # interrupt never kills it halfway through sending an episode. ``results`` is this worker's own
    # pipe, written synchronously: a worker killed mid-send can only truncate its own channel, which
    # the main process then reads as end-of-file (a shared queue would be left holding half a message).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    runner = _EpisodeRunner(family, env_kwargs)
    try:
        while True:
            job = jobs.get()
            if job is None:
                break
            task, seed = job
            _crash_test_hook(seed)
            try:
                results.send(("episode", wid, job, runner.run(task, seed)))
            except Exception:
                results.send(("error", wid, job, traceback.format_exc()))
                break
    finally:
        runner.close()
        results.close()


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
    out = Path(cfg.out) if cfg.out else Path("data") / f"{family_name}.zarr"
    max_steps = cfg.max_episode_steps if cfg.max_episode_steps is not None else cfg.env.get("max_episode_steps")
    env_kwargs = {
        "cameras": cameras,
        "image_size": image_size,
        "instruction_split": str(cfg.instruction_split),
        "max_episode_steps": None if max_steps is None else int(max_steps),
        "terminate_on_success": bool(cfg.terminate_on_success),
    }
    return {
        "family": family_name, "tasks": tasks, "episodes": episodes, "workers": workers, "out": out,
        "seed_start": seed_start, "env_kwargs": env_kwargs, "keep_failed": bool(cfg.keep_failed),
        "max_attempts": episodes * int(cfg.max_attempts_factor) + 5, "progress": bool(cfg.progress),
    }


def _open_writer(s: dict[str, Any]):
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

    def store(result: dict[str, Any]) -> None:
        nonlocal frames, first
        if plan.finished(result["task"], result["success"]):
            writer.add_episode(**result["episode"])
            frames += len(result["episode"]["action"])
            bar.update(1)
            if first is None:
                first = (time.perf_counter() - t0, frames)
        bar.set_postfix(failed=sum(plan.failed.values()), fps=f"{frames / max(time.perf_counter() - t0, 1e-6):.0f}")

    try:
        if s["workers"] == 0:
            runner = _EpisodeRunner(s["family"], s["env_kwargs"])
            try:
                while (job := plan.next_job()) is not None:
                    store(runner.run(*job))
            finally:
                runner.close()
        else:
            status = _run_workers(s, plan, store)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
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


def _run_workers(s: dict[str, Any], plan: _Plan, store) -> str:
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    n = s["workers"]
    jobs = [ctx.Queue() for _ in range(n)]
    pipes = [ctx.Pipe(duplex=False) for _ in range(n)]  # (reader, writer) per worker
    readers = [r for r, _ in pipes]
    procs = [
        ctx.Process(target=_worker_main, args=(i, s["family"], s["env_kwargs"], jobs[i], pipes[i][1]), daemon=True)
        for i in range(n)
    ]
    # Workers inherit SIGINT=ignored from the moment they start (a spawned child keeps ignored
    # signals across exec), so a Ctrl-C during their start-up cannot kill them either.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        for p in procs:
            p.start()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    for _, writer in pipes:
        writer.close()  # each worker now holds the only write end of its pipe: its death reads as EOF
    assigned: dict[int, list[tuple[str, int]]] = {i: [] for i in range(n)}
    alive = set(range(n))
    depth = 2  # jobs queued per worker, so a worker never waits for the main process

    def dispatch() -> None:
        for i in sorted(alive):
            while len(assigned[i]) < depth and (job := plan.next_job()) is not None:
                assigned[i].append(job)
                jobs[i].put(job)

    def handle(msg) -> None:
        kind, wid, job, payload = msg
        if job in assigned.get(wid, []):
            assigned[wid].remove(job)
        if kind == "error":
            raise RuntimeError(f"collect worker {wid} failed on task {job[0]} seed {job[1]}:\n{payload}")
        store(payload)

    def worker_died(i: int) -> None:
        procs[i].join(timeout=1.0)
        alive.discard(i)
        for job in assigned.pop(i):
            plan.lost(job)
        print(f"vla collect: worker {i} died (exit code {procs[i].exitcode}); {len(alive)} left", file=sys.stderr)

    def receive(timeout: float) -> list:
        """Messages from the live workers ready within ``timeout``; a closed pipe marks its worker dead."""
        msgs = []
        for r in wait([readers[i] for i in sorted(alive)], timeout=timeout):
            i = readers.index(r)
            try:
                msgs.append(r.recv())
            except (EOFError, OSError):  # the worker is gone, possibly halfway through a message
                worker_died(i)
        return msgs

    status = "done"
    try:
        dispatch()
        while any(assigned[i] for i in alive):
            msgs = receive(timeout=1.0)
            for msg in msgs:
                handle(msg)
            if not msgs:
                for i in list(alive):
                    if not procs[i].is_alive():
                        worker_died(i)
            if not alive:
                status = "workers died"
                break
            dispatch()
    except KeyboardInterrupt:
        status = "interrupted"
        # Keep what already arrived: drain finished episodes for a moment, then stop.
        with contextlib.suppress(KeyboardInterrupt):
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and alive:
                for msg in receive(timeout=0.2):
                    if msg[0] == "episode":
                        store(msg[3])
    finally:
        for i in alive:
            with contextlib.suppress(Exception):
                jobs[i].put(None)
        for p in procs:
            # Finished normally: workers exit on the sentinel. Interrupted: nothing left to wait for.
            p.join(timeout=2.0 if status == "done" else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
        for r in readers:
            r.close()
        for q in jobs:
            q.cancel_join_thread()
    return status


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
    summary = collect(cfg)
    print(format_summary(summary))
    return {"done": 0, "interrupted": 130}.get(summary["status"], 1)
