"""`vla collect`: a small store that verifies and carries instructions, subtasks and seeds."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from vla.datasets import EpisodeStore, StoreError, verify_store  # noqa: E402
from vla.envs.metaworld import instructions  # noqa: E402

from vla.commands import collect as collect_cmd  # noqa: E402


def run(tmp_path, *overrides: str, name: str = "demo.zarr") -> tuple[int, str]:
    out = tmp_path / name
    args = ["env=metaworld", f"out={out}", "image_size=32", "progress=false", *overrides]
    return collect_cmd.main(args), str(out)


def test_collect_in_process_writes_a_valid_store_and_appends(tmp_path, capsys):
    rc, out = run(tmp_path, "tasks=[drawer-open-v3]", "episodes=2", "workers=0", "cameras=[corner,gripperPOV]")
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("vla collect: done: kept 2 episodes, 0 failed") and out in line
    report = verify_store(out)
    assert report["ok"], report
    store = EpisodeStore(out)
    assert store.num_episodes == 2 and store.env == "metaworld" and store.fps == 80
    assert store.cameras == {"corner": (32, 32), "gripperPOV": (32, 32)}
    assert store.action_dim == 4 and store.state_dim == 4
    assert list(store.episode_seeds) == [0, 1] and store.episode_tasks == ["drawer-open-v3"] * 2
    assert set(store.episode_instructions) <= set(instructions("drawer-open-v3", "train"))
    ep = store.get_episode(0)
    T = len(ep["action"])
    assert ep["images"]["corner"].shape == (T, 32, 32, 3) and ep["state"].shape == (T, 4)
    assert ep["subtasks"][0] == "reach the drawer handle" and ep["subtasks"][-1] == "pull the drawer open"
    assert np.isfinite(ep["action"]).all() and np.abs(ep["action"]).max() <= 1.0

    # appending continues after the largest seed already stored for the task
    rc, _ = run(tmp_path, "tasks=[drawer-open-v3]", "episodes=1", "workers=0", "cameras=[corner,gripperPOV]")
    assert rc == 0
    store = EpisodeStore(out)
    assert list(store.episode_seeds) == [0, 1, 2]


def test_collect_with_a_spawned_worker(tmp_path, capsys):
    rc, out = run(tmp_path, "tasks=[reach-v3]", "episodes=2", "workers=1", "cameras=[topview]", "seed_start=40")
    assert rc == 0, capsys.readouterr()
    store = EpisodeStore(out)
    assert sorted(store.episode_seeds.tolist()) == [40, 41]
    assert store.cameras == {"topview": (32, 32)}
    labels = set(store.get_episode(0)["subtasks"])
    assert labels == {"move toward the goal", "reach the goal"}


def test_failed_episodes_are_dropped_unless_kept(tmp_path, capsys):
    # 5 steps are too few for the expert: every attempt fails
    common = ("tasks=[pick-place-v3]", "episodes=1", "workers=0", "cameras=[corner]", "max_episode_steps=5",
              "max_attempts_factor=1")
    rc, out = run(tmp_path, *common, name="drop.zarr")
    assert rc == 1
    line = capsys.readouterr().out
    assert "kept 0 episodes, 6 failed" in line and "fewer episodes than asked for" in line
    assert EpisodeStore(out).num_episodes == 0
    rc, out = run(tmp_path, *common, "keep_failed=true", name="keep.zarr")
    assert rc == 0
    ep = EpisodeStore(out).get_episode(0)
    assert len(ep["action"]) == 5


def test_tabletop_layout_is_recorded_in_the_store(tmp_path, capsys):
    out = tmp_path / "slots.zarr"
    args = ["env=tabletop", "env.layout=slots", "tasks=[pick-place]", "episodes=2", "workers=0", "image_size=32",
            "cameras=[front]", f"out={out}", "progress=false"]
    assert collect_cmd.main(args) == 0
    store = EpisodeStore(out)
    assert store.env_options == {"layout": "slots"} and store.num_episodes == 2
    # appending with the default layout would mix two worlds in one store: refused, naming both
    with pytest.raises(StoreError, match=r"env_options: store has \{'layout': 'slots'\}, writer asked for \{\}"):
        collect_cmd.main([a for a in args if not a.startswith("env.layout")])


@pytest.mark.parametrize(
    "override,message",
    [
        ("tasks=[drawer-opn-v3]", r"unknown metaworld task\(s\) \[.drawer-opn-v3.\]; available tasks: .*open-v3"),
        ("cameras=[front]", r"unknown MetaWorld camera\(s\) \['front'\]; available cameras"),
        ("seed_start=1000000", r"seed_start must be in \[COLLECT_SEED_START=0, EVAL_SEED_START=1000000\)"),
        ("episodes=0", "episodes must be >= 1"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, "tasks=[drawer-open-v3]", "workers=0", override)


def test_unknown_family_is_a_clear_error():
    from vla.config import compose

    with pytest.raises(ValueError, match="env"):
        compose("collect", ["env=nope"])
    cfg = compose("collect", ["env=metaworld"])
    cfg.env.family = "nope"
    with pytest.raises(ValueError, match=r"unknown env family 'nope'; available families: .*metaworld"):
        collect_cmd.collect(cfg)


def test_plan_retries_lost_seeds_and_stops_at_the_attempt_cap():
    plan = collect_cmd._Plan(["a"], episodes=2, first_seed={"a": 5}, max_attempts=3, keep_failed=False)
    j1, j2 = plan.next_job(), plan.next_job()
    assert (j1, j2) == (("a", 5), ("a", 6)) and plan.next_job() is None  # 2 in flight for 2 episodes
    plan.lost(j1)  # its worker died: the same seed is handed out again
    assert plan.next_job() == ("a", 5)
    assert plan.finished("a", success=False) is False
    assert plan.next_job() == ("a", 7)  # the failure freed a slot: the next seed
    assert plan.finished("a", True) and plan.finished("a", True)
    assert plan.kept["a"] == 2 and plan.failed["a"] == 1 and plan.next_job() is None


def test_a_killed_worker_loses_no_episode(tmp_path, monkeypatch, capsys):
    import multiprocessing
    import signal

    from vla.policies import ExpertPolicy

    # The fault comes from outside: on the 5th step a pool worker is killed mid-episode (SIGKILL).
    real_act_batch, calls = ExpertPolicy.act_batch, []

    def act_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        return real_act_batch(self, *args, **kwargs)

    monkeypatch.setattr(ExpertPolicy, "act_batch", act_batch)
    rc, out = run(tmp_path, "tasks=[reach-v3]", "episodes=3", "workers=2", "cameras=[topview]", "image_size=16")
    assert rc == 0
    assert "died (exit code -9)" in capsys.readouterr().err
    store = EpisodeStore(out)
    assert sorted(store.episode_seeds.tolist()) == [0, 1, 2]  # the lost episode was re-run from its seed
    assert verify_store(out)["ok"]


def test_collect_with_action_noise_stores_the_experts_actions_on_perturbed_states(tmp_path, capsys):
    common = ["env=tabletop", "env.layout=slots", "tasks=[pick-place]", "episodes=1", "workers=0", "image_size=32",
              "cameras=[front]", "progress=false"]
    assert collect_cmd.main([*common, f"out={tmp_path / 'clean.zarr'}"]) == 0
    assert collect_cmd.main([*common, "action_noise=0.3", f"out={tmp_path / 'noisy.zarr'}"]) == 0
    clean = EpisodeStore(tmp_path / "clean.zarr").get_episode(0)
    noisy = EpisodeStore(tmp_path / "noisy.zarr").get_episode(0)
    assert EpisodeStore(tmp_path / "noisy.zarr").episode_seeds.tolist() == [0]  # the same scene
    assert not np.array_equal(clean["state"][5:10], noisy["state"][5:10])  # the moves were perturbed
    assert np.abs(noisy["action"]).max() <= 1.0 and set(np.unique(noisy["action"][:, 3])) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match=r"action_noise must be >= 0 .*got -1"):
        collect_cmd.main([*common, "action_noise=-1", f"out={tmp_path / 'bad.zarr'}"])
    with pytest.raises(ValueError, match=r"action_noise must be >= 0 .*got lots"):
        collect_cmd.main([*common, "action_noise=lots", f"out={tmp_path / 'bad.zarr'}"])
    with pytest.raises(ValueError, match=r"noise_corr must be in \[0, 1\) .*got 1.5"):
        collect_cmd.main([*common, "action_noise=0.3", "noise_corr=1.5", f"out={tmp_path / 'bad.zarr'}"])
    assert not (tmp_path / "bad.zarr").exists()  # refused before anything is written
    assert collect_cmd.main([*common, "action_noise=0.3", "noise_corr=0.9", f"out={tmp_path / 'slow.zarr'}"]) == 0
    slow = EpisodeStore(tmp_path / "slow.zarr").get_episode(0)
    assert not np.array_equal(slow["state"][5:10], noisy["state"][5:10])  # the correlation reached the expert
