"""The MetaWorld adapter: instructions, seeding, upright cameras, experts and their subtask labels."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import vla.envs as E  # noqa: E402
from vla.envs.metaworld import CAMERAS, MetaWorldEnv, default_max_episode_steps, instructions  # noqa: E402
from vla.envs.metaworld_tasks import TASK_NAMES, TASK_TEXT  # noqa: E402


def run_expert(task: str, seed: int, max_steps: int | None = None) -> tuple[bool, list[str], int]:
    env = E.make_env("metaworld", task, cameras=(), terminate_on_success=True, max_episode_steps=max_steps)
    expert = E.make_expert("metaworld", task)
    obs, info = env.reset(seed=seed)
    expert.reset()
    labels = []
    done = False
    while not done:
        action, label = expert.act(obs, info)
        labels.append(label)
        obs, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
    env.close()
    return bool(info["success"]), labels, len(labels)


def test_all_50_tasks_have_language():
    assert len(TASK_NAMES) == 50 and TASK_NAMES == E.list_tasks("metaworld")
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    assert set(TASK_NAMES) == set(ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP)
    for task in TASK_NAMES:
        train, held_out = instructions(task, "train"), instructions(task, "eval")
        assert len(train) + len(held_out) >= 5 and len(held_out) >= 1, task
        assert not set(train) & set(held_out), task
        assert len(set(TASK_TEXT[task].labels)) == len(TASK_TEXT[task].labels) >= 2, task
        assert 1 <= default_max_episode_steps(task) <= 500


def test_instruction_splits_are_sampled_from_the_right_list():
    env = MetaWorldEnv("drawer-open-v3", cameras=(), instruction_split="eval")
    seen = {env.reset(seed=s)[1]["instruction"] for s in range(6)}
    assert seen <= set(instructions("drawer-open-v3", "eval"))
    env = MetaWorldEnv("drawer-open-v3", cameras=())
    seen = {env.reset(seed=s)[1]["instruction"] for s in range(20)}
    assert seen <= set(instructions("drawer-open-v3", "train")) and len(seen) >= 2
    with pytest.raises(ValueError, match="non-empty string"):
        env.reset(options={"instruction": ""})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"goal": 1})


def test_state_is_proprioception_and_layouts_vary_with_seed():
    env = MetaWorldEnv("pick-place-v3", cameras=())
    objects = []
    for seed in range(4):
        obs, info = env.reset(seed=seed)
        raw = info["privileged"]
        assert raw.shape == (39,)
        np.testing.assert_allclose(obs["state"], raw[:4].astype(np.float32))
        objects.append(raw[4:7].copy())
    assert len({tuple(np.round(o, 4)) for o in objects}) == 4, "each seed must place the object differently"
    # reset() without a seed continues deterministically from the env's generator
    a = MetaWorldEnv("pick-place-v3", cameras=(), seed=3)
    b = MetaWorldEnv("pick-place-v3", cameras=(), seed=3)
    assert np.array_equal(a.reset()[1]["privileged"], b.reset()[1]["privileged"])
    assert np.array_equal(a.reset()[1]["privileged"], b.reset()[1]["privileged"])


def test_first_observation_matches_the_layout():
    """MetaWorld moves bodies in reset without updating positions; the adapter must not show stale ones."""
    env = MetaWorldEnv("drawer-open-v3", cameras=())
    _, info = env.reset(seed=1)
    _, info2 = env.reset(seed=2)
    obs, _, _, _, info_step = env.step(np.zeros(4, np.float32))
    # a zero action barely moves the drawer handle: the reset observation must already be where it is
    assert np.linalg.norm(info2["privileged"][4:7] - info_step["privileged"][4:7]) < 0.005


def test_cameras_are_upright():
    """corner* cameras look from above with 'up' pointing down; the renderer rotates them 180 degrees."""
    env = MetaWorldEnv("drawer-open-v3", cameras=CAMERAS, image_size=32)
    env.reset(seed=0)
    assert env._renderer.rotated_cameras == {"corner", "corner2", "corner3", "corner4"}
    import mujoco

    model, data = env._mw.model, env._mw.data
    for cam in CAMERAS:
        cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, cam)
        up = data.cam_xmat[cid].reshape(3, 3)[:, 1]
        sign = -1 if cam in env._renderer.rotated_cameras else 1
        assert sign * up[2] >= -1e-6, f"{cam}: image up axis points down after rotation"
    env.close()


def test_actions_are_validated_and_episodes_end():
    env = MetaWorldEnv("reach-v3", cameras=(), max_episode_steps=3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action must have shape \(4,\), got \(3,\) at step 0"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="NaN/inf at step 0"):
        env.step(np.array([0, np.nan, 0, 0]))
    for _ in range(3):
        *_, truncated, _ = env.step(np.ones(4) * 5)  # out-of-range actions are clipped
    assert truncated
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(4))


@pytest.mark.parametrize("task", ["drawer-open-v3", "pick-place-v3", "button-press-topdown-v3", "door-close-v3"])
def test_expert_succeeds_with_ordered_labels(task):
    labels_expected = TASK_TEXT[task].labels
    for seed in (0, 1):
        success, labels, steps = run_expert(task, seed)
        assert success, f"{task} expert failed on seed {seed} after {steps} steps"
        assert steps <= default_max_episode_steps(task)
        runs = [k for k, _ in itertools.groupby(labels)]
        # labels appear in the task's order, each once, starting with the first
        assert runs == list(labels_expected[: len(runs)]), runs
        assert len(runs) >= 2, f"{task}: only {runs}"


def test_every_task_expert_labels_at_least_two_subtasks_in_order():
    """All 50 tasks: a successful expert episode (first of seeds 0-2) walks >= 2 labels in order."""
    bad = {}
    for task in TASK_NAMES:
        for seed in range(3):
            success, labels, _ = run_expert(task, seed)
            if success:
                break
        runs = [k for k, _ in itertools.groupby(labels)]
        expected = list(TASK_TEXT[task].labels)
        if not success or len(runs) < 2 or [expected.index(r) for r in runs] != sorted(expected.index(r) for r in runs):
            bad[task] = (success, runs)
    assert not bad, bad


def test_grasp_task_labels_all_three_phases():
    success, labels, _ = run_expert("pick-place-v3", 2)
    runs = [k for k, _ in itertools.groupby(labels)]
    assert success and runs == ["reach the puck", "grasp the puck", "carry the puck to the goal"]


def test_terminate_on_success_is_opt_in():
    env = MetaWorldEnv("reach-v3", cameras=(), max_episode_steps=120)
    expert = E.make_expert("metaworld", "reach-v3")
    obs, info = env.reset(seed=0)
    succeeded_at, steps = None, 0
    done = False
    while not done:
        action, _ = expert.act(obs, info)
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        assert not terminated, "must not terminate on success by default"
        if info["success"] and succeeded_at is None:
            succeeded_at = steps
        done = truncated
    assert succeeded_at is not None and steps == 120
    success, _, n = run_expert("reach-v3", 0)
    assert success and n == succeeded_at


def test_expert_needs_privileged_info():
    expert = E.make_expert("metaworld", "reach-v3")
    with pytest.raises(ValueError, match=r"info\['privileged'\] with shape \(39,\)"):
        expert.act({}, {"instruction": "x"})
