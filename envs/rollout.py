"""The rollout engine: the one loop that runs a policy in an env pool and feeds recorders.

    result = rollout(policy, pool, jobs, recorders=[...], max_steps=..., end_on_success=True)

Every caller goes through here: ``vla collect`` (a store recorder, the scripted expert as the
policy), ``vla eval`` and evaluation during training (statistics + video recorders), the env
benchmarks and the tabletop measurements. So a fix to episode bookkeeping or to worker handling
protects all of them at once.

- ``policy``: anything with ``reset(slot)``, ``act_batch(obs_list, instructions, infos,
  env_indices=...)`` and ``current_subtask(slot)`` (:class:`RolloutPolicy`; ``vla.policies.Policy``
  is one). It is asked once per step for all running slots, so batched policies see full batches.
  A policy with ``recorded_action(slot)`` names the action recorders get when it differs from the
  executed one (the scripted expert under ``action_noise`` records its own action, not the noisy
  one it executes); None there means the executed action. A policy with ``seed_episode(slot, seed)``
  is told each episode's seed when it starts (the VLA then draws that episode's flow noise from a
  stream of its own, so a seed replays the same episode whatever the batch around it).
- ``pool``: an :mod:`vla.envs.pool` pool; each slot runs one episode at a time.
- ``jobs``: the episodes to run, ``(task, seed)`` pairs, as a list or as an object with
  ``next_job() -> (task, seed) | None`` and ``lost(job)`` (``vla collect`` decides as it goes how
  many seeds each task still needs).
- ``recorders``: :class:`Recorder` objects told about every episode start, step and end.

Rendering only what is read (``lazy_images``, default on): a chunking policy reads an observation's
images only when it predicts a chunk (once per ``n_action_steps`` steps), so before each step the
engine asks the policy (``needs_observations``) and every recorder (``needs_images``) whether the
step's observation will be read, and the pool's env skips rendering when nobody will: such an
observation has only ``state``. Policies and recorders without these methods count as readers. On
the 2-core CPU rendering is most of an env step (BENCHMARKS.md, "Closed-loop evaluation throughput").

A worker lost mid-episode (killed, out of memory) never hangs the loop: its episode's recorders
get ``discard``, the job goes back to ``jobs`` to be re-run from its seed on a restarted worker,
and the result counts it in ``rerun``. When no worker can be restarted any more, the loop stops
and the jobs not run are listed in ``unfinished``: reported, never silently dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Job = tuple[str, int]  # (task, seed)


class RolloutPolicy(Protocol):
    """What the engine needs from a policy (``vla.policies.Policy`` implements it)."""

    def reset(self, env_index: int | None = None) -> None: ...

    def act_batch(self, obs_list: list[dict], instructions: list[str], infos: list[dict] | None = None,
                  env_indices: list[int] | None = None) -> np.ndarray: ...

    def current_subtask(self, env_index: int = 0) -> str | None: ...

    # optional: ``needs_observations(env_indices) -> list[bool]``, whether each slot's next observation
    # will be read (its images rendered); without it every observation is rendered


@dataclass
class Episode:
    """One episode as it runs: ``length`` counts env steps taken, ``success`` is true once any
    step reported ``info["success"]``."""

    task: str
    seed: int
    instruction: str
    slot: int
    length: int = 0
    success: bool = False
    sum_reward: float = 0.0
    terminated: bool = False
    truncated: bool = False


class Recorder:
    """Base class of everything that watches a rollout; every hook is optional."""

    def start(self, ep: Episode, obs: dict, info: dict) -> None:
        """``ep`` was reset to ``obs`` (before any action)."""

    def step(self, ep: Episode, obs: dict, action: np.ndarray, subtask: str | None, reward: float,
             next_obs: dict, info: dict) -> None:
        """``action`` was taken at ``obs`` (the policy's label for it: ``subtask``); ``ep.length``
        and ``ep.success`` already include this step."""

    def end(self, ep: Episode) -> None:
        """``ep`` finished (success, termination, truncation or the step limit)."""

    def discard(self, ep: Episode) -> None:
        """``ep``'s worker was lost; the episode will be re-run from its seed (or reported unfinished)."""

    def needs_images(self, ep: Episode) -> bool:
        """Whether ``step`` reads the camera images of ``ep``'s next observation (``next_obs``); a
        recorder that never looks at images returns False so the env can skip rendering them."""
        return True


class JobList:
    """A fixed list of jobs; a lost job goes back to the front, at most ``max_reruns`` times each."""

    def __init__(self, jobs: Iterable[Job], max_reruns: int = 2) -> None:
        self._queue: deque[Job] = deque((str(t), int(s)) for t, s in jobs)
        self._reruns: dict[Job, int] = {}
        self.max_reruns = max_reruns
        self.given_up: list[Job] = []

    def next_job(self) -> Job | None:
        return self._queue.popleft() if self._queue else None

    def lost(self, job: Job) -> None:
        n = self._reruns.get(job, 0) + 1
        self._reruns[job] = n
        if n > self.max_reruns:
            self.given_up.append(job)
        else:
            self._queue.appendleft(job)

    def remaining(self) -> list[Job]:
        return list(self._queue)


@dataclass
class RolloutResult:
    """``status``: "done", "workers lost" (no worker left; see ``unfinished``) or "step budget"."""

    status: str = "done"
    episodes: list[Episode] = field(default_factory=list)  # in the order they finished
    env_steps: int = 0
    seconds: float = 0.0
    rerun: list[Job] = field(default_factory=list)  # jobs whose worker was lost mid-episode
    unfinished: list[Job] = field(default_factory=list)  # jobs never finished (no worker left, reruns used up)


def rollout(
    policy: RolloutPolicy,
    pool: Any,
    jobs: Sequence[Job] | Any,
    recorders: Sequence[Recorder] = (),
    *,
    max_steps: int | None = None,
    end_on_success: bool = False,
    done: Callable[[Episode, dict], bool] | None = None,
    max_env_steps: int | None = None,
    lockstep: bool = True,
    instruction: str | None = None,
    lazy_images: bool = True,
) -> RolloutResult:
    """Run ``jobs`` in ``pool`` with ``policy``; see the module docstring.

    An episode ends at termination or truncation, at ``max_steps`` steps, at its first success
    when ``end_on_success``, or when ``done(ep, info)`` says so. ``max_env_steps`` stops the whole
    rollout (episodes still running are neither ended nor discarded) once that many steps ran.

    ``instruction``: given, the policy reads it in every episode instead of the env's own (a user's
    phrasing; the env's goal still comes from the seed).

    ``lazy_images`` (default): steps whose observation neither the policy nor a recorder will read are
    not rendered (module docstring); ``False`` renders every step (e.g. to time rendering).

    ``lockstep`` (default): every running slot steps, then the policy acts for all of them in one
    batch (a batched model sees full batches, and a seeded policy repeats itself exactly).
    ``lockstep=False``: the policy acts for whichever slots have answered, so fast workers never
    wait for slow ones; for policies whose action per slot does not depend on the others (the
    scripted expert in ``vla collect``).
    """
    source = JobList(jobs) if isinstance(jobs, (list, tuple)) else jobs
    result = RolloutResult()
    running: dict[int, tuple[Job, Episode]] = {}
    obs: dict[int, dict] = {}
    infos: dict[int, dict] = {}
    free = list(range(pool.n))  # live slots without an episode
    t0 = time.perf_counter()
    seed_episode = getattr(policy, "seed_episode", None)

    def lose(slot: int) -> None:
        job, ep = running.pop(slot)
        for r in recorders:
            r.discard(ep)
        result.rerun.append(job)
        source.lost(job)
        policy.reset(slot)
        if pool.restart(slot):
            free.append(slot)

    def start() -> None:
        assigned: dict[int, Job] = {}
        while free and (job := source.next_job()) is not None:
            assigned[free.pop(0)] = job
        if not assigned:
            return
        replies = pool.reset(assigned)
        for slot, job in assigned.items():
            reply = replies[slot]
            ep = Episode(task=job[0], seed=int(job[1]), instruction="", slot=slot)
            running[slot] = (job, ep)
            if reply is None:
                lose(slot)
                continue
            o, info = reply
            ep.instruction = instruction or str(info.get("instruction", ""))
            if not ep.instruction:
                raise ValueError(f"env {pool.family}/{job[0]} seed {job[1]}: reset info has no 'instruction'")
            ep.success = bool(info.get("success", False))
            obs[slot], infos[slot] = o, info
            policy.reset(slot)
            if seed_episode is not None:  # the policy's noise for this episode follows its seed alone
                seed_episode(slot, ep.seed)
            for r in recorders:
                r.start(ep, o, info)

    policy_reads = getattr(policy, "needs_observations", None) if lazy_images else None
    image_readers = [getattr(r, "needs_images", None) for r in recorders]

    def images_wanted(slots: list[int]) -> dict[int, bool] | None:
        if policy_reads is None or any(f is None for f in image_readers):
            return None  # someone reads every observation: render them all
        reads = policy_reads(slots)
        return {i: bool(p) or any(f(running[i][1]) for f in image_readers) for i, p in zip(slots, reads)}

    recorded_action = getattr(policy, "recorded_action", None)
    policy.reset()
    start()
    sent: dict[int, np.ndarray] = {}  # slot -> the action of its step in flight
    while running or free:
        if not running:
            start()
            if not running:
                break
        idle = sorted(i for i in running if i not in sent)
        if idle:
            actions = policy.act_batch(
                [obs[i] for i in idle], [running[i][1].instruction for i in idle],
                [infos[i] for i in idle], env_indices=idle,
            )  # (len(idle), A)
            batch = {i: actions[k] for k, i in enumerate(idle)}
            sent.update(batch)
            wanted = images_wanted(idle)
            if wanted is None or all(wanted.values()):
                pool.send(batch)
            else:
                pool.send(batch, images=wanted)
        replies = pool.receive(wait_all=lockstep)
        for i in sorted(replies):
            action, reply = sent.pop(i), replies[i]
            if reply is None:
                lose(i)
                continue
            job, ep = running[i]
            o, reward, terminated, truncated, info = reply
            ep.length += 1
            ep.sum_reward += float(reward)
            result.env_steps += 1
            ep.success = ep.success or bool(info.get("success", False))
            ep.terminated, ep.truncated = terminated, truncated
            subtask = policy.current_subtask(i)
            if recorded_action is not None:  # e.g. the expert under action_noise: record its own action
                own = recorded_action(i)
                action = action if own is None else own
            for r in recorders:
                r.step(ep, obs[i], action, subtask, reward, o, info)
            obs[i], infos[i] = o, info
            if (terminated or truncated or (end_on_success and ep.success)
                    or (max_steps is not None and ep.length >= max_steps) or (done is not None and done(ep, info))):
                for r in recorders:
                    r.end(ep)
                result.episodes.append(ep)
                del running[i]
                policy.reset(i)
                free.append(i)
        if max_env_steps is not None and result.env_steps >= max_env_steps:
            result.status = "step budget"
            break
        start()
    if result.status == "done":
        result.unfinished = list(getattr(source, "given_up", []))
        result.unfinished += source.remaining() if hasattr(source, "remaining") else []
        if not free and not running:  # every worker was lost and none could be restarted
            result.status = "workers lost"
    result.seconds = time.perf_counter() - t0
    return result
