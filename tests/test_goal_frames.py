"""Goal frames (vla.datasets.goal_frames): the reset-frame target agrees with the expert's real first
grasp, the store round-trips and is written whole or not at all, mismatches are named, and the
trainer mixes the frames into batches where only the goal and plan losses see them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_utils import make_store, train_cfg
from vla.datasets import StoreError
from vla.datasets.goal_frames import GoalFrames, concat_batches, write_goal_frames


@pytest.mark.parametrize("task", ["pick-place", "pick-place-two"])
def test_first_grasp_state_is_where_the_expert_first_closes(task):
    from vla.envs import make_env, make_expert
    from vla.envs.tabletop.expert import first_grasp_state

    env = make_env("tabletop", task, cameras=(), layout="slots")
    expert = make_expert("tabletop", task)
    for seed in (0, 1):
        obs, info = env.reset(seed=seed)
        expert.reset()
        target, labels = first_grasp_state(obs, info)
        assert labels[0].startswith("pick up") and len(labels) == (2 if task == "pick-place" else 4)
        prev = None
        for _ in range(200):
            action, label = expert.act(obs, info)
            if prev is not None and (action[-1] > 0) != (prev > 0):  # the first gripper switch
                break
            assert label == labels[0]
            prev = action[-1]
            obs, _, _, _, info = env.step(action)
        else:
            pytest.fail("the expert never closed the gripper")
        # what WindowDataset's goal_state would be for this episode's first frames
        np.testing.assert_allclose(obs["state"][:2], target[:2], atol=0.006)
        assert abs(obs["state"][2] - target[2]) < 0.006 and abs(obs["state"][3] - target[3]) < 1e-3
    env.close()


def test_first_grasp_state_refuses_plans_that_do_not_start_with_a_pick():
    from vla.envs import make_env
    from vla.envs.tabletop.expert import first_grasp_state

    env = make_env("tabletop", "drawer-open", cameras=())
    obs, info = env.reset(seed=0)
    with pytest.raises(ValueError, match=r"'drawer-open' starts with .*not a pick.*\['pick-place', 'stack', "):
        first_grasp_state(obs, info)
    env.close()


def test_starts_with_pick_agrees_with_first_grasp_state_on_every_family():
    from vla.envs import make_env
    from vla.envs.tabletop.expert import first_grasp_state
    from vla.envs.tabletop.tasks import list_tasks, starts_with_pick

    picks = []
    for task in list_tasks():
        env = make_env("tabletop", task, cameras=())
        for seed in (0, 1):  # the answer is the family's, whatever the seed
            obs, info = env.reset(seed=seed)
            try:
                first_grasp_state(obs, info)
                has_goal_frame = True
            except ValueError:
                has_goal_frame = False
            assert starts_with_pick(task) == has_goal_frame, (task, seed)
        env.close()
        picks.append(starts_with_pick(task))
    assert 0 < sum(picks) < len(picks)  # both kinds exist
    with pytest.raises(ValueError, match="unknown tabletop task 'nope'"):
        starts_with_pick("nope")


def _frames(n=6, hw=16, cams=("cam0",), state_dim=2, tasks=("reach", "push")):
    rng = np.random.default_rng(0)
    return {
        "images": {c: rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8) for c in cams},
        "state": rng.normal(size=(n, state_dim)).astype(np.float32),
        "goal_state": rng.normal(size=(n, state_dim)).astype(np.float32),
        "task": [tasks[i % len(tasks)] for i in range(n)],
        "instruction": [f"do {tasks[i % len(tasks)]}" for i in range(n)],
        "plan": ["go; stop"] * n,
        "seed": list(range(100, 100 + n)),
    }


def test_write_read_round_trip_and_batch_layout(tmp_path):
    fr = _frames()
    path = write_goal_frames(tmp_path / "gf.zarr", fr, {"env": "synthetic", "fps": 10})
    gf = GoalFrames(path)
    assert len(gf) == 6 and gf.cameras == ["cam0"] and gf.image_hw == (16, 16)
    np.testing.assert_array_equal(gf.images["cam0"], fr["images"]["cam0"])
    np.testing.assert_array_equal(gf.goal_state, fr["goal_state"])
    assert gf.plans == fr["plan"] and gf.seeds == fr["seed"] and gf.subtasks == ["go"] * 6
    b = gf.batch(np.array([4, 1]), ["cam0"], n_obs_steps=2, horizon=5, action_dim=3, frame_camera="cam0")
    assert b["images"]["cam0"].shape == (2, 2, 16, 16, 3) and b["state"].shape == (2, 2, 2)
    assert torch.equal(b["images"]["cam0"][0, 0], b["images"]["cam0"][0, 1])  # the frame fills the history
    np.testing.assert_array_equal(b["goal_state"].numpy(), fr["goal_state"][[4, 1]])
    assert b["action"].shape == (2, 5, 3) and bool(b["action_is_pad"].all()) and bool(b["future_is_pad"].all())
    assert b["task"] == ["reach", "push"] and b["plan"] == ["go; stop"] * 2
    both = concat_batches(b, b)
    assert both["state"].shape == (4, 2, 2) and both["task"] == b["task"] * 2
    with pytest.raises(StoreError, match="exists; goal-frame stores are written once"):
        write_goal_frames(path, fr, {"env": "synthetic"})


def test_a_bad_write_leaves_nothing_and_bad_paths_are_named(tmp_path):
    fr = _frames()
    fr["seed"] = fr["seed"][:-1]
    with pytest.raises(StoreError, match="seed has 5 entries, task has 6"):
        write_goal_frames(tmp_path / "gf.zarr", fr, {"env": "synthetic"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="not found .*vla collect goal_frames"):
        GoalFrames(tmp_path / "nothing.zarr")
    store = make_store(tmp_path / "store.zarr")
    with pytest.raises(StoreError, match="expected 'vla-goal-frames'"):
        GoalFrames(store)


def test_mismatched_frames_are_named(tmp_path):
    from vla.datasets import EpisodeStore

    store = EpisodeStore(make_store(tmp_path / "store.zarr"))
    small = GoalFrames(write_goal_frames(tmp_path / "a.zarr", _frames(hw=8), {"env": "synthetic"}))
    with pytest.raises(StoreError, match="camera cam0 is 8x8 in the goal frames but 16x16 in the store"):
        small.check_compatible(store, ["cam0"], ["reach", "push"])
    other = GoalFrames(write_goal_frames(tmp_path / "b.zarr", _frames(tasks=("lift",)), {"env": "synthetic"}))
    with pytest.raises(StoreError, match=r"tasks \['lift'\] that are not trained on"):
        other.check_compatible(store, ["cam0"], ["reach", "push"])
    wrong_env = GoalFrames(write_goal_frames(tmp_path / "c.zarr", _frames(), {"env": "tabletop"}))
    with pytest.raises(StoreError, match="from env 'tabletop', the store from 'synthetic'"):
        wrong_env.check_compatible(store, ["cam0"], ["reach", "push"])


def test_trainer_mixes_goal_frames_into_each_batch(tmp_path):
    from vla.training import Trainer
    from vla.training import distributed as dist_utils

    store = make_store(tmp_path / "store.zarr", episodes=4)
    fr = _frames(n=8)
    fr["goal_state"] = np.array([[1.0, 1.0] if t == "reach" else [0.0, 0.0] for t in fr["task"]], np.float32)
    gf = write_goal_frames(tmp_path / "gf.zarr", fr, {"env": "synthetic", "fps": 10})  # the words decide the goal
    with pytest.raises(ValueError, match="set model.goal_loss_weight > 0"):
        Trainer(train_cfg(store, tmp_path / "r0", f"dataset.goal_frames={gf}"), dist_utils.init("cpu"))
    cfg = train_cfg(store, tmp_path / "run", f"dataset.goal_frames={gf}", "dataset.goal_frames_batch=3",
                    "model.goal_loss_weight=1.0", "trainer.steps=120", "trainer.lr=3e-3", "trainer.warmup_steps=0")
    t = Trainer(cfg, dist_utils.init("cpu"))
    raw = next(iter(t.loader()))
    b = len(raw["task"])
    mixed, again = t._with_goal_frames(raw, 5), t._with_goal_frames(raw, 5)
    assert len(mixed["task"]) == b + 3 and mixed["state"].shape[0] == b + 3
    assert torch.equal(mixed["goal_state"], again["goal_state"])  # drawn by (seed, step): resumable
    assert bool(mixed["action_is_pad"][b:].all()) and not bool(mixed["action_is_pad"][:b].all())

    # The frames teach the goal head their targets: after the same steps, a run with them predicts the
    # frames' goals better than the same run without them (the demo windows alone never show them).
    def goal_error(trainer):
        mc, frames = trainer.model_cfg, trainer.goal_frames or t.goal_frames
        probe = trainer.processor.training_batch(frames.batch(np.arange(8), list(mc.cameras), mc.n_obs_steps,
                                                              mc.horizon, mc.action_dim, mc.frame_camera), "cpu")
        trainer.raw_model.eval()
        with torch.no_grad():
            return float((trainer.raw_model.predict_goal(probe) - probe["goal_state"]).pow(2).mean())

    t.run(tmp_path / "run")
    plain = Trainer(train_cfg(store, tmp_path / "plain", "model.goal_loss_weight=1.0", "trainer.steps=120",
                              "trainer.lr=3e-3", "trainer.warmup_steps=0"), dist_utils.init("cpu"))
    plain.run(tmp_path / "plain")
    assert goal_error(t) < 0.5 * goal_error(plain)
    with pytest.raises(ValueError, match="goal_frames_batch=9 is larger than the 8 frames"):
        Trainer(train_cfg(store, tmp_path / "r1", f"dataset.goal_frames={gf}", "dataset.goal_frames_batch=9",
                          "model.goal_loss_weight=1.0"), dist_utils.init("cpu"))


def test_collect_goal_frames_writes_reset_frames_with_their_targets(tmp_path, capsys):
    from vla.envs import make_env
    from vla.envs.tabletop.expert import first_grasp_state

    from vla.cli import main as cli_main

    out = tmp_path / "gf.zarr"
    args = ["collect", "env=tabletop", "env.layout=slots", "tasks=[pick-place,pick-place-two]", "goal_frames=3",
            "image_size=32", "cameras=[front]", "seed_start=500", f"out={out}"]
    assert cli_main(args) == 0
    gf = GoalFrames(out)
    assert len(gf) == 6 and gf.tasks == ["pick-place"] * 3 + ["pick-place-two"] * 3
    assert gf.seeds == [500, 501, 502] * 2 and gf.image_hw == (32, 32) and gf.env_options == {"layout": "slots"}
    env = make_env("tabletop", "pick-place-two", cameras=("front",), image_size=32, layout="slots")
    obs, info = env.reset(seed=501)
    goal, labels = first_grasp_state(obs, info)
    np.testing.assert_allclose(gf.goal_state[4], goal)
    np.testing.assert_array_equal(gf.images["front"][4], obs["images"]["front"])
    assert gf.instructions[4] == info["instruction"] and gf.plans[4] == "; ".join(labels)
    env.close()
    capsys.readouterr()
    assert cli_main(args) != 0
    assert "exists; goal frames are written to a new path" in capsys.readouterr().err
    assert cli_main(["collect", "env=metaworld", "goal_frames=2", f"out={tmp_path / 'mw.zarr'}"]) != 0
    assert "env 'metaworld' has no goal frames" in capsys.readouterr().err
