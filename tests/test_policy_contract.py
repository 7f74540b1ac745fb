"""One contract over every registered policy (`vla.policies.list_policies()`): it is built by name
from its config group, resets, acts for one env and for a batch, predicts chunks of the right
shape, and repeats itself exactly when built again with the same seed."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla.policies import list_policies, make_policy  # noqa: E402

TASK = "reach-v3"  # MetaWorld: state 4, action 4, camera "corner" -- the tiny VLA's shapes
ACTION_DIM = 4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tiny_vla import make_tiny, save_tiny

    model, proc = make_tiny(image_size=32, horizon=8)
    return save_tiny(tmp_path_factory.mktemp("contract"), model, proc)


@pytest.fixture(scope="module")
def scenes():
    """(obs, info) of two MetaWorld seeds, rendered as the tiny VLA expects."""
    from vla.envs import make_env

    env = make_env("metaworld", TASK, cameras=("corner",), image_size=32)
    try:
        return [env.reset(seed=s) for s in (1_000_000, 1_000_001)]
    finally:
        env.close()


@contextlib.contextmanager
def built(name: str, tiny_run):
    """The registered policy ``name`` with the settings its configs/policy/<name>.yaml would give."""
    if name == "vla":
        policy = make_policy({"name": "vla", "checkpoint": str(tiny_run), "n_action_steps": 4, "seed": 3})
        with policy:
            yield policy, 8
    elif name == "expert":
        yield make_policy({"name": "expert"}, family="metaworld"), 1
    elif name == "remote":
        from vla.policies import VLAPolicy

        from vla.serving import PolicyServer

        served = VLAPolicy.from_checkpoint(str(tiny_run), n_action_steps=4, seed=3)
        with PolicyServer(served, port=0) as server:
            policy = make_policy({"name": "remote", "port": server.port})
            with policy:
                yield policy, 8
    else:
        pytest.fail(f"policy '{name}' is registered but this contract test does not know how to build it")


def test_the_registry_holds_the_three_policies_and_refuses_unknown_names():
    assert list_policies() == ["expert", "remote", "vla"]
    with pytest.raises(ValueError, match=r"policy: expected one of \['expert', 'remote', 'vla'\], got 'nope'"):
        make_policy({"name": "nope"})
    with pytest.raises(ValueError, match="policy=vla needs checkpoint"):
        make_policy({"name": "vla"})
    with pytest.raises(ValueError, match="policy=expert needs the env family"):
        make_policy({"name": "expert"})


def rollout_actions(policy, scenes) -> np.ndarray:
    """Six single-env steps on the first scene after a reset."""
    (obs, info), _ = scenes
    policy.reset()
    return np.stack([policy.act(obs, info["instruction"], info) for _ in range(6)])  # (6, A)


@pytest.mark.parametrize("name", list_policies())
def test_policy_contract(name, tiny_run, scenes):
    (obs0, info0), (obs1, info1) = scenes
    with built(name, tiny_run) as (policy, horizon):
        first = rollout_actions(policy, scenes)  # on a fresh policy: determinism is checked below
        policy.reset()
        action = policy.act(obs0, info0["instruction"], info0)
        assert action.shape == (ACTION_DIM,) and action.dtype == np.float32 and np.isfinite(action).all()

        chunks = policy.predict_chunks([obs0, obs1], [info0["instruction"], info1["instruction"]], [info0, info1],
                                       env_indices=[0, 1])
        assert [c.actions.shape for c in chunks] == [(horizon, ACTION_DIM)] * 2

        policy.reset()
        batch = policy.act_batch([obs0, obs1], [info0["instruction"], info1["instruction"]], [info0, info1],
                                 env_indices=[0, 1])
        assert batch.shape == (2, ACTION_DIM) and np.isfinite(batch).all()
        policy.reset(1)  # one slot alone; the other keeps going
        assert policy.act_batch([obs1], [info1["instruction"]], [info1], env_indices=[1]).shape == (1, ACTION_DIM)
    with built(name, tiny_run) as (again, _):
        np.testing.assert_allclose(rollout_actions(again, scenes), first, rtol=1e-5, atol=1e-6)
