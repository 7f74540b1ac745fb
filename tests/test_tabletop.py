"""The tabletop suite: every family resets, steps and renders; seeds reproduce scenes; experts
succeed; goal checks fire on goal states only; the eval split is held out from training."""

from __future__ import annotations

import math

import numpy as np
import pytest
from vla.envs.pool import InProcessPool
from vla.envs.tabletop import FAMILY, list_tasks, make_env, make_expert
from vla.envs.tabletop import scene as S
from vla.envs.tabletop import tasks as T

from vla.bench.tabletop import run_expert_episodes

TASKS = list_tasks()


def test_suite_size_and_registration():
    assert len(TASKS) >= 8
    assert sum(T.get_family(t).num_subtasks >= 3 for t in TASKS) >= 3
    import vla.envs

    assert FAMILY is not None and FAMILY.name == "tabletop"
    assert vla.envs.list_tasks("tabletop") == TASKS
    env = vla.envs.make_env("tabletop", "push", cameras=(), seed=0)
    _, info = env.reset(seed=0)
    assert info["task"] == "push" and info["num_subtasks"] == 1
    assert FAMILY.episode_limit("drawer-put-away") == T.get_family("drawer-put-away").max_episode_steps == 260


@pytest.mark.parametrize("task", TASKS)
def test_reset_step_render(task):
    env = make_env(task, cameras=("front", "wrist"), image_size=(24, 32), seed=0)
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    for cam in ("front", "wrist"):
        assert obs["images"][cam].shape == (24, 32, 3) and obs["images"][cam].dtype == np.uint8
        assert obs["images"][cam].std() > 5          # a real picture, not a blank buffer
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert {"instruction", "task", "success", "subtasks_done", "num_subtasks", "privileged"} <= set(info)
    assert info["privileged"].shape == (T.PRIVILEGED_DIM,) and info["success"] is False
    assert info["subtasks_done"] == 0 and info["num_subtasks"] == len(env.episode.plan)
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        assert np.isfinite(obs["state"]).all() and np.isfinite(info["privileged"]).all()
        assert obs["images"]["front"].shape == (24, 32, 3)
    env.close()


def test_same_seed_same_scene():
    a = make_env("pick-place", cameras=("front",), image_size=32)
    b = make_env("pick-place", cameras=("front",), image_size=32)
    oa, ia = a.reset(seed=7)
    ob, ib = b.reset(seed=7)
    assert ia["instruction"] == ib["instruction"]
    np.testing.assert_array_equal(ia["privileged"], ib["privileged"])
    np.testing.assert_array_equal(oa["images"]["front"], ob["images"]["front"])
    _, ic = b.reset(seed=8)
    assert not np.array_equal(ia["privileged"], ic["privileged"])


@pytest.mark.parametrize("task", TASKS)
def test_expert_succeeds_with_ordered_subtask_labels(task):
    pool = InProcessPool("tabletop", 1, {"cameras": ()})
    for seed in (0, 1):
        (res,) = run_expert_episodes(pool, task, [seed])
        assert res["success"], f"{task} seed {seed}: expert failed ({res['subtasks_done']}/{res['num_subtasks']})"
        assert res["subtasks_done"] == res["num_subtasks"]
        ep = pool.env(0).episode
        want = [T.subtask_text(s, ep.colors, ep.shapes) for s in ep.plan]
        seen = [lab for i, lab in enumerate(res["labels"]) if i == 0 or lab != res["labels"][i - 1]]
        assert seen == want


def test_partial_progress_is_monotone_for_four_step_family():
    env = make_env("drawer-put-away", cameras=())
    expert = make_expert("drawer-put-away")
    obs, info = env.reset(seed=2)
    expert.reset()
    done = [info["subtasks_done"]]
    opened_at = None
    while not (info["success"] and expert.k >= 4):
        action, _ = expert.act(obs, info)
        obs, _, _, truncated, info = env.step(action)
        done.append(info["subtasks_done"])
        if opened_at is None and env.drawer_q() >= T.DRAWER_OPEN_Q:
            opened_at = len(done) - 1
        assert not truncated
    assert done == sorted(done) and done[0] == 0 and done[-1] == 4
    assert set(done) == {0, 1, 2, 3, 4}
    assert done[opened_at] >= 1


def _teleport(env, i: int, xyz) -> None:
    q = env._obj_qadr[i]
    env.data.qpos[q:q + 3] = xyz
    env.data.qpos[q + 3:q + 7] = (1, 0, 0, 0)
    env.data.qvel[env._obj_vadr[i]:env._obj_vadr[i] + 6] = 0


