"""The probe scripts' pure parts: scripts/goal_probe.py's place clustering (goals on a few fixed places, layout=slots,
jitter <= 1.5 cm, become one place each; goals spread over the table stay apart), scripts/grasp_probe.py's
summary and scripts/plan_grounding.py's check."""

import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_module(name: str = "goal_probe"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goal_places_clusters_jittered_slots():
    mod = load_module()
    rng = np.random.default_rng(0)
    slots = np.array([[0.1, 0.2], [-0.15, 0.05], [0.0, -0.2], [0.2, -0.1]])
    which = rng.integers(0, 4, 40)
    goals = slots[which] + rng.uniform(-0.015, 0.015, (40, 2))
    places = mod.goal_places(goals)
    assert places.shape == (4, 2)
    # every place is the mean of its own slot's goals, within the jitter of the slot
    for p in places:
        assert np.linalg.norm(slots - p, axis=1).min() < 0.015


def test_goal_places_keeps_distinct_goals_apart():
    mod = load_module()
    goals = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.03, 0.0]])
    places = mod.goal_places(goals, radius=0.04)
    assert len(places) == 3  # the 3 cm neighbour joins the first place, the others stay apart
    np.testing.assert_allclose(places[0], [0.015, 0.0])


def test_confusion_names_the_object_nearest_the_prediction(tmp_path):
    from vla.datasets.goal_frames import GoalFrames

    from vla.cli import main as cli_main

    mod = load_module()
    out = tmp_path / "gf.zarr"
    assert cli_main(["collect", "env=tabletop", "env.layout=slots", "tasks=[pick-place]", "goal_frames=4",
                     "image_size=16", "cameras=[front]", f"out={out}"]) == 0
    assert mod.is_goal_frames(str(out)) and not mod.is_goal_frames(str(tmp_path))
    true_xy = GoalFrames(out).goal_state[:, :2]
    assert mod.confusion(str(out), true_xy) == {"named": 1.0, "same shape": 0.0, "same colour": 0.0, "neither": 0.0}


def test_summary_splits_successes_from_failures_and_skips_missing_values():
    probe = load_module("grasp_probe")
    rows = [
        {"success": True, "goal_err_cm": 1.0, "close_offset_cm": [0.3, 0.4, 0.0]},
        {"success": True, "goal_err_cm": 3.0, "close_offset_cm": [0.6, 0.8, 1.0]},
        {"success": False, "goal_err_cm": 4.0, "close_offset_cm": [3.0, 4.0, 0.0]},
        {"success": False, "goal_err_cm": None, "close_offset_cm": None},  # never closed, no goal head
    ]
    out = probe.summarize(rows)
    assert out["success"] == {"episodes": 2, "goal_err_cm": 2.0, "close_xy_offset_cm": 0.75}  # hypot 0.5 and 1.0
    assert out["failure"] == {"episodes": 2, "goal_err_cm": 4.0, "close_xy_offset_cm": 5.0}
    only_failures = probe.summarize([{"success": False, "goal_err_cm": None, "close_offset_cm": None}])
    assert set(only_failures) == {"failure"} and math.isnan(only_failures["failure"]["goal_err_cm"])


def test_summary_per_pick_counts_only_episodes_that_reached_the_pick():
    probe = load_module("grasp_probe")
    def pick(done, goal_err, offset):
        return {"success": done, "goal_err_cm": goal_err, "close_offset_cm": offset}

    first_ok = pick(True, 1.0, [1.0, 0.0, 0.0])
    rows = [
        {"success": True, "picks": [first_ok, pick(True, 2.0, [0.0, 2.0, 0.0])]},
        {"success": False, "picks": [first_ok, pick(False, 6.0, [6.0, 8.0, 0.0])]},
        {"success": False, "picks": [pick(False, 9.0, None)]},  # never closed, never got further
    ]
    second = probe.summarize(rows, pick=1)
    assert second == {"success": {"episodes": 1, "goal_err_cm": 2.0, "close_xy_offset_cm": 2.0},
                      "failure": {"episodes": 1, "goal_err_cm": 6.0, "close_xy_offset_cm": 10.0}}
    first = probe.summarize(rows, pick=0)  # split by the pick, not by the episode: the second row's first pick was done
    assert first["success"] == {"episodes": 2, "goal_err_cm": 1.0, "close_xy_offset_cm": 1.0}
    assert first["failure"]["episodes"] == 1 and first["failure"]["goal_err_cm"] == 9.0
    assert math.isnan(first["failure"]["close_xy_offset_cm"])  # it never closed
    assert probe.summarize(rows, pick=2) == {}


def test_plan_grounding_counts_steps_that_name_the_instructions_words(tmp_path, capsys):
    import json

    import pytest

    mod = load_module("plan_grounding")
    assert mod.grounded("could you set the cyan block on the plate", "pick up the cyan cube")  # block = cube
    assert mod.grounded("the red cube and the blue cylinder both go in the bowl", "put it in the bowl")
    assert not mod.grounded("the red cube goes in the bowl", "pick up the green cube")  # the wrong colour
    assert not mod.grounded("the red cube goes in the bowl", "put it on the plate")  # the wrong receptacle
    assert not mod.grounded("the red cube goes in the bowl", "wave")  # not a pick or place step
    info = {"episodes": [
        {"instruction": "the red cube goes in the bowl", "final_plan": ["pick up the red cube", "put it on the plate"]},
        {"instruction": "put the cyan block on the plate", "final_plan": ["put it on the plate"]},
        {"instruction": "the red cube goes in the bowl", "final_plan": []}]}
    path = tmp_path / "eval_info.json"
    path.write_text(json.dumps(info))
    assert mod.main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["grounded"], out["steps"]) == (2, 3)
    miss = {"instruction": "the red cube goes in the bowl", "step": "put it on the plate"}
    assert out["files"][0]["misses"] == [miss]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad.json has no 'episodes' \(expected a `vla eval` eval_info.json\)"):
        mod.main([str(tmp_path / "bad.json")])
