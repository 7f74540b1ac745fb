"""The env registry and the observation contract, over every registered family."""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import vla.envs as E  # noqa: E402
from vla.envs.registry import EnvFamily  # noqa: E402

FAMILIES = E.list_families(include_unavailable=True)


def _family_or_skip(name: str) -> EnvFamily:
    reason = E.family_status()[name]
    if reason is not None:
        pytest.skip(f"family {name} unavailable: {reason}")
    return E.get_family(name)


def _smoke_tasks() -> list[tuple[str, str]]:
    """First and last task of every family that loads (all tasks are listed in test_tasks_listed)."""
    pairs = []
    for name in FAMILIES:
        if E.family_status()[name] is not None:
            continue
        tasks = E.list_tasks(name)
        pairs += [(name, t) for t in dict.fromkeys([tasks[0], tasks[-1]])]
    return pairs


def test_seed_ranges_are_disjoint():
    assert E.COLLECT_SEED_START == 0 and E.EVAL_SEED_START == 1_000_000


def test_metaworld_family_registered():
    assert "metaworld" in E.list_families()
    fam = E.get_family("metaworld")
    assert isinstance(fam, EnvFamily) and fam.name == "metaworld"
    assert len(E.list_tasks("metaworld")) == 50
    assert fam.default_cameras == ("corner", "gripperPOV")
    assert 50 <= fam.episode_limit("drawer-open-v3") <= 500


@pytest.mark.parametrize("name", FAMILIES)
def test_tasks_listed(name):
    fam = _family_or_skip(name)
    tasks = fam.list_tasks()
    assert tasks and len(set(tasks)) == len(tasks) and all(isinstance(t, str) for t in tasks)
    for t in tasks:
        assert fam.episode_limit(t) >= 1
    assert fam.default_cameras


def test_unavailable_family_does_not_break_others(monkeypatch):
    from vla.envs import registry

    monkeypatch.setitem(registry._FAMILY_MODULES, "broken", "vla.envs.no_such_module:FAMILY")
    status = E.family_status()
    assert status["metaworld"] is None
    assert "no_such_module" in status["broken"]
    assert "broken" not in E.list_families() and "broken" in E.list_families(include_unavailable=True)
    with pytest.raises(ValueError, match="env family 'broken' is unavailable"):
        E.make_env("broken", "x")
    registry._FAILED.pop("broken", None)


def test_unknown_family_task_camera_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown env family 'nope'; available families: .*metaworld"):
        E.make_env("nope", "drawer-open-v3")
    with pytest.raises(ValueError, match=r"unknown metaworld task 'drawer-opn-v3'; available tasks: .*drawer-open-v3"):
        E.make_env("metaworld", "drawer-opn-v3")
    with pytest.raises(ValueError, match=r"unknown metaworld task"):
        E.make_expert("metaworld", "drawer-opn-v3")
    with pytest.raises(ValueError, match=r"unknown MetaWorld camera\(s\) \['front'\]; available cameras: .*gripperPOV"):
        E.make_env("metaworld", "drawer-open-v3", cameras=("corner", "front"))
    with pytest.raises(ValueError, match="instruction_split"):
        E.make_env("metaworld", "drawer-open-v3", instruction_split="test")


@pytest.mark.parametrize("name,task", _smoke_tasks())
def test_env_contract(name, task):
    """reset/step/render with the declared spaces, no NaN, info keys, instruction option."""
    fam = E.get_family(name)
    cams = tuple(fam.default_cameras)
    env = E.make_env(name, task, cameras=cams, image_size=32, max_episode_steps=5)
    try:
        obs, info = env.reset(seed=7)
        assert env.observation_space.contains(obs), "first observation outside the declared space"
        assert set(obs["images"]) == set(cams)
        for cam in cams:
            img = obs["images"][cam]
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            assert img.std() > 1.0, f"{cam} image is blank"
        assert obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
        for key in ("instruction", "task", "success", "privileged"):
            assert key in info, key
        assert info["task"] == task and isinstance(info["success"], bool)
        assert isinstance(info["instruction"], str) and info["instruction"]
        assert env.unwrapped.instruction == info["instruction"]
        assert env.action_space.shape == (len(env.action_space.low),)
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
        steps = 0
        terminated = truncated = False
        while not (terminated or truncated):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
            steps += 1
            assert env.observation_space.contains(obs)
            assert np.isfinite(reward) and np.isfinite(obs["state"]).all()
        assert steps == 5 and truncated, "episode must truncate at max_episode_steps"
        _, info = env.reset(seed=7, options={"instruction": "do the thing"})
        assert info["instruction"] == "do the thing" == env.unwrapped.instruction
    finally:
        env.close()


