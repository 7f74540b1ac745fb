"""The rollout engine and env pools: one loop for every caller; lost workers never hang it."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla.envs.pool import InProcessPool, ProcessPool, make_pool  # noqa: E402
from vla.envs.rollout import Recorder, rollout  # noqa: E402
from vla.policies import ExpertPolicy, Policy  # noqa: E402
from vla.policies.base import Chunk  # noqa: E402

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


class ChunkRecorder(Policy):
    """A chunking policy that notes which steps' observations carried images and when it predicted."""

    def __init__(self, n_action_steps: int, refill_below: int = 0) -> None:
        super().__init__(n_action_steps)
        self.refill_below = refill_below
        self.seen: list[bool] = []  # per act_batch observation: did it carry images
        self.predicted = 0

    def act_batch(self, obs_list, instructions, infos=None, env_indices=None):
        self.seen += ["images" in o for o in obs_list]
        return super().act_batch(obs_list, instructions, infos, env_indices)

    def predict_chunks(self, obs_list, instructions, infos=None, env_indices=None):
        for o in obs_list:  # a chunk is only ever predicted from a rendered observation
            assert o["images"]["front"].shape == (32, 32, 3), sorted(o)
        self.predicted += len(obs_list)
        # a fixed zig-zag from the state, so that two runs act alike only if they saw alike states
        return [Chunk(actions=np.tile(np.r_[np.sign(o["state"][:3]) * -0.5, 1.0], (8, 1)).astype(np.float32))
                for o in obs_list]


class Film(Recorder):
    """Films the episode of one seed: needs its images at every step, nobody else's."""

    def __init__(self, seed: int) -> None:
        self.seed, self.frames = seed, 0

    def needs_images(self, ep):
        return ep.seed == self.seed

    def step(self, ep, obs, action, subtask, reward, next_obs, info):
        if ep.seed == self.seed:
            assert next_obs["images"]["front"].shape == (32, 32, 3)
            self.frames += 1


@pytest.mark.parametrize("workers", [0, 2])
def test_lazy_images_render_only_what_the_policy_or_a_recorder_reads(workers):
    kw = {"cameras": ("front",), "image_size": 32, "max_episode_steps": 21}
    jobs = [("pick-place", s) for s in (0, 1, 2)]
    runs = {}
    for lazy in (True, False):
        policy, film = ChunkRecorder(n_action_steps=4, refill_below=2 if workers else 0), Film(seed=1)
        with make_pool("tabletop", 2 if workers else 1, kw, workers=bool(workers)) as pool:
            result = rollout(policy, pool, jobs, [film], lazy_images=lazy)
        runs[lazy] = (policy, film, sorted((e.seed, e.length, e.sum_reward, e.success) for e in result.episodes))
    (lazy_p, lazy_film, lazy_eps), (full_p, full_film, full_eps) = runs[True], runs[False]
    assert lazy_eps == full_eps and [e[1] for e in lazy_eps] == [21, 21, 21]  # the same episodes either way
    assert lazy_p.predicted == full_p.predicted and lazy_film.frames == full_film.frames == 21
    assert all(full_p.seen) and len(lazy_p.seen) == len(full_p.seen) == 63
    # rendered: the 3 resets, every step of the filmed episode (seed 1), and before every chunk
    if not workers:  # one slot: seeds 0 and 2 render at steps 0, 4, ..., 20 (6 chunks each), seed 1 all 21
        assert sum(lazy_p.seen) == 6 + 21 + 6 and lazy_p.predicted == 18
    assert lazy_p.predicted <= sum(lazy_p.seen) < 0.6 * len(lazy_p.seen)


def test_policies_say_which_observations_they_will_read():
    p = ChunkRecorder(n_action_steps=4)
    obs = {"images": {"front": np.zeros((32, 32, 3), np.uint8)}, "state": np.zeros(4, np.float32)}
    p.act_batch([obs, obs], ["a", "b"], env_indices=[0, 1])  # both take a chunk and pop one action: 3 left
    assert p.needs_observations([0, 1]) == [False, False]
    for _ in range(3):
        p.act_batch([obs, obs], ["a", "b"], env_indices=[0, 1])
    assert p.needs_observations([0, 1]) == [True, True]  # queues empty: the next step predicts
    p.refill_below = 3
    p.reset(0)
    p.act_batch([obs], ["a"], env_indices=[0])  # slot 0: 3 left, slot 1: still empty, so due
    assert p.needs_observations([0, 1]) == [True, True]  # slot 0 may join slot 1's model call
    assert ExpertPolicy("tabletop").needs_observations([0, 1]) == [False, False]
    history = ChunkRecorder(n_action_steps=4)
    history.n_obs_steps = 2
    assert history.needs_observations([0]) == [True]


