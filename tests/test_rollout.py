"""The rollout engine and env pools: one loop for every caller; lost workers never hang it."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla.envs.pool import InProcessPool, ProcessPool  # noqa: E402
from vla.envs.rollout import Recorder, rollout  # noqa: E402

TASK = "reach-v3"
KW = {"cameras": (), "max_episode_steps": 6}


class ZeroPolicy:
    """Always the zero action; counts resets."""

    def __init__(self) -> None:
        self.resets: list[int | None] = []

    def reset(self, env_index=None):
        self.resets.append(env_index)

    def act_batch(self, obs_list, instructions, infos=None, env_indices=None):
        return np.zeros((len(obs_list), 4), np.float32)  # (B, A)

    def current_subtask(self, env_index=0):
        return "wait"


class Log(Recorder):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def start(self, ep, obs, info):
        self.events.append(("start", ep.seed))

    def step(self, ep, obs, action, subtask, reward, next_obs, info):
        self.events.append(("step", ep.seed, ep.length, subtask))

    def end(self, ep):
        self.events.append(("end", ep.seed, ep.length))

    def discard(self, ep):
        self.events.append(("discard", ep.seed))


def test_in_process_rollout_runs_every_job_to_its_limit_and_tells_recorders():
    log = Log()
    with InProcessPool("metaworld", 2, KW) as pool:
        result = rollout(ZeroPolicy(), pool, [(TASK, 0), (TASK, 1), (TASK, 2)], [log], max_steps=4)
    assert result.status == "done" and result.unfinished == [] and result.rerun == []
    assert sorted(ep.seed for ep in result.episodes) == [0, 1, 2]
    assert all(ep.length == 4 for ep in result.episodes) and result.env_steps == 12
    assert [e for e in log.events if e[0] != "step"].count(("end", 2, 4)) == 1
    assert ("step", 0, 1, "wait") in log.events
    steps_of_0 = [e[2] for e in log.events if e[0] == "step" and e[1] == 0]
    assert steps_of_0 == [1, 2, 3, 4]


def test_env_time_limit_ends_an_episode_and_step_budget_stops_the_rollout():
    with InProcessPool("metaworld", 1, KW) as pool:
        ended = rollout(ZeroPolicy(), pool, [(TASK, 0)])
        assert ended.episodes[0].truncated and ended.episodes[0].length == 6
        budget = rollout(ZeroPolicy(), pool, [(TASK, k) for k in range(10)], max_env_steps=8)
    assert budget.status == "step budget" and budget.env_steps == 8 and len(budget.episodes) == 1


def test_killed_worker_episode_is_rerun_on_a_restarted_worker():
    class Killer(ZeroPolicy):
        def __init__(self, pool):
            super().__init__()
            self.pool, self.calls = pool, 0

        def act_batch(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                os.kill(self.pool.pids[1], signal.SIGKILL)
            return super().act_batch(*args, **kwargs)

    log = Log()
    with ProcessPool("metaworld", 2, KW) as pool:
        result = rollout(Killer(pool), pool, [(TASK, 0), (TASK, 1), (TASK, 2)], [log], max_steps=5)
        assert pool.lost == [(1, -signal.SIGKILL)] and pool.restarts == 1
    assert result.status == "done" and result.rerun == [(TASK, 1)] and result.unfinished == []
    assert sorted(ep.seed for ep in result.episodes) == [0, 1, 2] and all(ep.length == 5 for ep in result.episodes)
    assert ("discard", 1) in log.events


def test_when_no_worker_can_be_restarted_the_jobs_left_are_reported():
    class Killer(ZeroPolicy):
        def __init__(self, pool):
            super().__init__()
            self.pool = pool

        def act_batch(self, *args, **kwargs):
            os.kill(self.pool.pids[0], signal.SIGKILL)
            return super().act_batch(*args, **kwargs)

    with ProcessPool("metaworld", 1, KW, max_restarts=0) as pool:
        result = rollout(Killer(pool), pool, [(TASK, 0), (TASK, 1)])
    assert result.status == "workers lost" and result.episodes == []
    assert result.unfinished == [(TASK, 0), (TASK, 1)]


def test_an_env_error_in_a_worker_names_the_slot_task_and_seed():
    with ProcessPool("metaworld", 1, KW) as pool:
        pool.reset({0: (TASK, 3)})
        with pytest.raises(RuntimeError, match=r"worker 0 \(metaworld/reach-v3 seed 3\) failed"):
            pool.step({0: np.zeros(7, np.float32)})  # wrong action size


def test_without_lockstep_fast_workers_run_ahead_and_every_episode_is_the_same():
    class Counting(ZeroPolicy):
        def __init__(self):
            super().__init__()
            self.batches: list[int] = []

        def act_batch(self, obs_list, *args, **kwargs):
            self.batches.append(len(obs_list))
            return super().act_batch(obs_list, *args, **kwargs)

    jobs = [(TASK, 0), (TASK, 1), (TASK, 2)]
    with InProcessPool("metaworld", 1, KW) as pool:
        reference = rollout(ZeroPolicy(), pool, jobs, max_steps=4)
    policy = Counting()
    with ProcessPool("metaworld", 2, KW) as pool:
        free_running = rollout(policy, pool, jobs, max_steps=4, lockstep=False)
    assert sorted((e.seed, e.length, e.instruction) for e in free_running.episodes) == \
        sorted((e.seed, e.length, e.instruction) for e in reference.episodes)
    assert free_running.env_steps == 12 and sum(policy.batches) == 12  # one action per step taken