def _make_goal_state(env) -> None:
    """Move objects / the drawer straight into the state the plan asks for (no expert)."""
    import mujoco

    ep = env.episode
    d = env.data
    d.mocap_pos[0] = (0.0, -0.2, 0.25)      # hand out of the way
    d.qpos[env._hand_q:env._hand_q + 3] = (0.0, -0.2, 0.25)
    for st in ep.plan:
        if st.op == T.CLOSE:
            d.qpos[env._drawer_q] = 0.0
        elif st.op == T.OPEN and not any(s.op == T.CLOSE for s in ep.plan):
            d.qpos[env._drawer_q] = 0.14
    mujoco.mj_forward(env.model, d)
    slots: dict[int, int] = {}
    for st in ep.plan:
        if st.op in (T.PLACE_BOWL, T.PLACE_PLATE):
            body = env._bowl if st.op == T.PLACE_BOWL else env._plate
            k = slots[st.op] = slots.get(st.op, -1) + 1
            c = d.xpos[body]
            half = S.object_half_height(ep.shapes[st.a])
            _teleport(env, st.a, (c[0], c[1] - 0.03 + 0.06 * k, 0.01 + half))
        elif st.op == T.PLACE_DRAWER:
            c = d.xpos[env._drawer_body]
            x0, x1, y0, y1 = S.drawer_inner_bounds()
            _teleport(env, st.a, (c[0], c[1] + (y0 + y1) / 2, S.DRAWER_BASE_Z + 0.01 + S.CUBE_HALF + 0.005))
        elif st.op == T.PLACE_ON:
            base = d.xpos[env._obj_body[st.b]].copy()
            _teleport(env, st.a, (base[0], base[1], base[2] + 2 * S.CUBE_HALF + 0.002))
        elif st.op == T.PUSH:
            dx, dy = T.DIRECTION_VECTORS[T.DIRECTIONS[st.b]]
            p = d.xpos[env._obj_body[st.a]]
            _teleport(env, st.a, (p[0] + 0.12 * dx, p[1] + 0.12 * dy, p[2]))
        mujoco.mj_forward(env.model, d)
    for _ in range(150):                        # let everything come to rest
        mujoco.mj_step(env.model, d)


@pytest.mark.parametrize("task", TASKS)
def test_success_check_fires_on_goal_not_on_start(task):
    env = make_env(task, cameras=())
    for seed in (3, 4):
        _, info = env.reset(seed=seed)
        assert not info["success"] and not env._success()
        _make_goal_state(env)
        assert env._success(), f"{task} seed {seed}: goal state not recognised"


def test_pick_predicate_needs_the_hand():
    env = make_env("pick-place", cameras=())
    env.reset(seed=0)
    a = env.episode.plan[0].a
    p = env.data.xpos[env._obj_body[a]].copy()
    _teleport(env, a, (p[0], p[1], p[2] + 0.1))     # in the air but not held
    import mujoco

    mujoco.mj_forward(env.model, env.data)
    assert not env.step_holds(env.episode.plan[0])


@pytest.mark.parametrize("task", TASKS)
def test_eval_split_is_held_out(task):
    train, evals = set(), set()
    for seed in range(60):
        ep = T.sample_episode(task, np.random.default_rng(seed), "train")
        train.add(ep.instruction)
        assert not any((c, s) in T.HELD_OUT for c, s in zip(ep.colors, ep.shapes)), ep.instruction
    for seed in range(30):
        ep = T.sample_episode(task, np.random.default_rng(10_000 + seed), "eval")
        evals.add(ep.instruction)
        objs = {st.a for st in ep.plan if st.a >= 0} | {st.b for st in ep.plan if st.op == T.PLACE_ON}
        if objs:
            assert any((ep.colors[i], ep.shapes[i]) in T.HELD_OUT for i in objs), ep.instruction
    assert not train & evals
    assert not set(T.TEMPLATES[task]["train"]) & set(T.TEMPLATES[task]["eval"])


@pytest.mark.parametrize("task", ["pick-place", "pick-place-two", "drawer-put-away"])
def test_paraphrase_split_holds_out_wording_only(task):
    """paraphrase = the eval templates over the training objects: same scene as train for a seed."""
    for seed in range(20):
        tr = T.sample_episode(task, np.random.default_rng(seed), "train")
        pa = T.sample_episode(task, np.random.default_rng(seed), "paraphrase")
        assert not any((c, s) in T.HELD_OUT for c, s in zip(pa.colors, pa.shapes)), pa.instruction
        assert pa.colors == tr.colors and pa.plan == tr.plan
        np.testing.assert_array_equal(pa.object_xy, tr.object_xy)
        templates = T.TEMPLATES[task]["eval"]
        assert any(_matches(t, pa.instruction) for t in templates), pa.instruction


def _matches(template: str, text: str) -> bool:
    import re

    pattern = re.escape(template)
    for key in ("a", "b", "c", "where", "dir"):
        pattern = pattern.replace(re.escape("{" + key + "}"), ".+")
    return re.fullmatch(pattern, text) is not None


def test_instruction_option_and_privileged_roundtrip():
    env = make_env("stack", cameras=())
    _, info = env.reset(seed=0, options={"instruction": "stack them please"})
    assert info["instruction"] == "stack them please" == env.instruction
    dec = T.decode_privileged(info["privileged"])
    assert dec["plan"] == env.episode.plan
    assert [o["color"] for o in dec["objects"]] == env.episode.colors
    assert math.isclose(dec["gap"], S.MAX_OPENING, abs_tol=1e-3)