class _SpyPool:
    """Wraps a pool and keeps every action batch it is told to execute."""

    def __init__(self, pool) -> None:
        self.pool, self.sent = pool, []

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def send(self, batch, **kw):
        self.sent.append({i: np.array(a, copy=True) for i, a in batch.items()})
        return self.pool.send(batch, **kw)


class _Actions(Recorder):
    """Keeps the recorded actions and the info each action was chosen from."""

    def __init__(self) -> None:
        self.actions, self.infos = [], []

    def start(self, ep, obs, info):
        self.infos.append(info)

    def step(self, ep, obs, action, subtask, reward, next_obs, info):
        self.actions.append(np.array(action, copy=True))
        self.infos.append(info)


def test_expert_under_action_noise_executes_noisy_moves_and_records_its_own_actions():
    from vla.envs import make_expert

    kw = {"cameras": (), "layout": "slots", "max_episode_steps": 30}
    rec = _Actions()
    with InProcessPool("tabletop", 1, kw) as pool:
        spy = _SpyPool(pool)
        rollout(ExpertPolicy("tabletop", action_noise=0.3), spy, [("pick-place", 0)], [rec])
    executed = np.stack([b[0] for b in spy.sent])  # (T, A)
    recorded = np.stack(rec.actions)
    assert executed.shape == recorded.shape == (30, 4)
    # the recorded actions are what a noise-free expert answers to the same infos, step by step
    clean = make_expert("tabletop", "pick-place")
    clean.reset()
    replayed = np.stack([clean.act(None, info)[0] for info in rec.infos[:-1]])
    np.testing.assert_array_equal(recorded, replayed)
    # the executed ones move elsewhere (every step), never beyond the action bounds, and grip the same
    assert (np.abs(executed[:, :3] - recorded[:, :3]).max(axis=1) > 0).all()
    assert np.abs(executed).max() <= 1.0
    np.testing.assert_array_equal(executed[:, 3], recorded[:, 3])


def test_action_noise_is_reproducible_per_scene_and_refuses_a_negative_std():
    def run(seed_noise):
        with InProcessPool("tabletop", 1, {"cameras": (), "layout": "slots", "max_episode_steps": 12}) as pool:
            spy = _SpyPool(pool)
            rollout(ExpertPolicy("tabletop", action_noise=0.2, noise_seed=seed_noise), spy, [("pick-place", 3)])
        return np.stack([b[0] for b in spy.sent])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    with pytest.raises(ValueError, match=r"action_noise must be >= 0 .* got -0.1"):
        ExpertPolicy("tabletop", action_noise=-0.1)
    assert ExpertPolicy("tabletop").recorded_action(0) is None


def test_correlated_action_noise_keeps_its_std_and_turns_slowly():
    def pushes(corr):
        expert = ExpertPolicy("tabletop", action_noise=0.2, noise_corr=corr)
        info = {"privileged": np.arange(8, dtype=np.float64)}
        action = np.zeros(4, np.float32)
        return np.stack([expert._perturb(0, action, info)[:3] for _ in range(4000)])  # (T, 3), no clipping at 0.2

    def lag1(x):
        return float(np.mean([np.corrcoef(x[:-1, k], x[1:, k])[0, 1] for k in range(x.shape[1])]))

    white, slow = pushes(0.0), pushes(0.9)
    assert white.std() == pytest.approx(0.2, rel=0.05) and slow.std() == pytest.approx(0.2, rel=0.15)
    assert abs(lag1(white)) < 0.05 and lag1(slow) == pytest.approx(0.9, abs=0.03)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"noise_corr must be in \[0, 1\) .*got {bad}"):
            ExpertPolicy("tabletop", action_noise=0.2, noise_corr=bad)
