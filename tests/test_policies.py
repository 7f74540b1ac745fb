"""Policy interface: the per-env action queue, batching, temporal ensembling, the expert wrapper."""

from __future__ import annotations

import numpy as np
import pytest
from vla.policies import Chunk, Policy


class CountingPolicy(Policy):
    """Chunk k of env e is [[100*e + 10*k + h] * A for h in range(H)]: actions reveal where they came from."""

    def __init__(self, horizon: int = 4, action_dim: int = 2, **kw):
        super().__init__(**kw)
        self.horizon, self.action_dim = horizon, action_dim
        self.calls: list[list[int]] = []  # env indices of each batched call
        self.count: dict[int, int] = {}

    def predict_chunks(self, obs_list, instructions, infos=None, env_indices=None, **_):
        env_indices = list(range(len(obs_list))) if env_indices is None else env_indices
        self.calls.append(list(env_indices))
        out = []
        for e in env_indices:
            k = self.count.get(e, 0)
            self.count[e] = k + 1
            base = 100 * e + 10 * k + np.arange(self.horizon, dtype=np.float32)  # (H,)
            out.append(Chunk(np.repeat(base[:, None], self.action_dim, 1), plan=[f"env{e} chunk{k}", "next"]))
        return out


OBS = {"images": {}, "state": np.zeros(3, np.float32)}