@pytest.mark.parametrize("name,task", _smoke_tasks())
def test_same_seed_same_first_observation(name, task):
    env = E.make_env(name, task, cameras=E.get_family(name).default_cameras[:1], image_size=32)
    try:
        o1, i1 = env.reset(seed=11)
        o2, i2 = env.reset(seed=12)
        o3, i3 = env.reset(seed=11)
        cam = next(iter(o1["images"]))
        assert np.array_equal(o1["images"][cam], o3["images"][cam])
        assert np.array_equal(o1["state"], o3["state"]) and i1["instruction"] == i3["instruction"]
        assert np.array_equal(i1["privileged"], i3["privileged"])
        assert not np.array_equal(i1["privileged"], i2["privileged"]), "different seeds must change the layout"
    finally:
        env.close()


def test_expert_interface_every_family():
    for name, task in _smoke_tasks():
        env = E.make_env(name, task, cameras=())
        expert = E.make_expert(name, task)
        obs, info = env.reset(seed=0)
        expert.reset()
        action, label = expert.act(obs, info)
        assert action.dtype == np.float32 and action.shape == env.action_space.shape
        assert isinstance(label, str) and label
        env.close()


def test_gym_make_registered_id():
    assert E.gym_id("metaworld", "drawer-open-v3") == "vla/MetaWorld-drawer-open-v3"
    env = gym.make("vla/MetaWorld-drawer-open-v3", cameras=("topview",), image_size=24)
    try:
        obs, info = env.reset(seed=1)
        assert obs["images"]["topview"].shape == (24, 24, 3) and info["task"] == "drawer-open-v3"
    finally:
        env.close()


def test_sync_vector_env():
    venv = E.make_vector_env("metaworld", ["reach-v3", "drawer-open-v3"], seeds=5, asynchronous=False,
                             cameras=("corner",), image_size=24, max_episode_steps=3)
    try:
        obs, infos = venv.reset(seed=[5, 6])
        assert obs["images"]["corner"].shape == (2, 24, 24, 3) and obs["state"].shape == (2, 4)
        assert list(infos["task"]) == ["reach-v3", "drawer-open-v3"]
        for _ in range(3):
            obs, rew, term, trunc, infos = venv.step(np.zeros((2, 4), np.float32))
        assert trunc.all()
    finally:
        venv.close()
    with pytest.raises(ValueError, match="got 3 tasks for n_envs=2"):
        E.make_vector_env("metaworld", ["reach-v3"] * 3, n_envs=2)


def test_async_vector_env_spawn():
    venv = E.make_vector_env("metaworld", "reach-v3", seeds=[3, 4], n_envs=2, cameras=("gripperPOV",), image_size=16)
    try:
        obs, infos = venv.reset(seed=[3, 4])
        assert obs["images"]["gripperPOV"].shape == (2, 16, 16, 3)
        obs, rew, term, trunc, infos = venv.step(np.zeros((2, 4), np.float32))
        assert np.isfinite(rew).all() and obs["state"].dtype == np.float32
    finally:
        venv.close()


@pytest.mark.parametrize("family, task, camera", [("tabletop", "pick-place", "front"),
                                                  ("metaworld", "drawer-open-v3", "corner")])
def test_observe_images_false_skips_rendering_and_changes_nothing_else(family, task, camera):
    _family_or_skip(family)
    lazy = E.make_env(family, task, cameras=(camera,), image_size=32, render_mode="rgb_array")
    full = E.make_env(family, task, cameras=(camera,), image_size=32, render_mode="rgb_array")
    try:
        o1, _ = lazy.reset(seed=5)
        o2, _ = full.reset(seed=5)
        assert o1["images"][camera].shape == (32, 32, 3)  # a reset always renders
        lazy.observe_images = False
        action = np.array([0.3, -0.2, 0.1, 0.5], np.float32)
        for _ in range(3):
            r1, r2 = lazy.step(action), full.step(action)
            assert sorted(r1[0]) == ["state"] and np.array_equal(r1[0]["state"], r2[0]["state"])
            assert r1[1:4] == r2[1:4] and r1[4]["success"] == r2[4]["success"]
        assert np.array_equal(lazy.render(), full.render())  # render() still shows the current scene
        lazy.observe_images = True
        r1, r2 = lazy.step(action), full.step(action)
        assert np.array_equal(r1[0]["images"][camera], r2[0]["images"][camera])
    finally:
        lazy.close()
        full.close()