def test_truncation_and_terminate_on_success():
    env = make_env("drawer-open", cameras=(), max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(4, np.float32))[3] for _ in range(3)]
    assert flags == [False, False, True]
    env = make_env("drawer-open", cameras=(), terminate_on_success=True)
    expert = make_expert("drawer-open")
    obs, info = env.reset(seed=0)
    terminated = False
    for _ in range(env.max_episode_steps):
        obs, reward, terminated, _, info = env.step(expert.act(obs, info)[0])
        if terminated:
            break
    assert terminated and info["success"] and reward == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown tabletop task 'nope'"):
        make_env("nope")
    with pytest.raises(ValueError, match="unknown"):
        make_env("push", cameras=("top",))
    with pytest.raises(ValueError, match="instruction_split"):
        make_env("push", cameras=(), instruction_split="test")
    env = make_env("push", cameras=())
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*step 0"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([0, np.nan, 0, 0]))
    with pytest.raises(ValueError, match="privileged"):
        make_expert("push").act({}, {})


def test_expert_recovers_when_the_object_is_knocked_out_of_the_hand():
    import mujoco

    env = make_env("pick-place", cameras=())
    expert = make_expert("pick-place")
    obs, info = env.reset(seed=5)
    expert.reset()
    a = env.episode.plan[0].a
    knocked = False
    for _ in range(env.max_episode_steps):
        action, _ = expert.act(obs, info)
        obs, _, _, _, info = env.step(action)
        if not knocked and expert.k == 1 and expert.phase == "carry":
            env.data.ctrl[:] = 0.0                       # open the fingers and drop the object back
            _teleport(env, a, (*env._rest[a, :2], env._rest[a, 2] + 0.002))
            env.data.qpos[env._finger_q[0]] = env.data.qpos[env._finger_q[1]] = 0.0
            mujoco.mj_forward(env.model, env.data)
            obs, info = env._obs(), env._info()
            knocked = True
        if info["success"] and expert.k >= 2:
            break
    assert knocked and info["success"]


def test_distractor_count_varies_and_parked_slots_are_inert():
    counts = set()
    for seed in range(12):
        ep = T.sample_episode("pick-place", np.random.default_rng(seed), "train")
        assert all(ep.present[st.a] for st in ep.plan)            # the plan's objects are always there
        counts.add(sum(ep.present))
    assert len(counts) >= 2 and min(counts) >= 2                   # target + at least one distractor
    env = make_env("pick-place", cameras=())
    for seed in range(12):
        _, info = env.reset(seed=seed)
        if not all(env.episode.present):
            break
    parked = env.episode.present.index(False)
    start = env.data.xpos[env._obj_body[parked]].copy()
    for _ in range(5):
        env.step(np.zeros(4, np.float32))
    np.testing.assert_allclose(env.data.xpos[env._obj_body[parked]], start, atol=1e-6)   # floats, untouched
    assert env.model.geom_rgba[env._obj_geom[parked], 3] == 0 and env.model.geom_contype[env._obj_geom[parked]] == 0
    dec = T.decode_privileged(info["privileged"])
    assert [o["present"] for o in dec["objects"]] == env.episode.present


def test_slots_layout_fixes_places_and_varies_the_named_object():
    """layout="slots": every episode of a scene uses the same places (within the jitter), families of
    one scene share them, colours and the named object still change, and the expert still succeeds."""
    lay = T._slot_layout("pick-place")
    assert lay == T._slot_layout("pick-place-two")          # one scene, one layout
    assert lay != T._slot_layout("stack")
    targets, colors = set(), set()
    for seed in range(40):
        ep = T.sample_episode("pick-place", np.random.default_rng(seed), "train", "slots")
        assert np.abs(ep.bowl_xy - lay.bowl).max() <= T.SLOT_JITTER
        assert np.abs(ep.plate_xy - lay.plate).max() <= T.SLOT_JITTER
        for i, present in enumerate(ep.present):
            if present:
                assert np.abs(ep.object_xy[i] - lay.objects[i]).max() <= T.SLOT_JITTER
        targets.add(ep.plan[0].a)
        colors.add(tuple(ep.colors))
    assert targets == {0, 1, 2, 3} and len(colors) > 20
    # the random layout (the default) moves the places
    a = T.sample_episode("pick-place", np.random.default_rng(0))
    b = T.sample_episode("pick-place", np.random.default_rng(1))
    assert np.abs(a.bowl_xy - b.bowl_xy).max() > 2 * T.SLOT_JITTER
    # pushes keep a clear corridor; the expert succeeds in the fixed places
    pool = InProcessPool("tabletop", 1, {"cameras": (), "layout": "slots"})
    for task in ("push", "pick-place-two", "drawer-retrieve"):
        (res,) = run_expert_episodes(pool, task, [3])
        assert res["success"], f"{task}: expert failed in layout=slots"
    with pytest.raises(ValueError, match=r"layout must be one of \('random', 'slots'\), got 'grid'"):
        make_env("push", cameras=(), layout="grid")