def test_chunk_validates_and_promotes():
    assert Chunk(np.zeros(4)).actions.shape == (1, 4)
    with pytest.raises(ValueError, match="f32\\[H, A\\]"):
        Chunk(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        Chunk(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="frame"):
        Chunk(np.zeros((2, 2)), frame=np.zeros((4, 4), np.float32))


def test_queue_predicts_every_n_action_steps_and_reset_clears():
    p = CountingPolicy(horizon=4, n_action_steps=3)
    got = [float(p.act(OBS, "go")[0]) for _ in range(7)]
    # executes the first 3 of each 4-step chunk, then asks again
    assert got == [0, 1, 2, 10, 11, 12, 20]
    assert len(p.calls) == 3
    assert p.current_plan() == ["env0 chunk2", "next"] and p.current_subtask() == "env0 chunk2"
    p.reset()
    assert p.current_plan() is None
    assert float(p.act(OBS, "go")[0]) == 30  # queue cleared: a fresh chunk, not 21
    assert len(p.calls) == 4


def test_batched_queues_are_per_env_and_batched_together():
    p = CountingPolicy(horizon=4, n_action_steps=2)
    a = p.act_batch([OBS] * 3, ["x"] * 3)  # (3, A)
    assert a.shape == (3, 2) and a.dtype == np.float32
    assert a[:, 0].tolist() == [0, 100, 200]
    assert p.calls == [[0, 1, 2]]  # one batched model call for all three envs
    p.act_batch([OBS] * 3, ["x"] * 3)
    assert len(p.calls) == 1  # second action came from the queues
    p.reset(1)  # env 1 finished its episode
    a = p.act_batch([OBS] * 3, ["x"] * 3)
    assert a[:, 0].tolist() == [10, 110, 210]
    assert p.calls[-1] == [0, 1, 2]
    a = p.act_batch([OBS] * 2, ["x"] * 2, env_indices=[0, 2])  # env 1 idle
    assert a[:, 0].tolist() == [11, 211] and len(p.calls) == 2
    with pytest.raises(ValueError, match="instructions"):
        p.act_batch([OBS] * 2, ["x"])
    with pytest.raises(ValueError, match="distinct"):
        p.act_batch([OBS] * 2, ["x"] * 2, env_indices=[0, 0])


def test_temporal_ensemble_weights_overlapping_chunks():
    coeff = 0.5
    p = CountingPolicy(horizon=4, n_action_steps=2, temporal_ensemble=coeff)
    got = [float(p.act(OBS, "go")[0]) for _ in range(5)]
    # t=0,1: only chunk 0 (values 0, 1). t=2: chunk0[2]=2 (oldest, weight 1) and chunk1[0]=10 (weight e^-0.5)
    w = np.exp(-coeff)
    assert got[0] == 0 and got[1] == 1
    assert got[2] == pytest.approx((2 + w * 10) / (1 + w))
    assert got[3] == pytest.approx((3 + w * 11) / (1 + w))
    # t=4: chunk0 expired; chunk1[2]=12 (oldest) and chunk2[0]=20
    assert got[4] == pytest.approx((12 + w * 20) / (1 + w))
    assert len(p.calls) == 3


def test_base_policy_needs_an_implementation():
    with pytest.raises(NotImplementedError):
        Policy().act(OBS, "go")
    with pytest.raises(ValueError, match="n_action_steps"):
        Policy(n_action_steps=0)


# ---- the VLA policy (tiny random model) -----------------------------------------------------------
def _recording_policy(**kw):
    from _tiny_vla import make_tiny
    from vla.policies import VLAPolicy

    model, proc = make_tiny(n_obs_steps=kw.pop("n_obs_steps", 1))
    policy = VLAPolicy(model, proc, **kw)
    calls = []
    sample = model.sample

    def recording_sample(batch, **skw):
        calls.append({"decode_plan": skw["decode_plan"], "given_plan": "plan_tokens" in batch,
                      "images": tuple(batch["images"].shape), "n": batch["images"].shape[0]})
        return sample(batch, **skw)

    model.sample = recording_sample
    return policy, calls


def test_vla_policy_queue_and_replan_schedule():
    from _tiny_vla import obs

    policy, calls = _recording_policy(n_action_steps=4, replan_every=8, seed=0)
    o = obs()
    actions = [policy.act(o, "open the drawer") for _ in range(12)]
    assert all(a.shape == (4,) and a.dtype == np.float32 for a in actions)
    assert len(calls) == 3  # one chunk per 4 steps
    # plan decoded at step 0 and step 8; the chunk at step 4 reuses the decoded plan as given tokens
    assert [c["decode_plan"] for c in calls] == [True, False, True]
    assert [c["given_plan"] for c in calls] == [False, True, False]
    assert policy.current_plan() is not None and policy.chunks_predicted() == 3
    # the queue holds the first n_action_steps of the chunk, in order
    policy.reset()
    assert policy.current_plan() is None
    policy.reseed(0)
    first = policy.predict_chunk(o, "open the drawer")
    policy.reseed(0)
    policy.reset()
    got = np.stack([policy.act(o, "open the drawer") for _ in range(4)])
    np.testing.assert_allclose(got, first.actions[:4], rtol=1e-5, atol=1e-6)
    assert len(calls) == 5 and calls[-1]["decode_plan"]  # reset forgot the plan: decoded again


def test_vla_policy_batches_envs_and_is_reproducible():
    from _tiny_vla import obs

    rng = np.random.default_rng(3)
    obs_list = [obs(rng) for _ in range(3)]
    p1, calls = _recording_policy(n_action_steps=2, seed=7)
    p2, _ = _recording_policy(n_action_steps=2, seed=7)
    a1 = np.stack([p1.act_batch(obs_list, ["open the drawer"] * 3) for _ in range(4)])  # (T, N, A)
    a2 = np.stack([p2.act_batch(obs_list, ["open the drawer"] * 3) for _ in range(4)])
    np.testing.assert_array_equal(a1, a2)
    assert len(calls) == 2 and all(c["n"] == 3 for c in calls)  # all envs in one batch
    p3, _ = _recording_policy(n_action_steps=2, seed=8)
    assert not np.allclose(p3.act_batch(obs_list, ["open the drawer"] * 3), a1[0])
    assert p1.metadata()["cameras"] == {"corner": [32, 32]} and p1.env_kwargs() == {"cameras": ("corner",),
                                                                                     "image_size": 32}


def test_vla_policy_history_and_ensemble_and_errors():
    from _tiny_vla import obs

    policy, calls = _recording_policy(n_action_steps=2, n_obs_steps=2, temporal_ensemble=0.01)
    for _ in range(3):
        assert policy.act(obs(), "go").shape == (4,)
    assert calls[0]["images"] == (1, 2, 3, 32, 32)  # (B, views = cameras x n_obs_steps, 3, H, W)
    assert len(calls) == 2  # ensembling still predicts every n_action_steps
    assert len(policy.slot(0).history) == 2
    bad = {"images": {"wrist": np.zeros((32, 32, 3), np.uint8)}, "state": np.zeros(4, np.float32)}
    with pytest.raises(ValueError, match="missing camera 'corner'"):
        policy.predict_chunk(bad, "go")
    with pytest.raises(ValueError, match="horizon"):
        _recording_policy(n_action_steps=99)


def test_vla_policy_from_checkpoint_matches_in_memory(tmp_path):
    from _tiny_vla import make_tiny, obs, save_tiny
    from vla.policies import VLAPolicy

    model, proc = make_tiny()
    run = save_tiny(tmp_path / "run", model, proc, train={"eval": {"env": "metaworld", "tasks": ["drawer-open-v3"]}})
    loaded = VLAPolicy.from_checkpoint(run, n_action_steps=4, seed=1)
    local = VLAPolicy(model, proc, n_action_steps=4, seed=1)
    o = obs()
    np.testing.assert_allclose(loaded.predict_chunk(o, "go").actions, local.predict_chunk(o, "go").actions, atol=1e-6)
    from vla.commands.eval import checkpoint_env_and_tasks

    assert checkpoint_env_and_tasks(loaded.train_config) == ("metaworld", ["drawer-open-v3"])


# ---- the scripted expert ----------------------------------------------------------------------------
def test_expert_policy_needs_info_and_labels_subtasks():
    from vla.envs import make_env
    from vla.policies import ExpertPolicy

    env = make_env("metaworld", "drawer-open-v3", cameras=("corner",), image_size=32)
    policy = ExpertPolicy("metaworld")  # the task comes from info["task"]
    o, info = env.reset(seed=5)
    with pytest.raises(ValueError, match="info"):
        policy.act(o, info["instruction"])
    success = False
    for _ in range(150):
        a = policy.act(o, info["instruction"], info)
        assert a.shape == (4,)
        o, _, term, trunc, info = env.step(a)
        success = success or bool(info["success"])
        if success or term or trunc:
            break
    env.close()
    assert success and isinstance(policy.current_subtask(), str) and policy.current_subtask()


def test_refill_below_resynchronizes_envs():
    p = CountingPolicy(horizon=8, n_action_steps=8)
    p.refill_below = 4
    p.act_batch([OBS], ["x"], env_indices=[0])
    for _ in range(2):
        p.act_batch([OBS], ["x"], env_indices=[0])  # env 0 is 3 steps in when env 1 starts
    p.act_batch([OBS] * 2, ["x"] * 2, env_indices=[0, 1])
    assert p.calls[-1] == [1]  # env 0 still has 5 queued (> 4): not refreshed
    for _ in range(5):
        p.act_batch([OBS] * 2, ["x"] * 2, env_indices=[0, 1])
    assert p.calls[-1] == [0, 1]  # env 0 ran dry; env 1 had 3 left (<= 4) and joined the call
    n = len(p.calls)
    for _ in range(16):
        p.act_batch([OBS] * 2, ["x"] * 2, env_indices=[0, 1])
    assert p.calls[n:] == [[0, 1], [0, 1]]  # from now on one call per cycle for both


def test_episode_noise_streams_make_an_envs_chunk_independent_of_its_batch():
    from _tiny_vla import INSTRUCTION, obs

    rng = np.random.default_rng(4)
    o0, o1 = obs(rng), obs(rng)
    pair, _ = _recording_policy(n_action_steps=2, seed=5)
    alone, _ = _recording_policy(n_action_steps=2, seed=5)
    pair.seed_episode(0, 1_000_000)
    pair.seed_episode(1, 1_000_001)
    alone.seed_episode(3, 1_000_000)  # another slot, the same episode seed
    both = pair.predict_chunks([o0, o1], [INSTRUCTION] * 2, env_indices=[0, 1])
    one = alone.predict_chunks([o0], [INSTRUCTION], env_indices=[3])
    np.testing.assert_allclose(both[0].actions, one[0].actions, rtol=1e-4, atol=1e-5)
    # the next chunk of the episode continues its own stream, whoever else is in the batch
    again = pair.predict_chunks([o1, o0], [INSTRUCTION] * 2, env_indices=[1, 0])
    np.testing.assert_allclose(again[1].actions, alone.predict_chunks([o0], [INSTRUCTION], env_indices=[3])[0].actions,
                               rtol=1e-4, atol=1e-5)
    # another episode seed is other noise: the same observation gives another chunk
    other, _ = _recording_policy(n_action_steps=2, seed=5)
    other.seed_episode(0, 1_000_002)
    assert np.abs(other.predict_chunks([o0], [INSTRUCTION], env_indices=[0])[0].actions - one[0].actions).max() > 1e-3
    # reset(slot) drops the stream: back on the policy's shared stream, as a policy never told a seed
    plain, _ = _recording_policy(n_action_steps=2, seed=5)
    other.reset(0)
    other.reseed(5)
    np.testing.assert_array_equal(other.predict_chunks([o0], [INSTRUCTION], env_indices=[0])[0].actions,
                                  plain.predict_chunks([o0], [INSTRUCTION], env_indices=[0])[0].actions)
