"""EpisodeWriter / EpisodeStore / verify_store: round trips, appends, stats, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from store_helpers import CAMERAS, A, S, make_episode, open_writer, write_store
from vla.datasets import EpisodeStore, StoreError, verify_store
from vla.datasets.stats import STAT_KEYS, guard_stats


def _assert_episode_equal(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["action"], want["action"])
    np.testing.assert_array_equal(got["state"], want["state"])
    assert set(got["images"]) == set(want["images"])
    for cam in want["images"]:
        np.testing.assert_array_equal(got["images"][cam], want["images"][cam])
        assert got["images"][cam].dtype == np.uint8
    assert got["subtasks"] == want["subtasks"]
    assert got["instruction"] == want["instruction"]
    assert got["task"] == want["task"]
    assert got["seed"] == want["seed"]


@pytest.mark.parametrize("in_memory", [False, True])
def test_round_trip_two_cameras(tmp_path, in_memory):
    eps = write_store(tmp_path / "s", lengths=(5, 7, 4, 9))
    s = EpisodeStore(tmp_path / "s", in_memory=in_memory)
    assert s.num_episodes == 4 and len(s) == 4
    assert s.num_steps == 25
    np.testing.assert_array_equal(s.episode_ends, [5, 12, 16, 25])
    assert s.episode_ends.dtype == np.int64
    assert s.cameras == {k: tuple(v) for k, v in CAMERAS.items()}
    assert (s.action_dim, s.state_dim, s.fps, s.env) == (A, S, 10.0, "synthetic")
    for i, ep in enumerate(eps):
        _assert_episode_equal(s.get_episode(i), ep)
    _assert_episode_equal(s.get_episode(-1), eps[-1])
    assert s.episode_instructions == [ep["instruction"] for ep in eps]
    assert s.episode_tasks == [ep["task"] for ep in eps]
    np.testing.assert_array_equal(s.episode_seeds, [0, 1, 2, 3])
    assert s.subtask_table == ["reach", "grasp"]
    assert s.optional_keys == ()


def test_stats_equal_numpy_over_concatenated_data(tmp_path):
    eps = write_store(tmp_path / "s", lengths=(30, 41, 17))
    stats = EpisodeStore(tmp_path / "s").stats
    for key in ("action", "state"):
        x = np.concatenate([ep[key] for ep in eps]).astype(np.float64)
        want = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
                "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}
        assert set(stats[key]) == set(STAT_KEYS)
        for k in STAT_KEYS:
            assert stats[key][k].dtype == np.float32 and stats[key][k].shape == x.shape[1:]
            np.testing.assert_allclose(stats[key][k], want[k], rtol=1e-6, atol=1e-6)


def test_stats_guard_constant_dims(tmp_path):
    ep = make_episode(0, 6)
    ep["state"][:, 1] = 0.25  # a state entry that never changes
    with open_writer(tmp_path / "s") as w:
        w.add_episode(**ep)
    s = EpisodeStore(tmp_path / "s")
    st = s.stats["state"]
    assert st["std"][1] == 1.0
    np.testing.assert_allclose([st["q01"][1], st["q99"][1]], [-0.75, 1.25])
    np.testing.assert_allclose([st["min"][1], st["max"][1]], [-0.75, 1.25])
    assert st["mean"][1] == np.float32(0.25)
    assert s.stats_guarded["state"]["std"] == [False, True, False, False]
    assert not any(s.stats_guarded["action"]["quantile"])
    guarded, mask = guard_stats({k: np.zeros(2, np.float32) for k in STAT_KEYS})
    assert mask["std"] == [True, True] and (guarded["q99"] - guarded["q01"] == 2).all()


def test_append_to_existing_store_updates_everything(tmp_path):
    eps = write_store(tmp_path / "s", lengths=(5, 6))
    more = [make_episode(10 + i, 4 + i, labels=["place"] * (4 + i)) for i in range(2)]
    with open_writer(tmp_path / "s") as w:
        assert w.num_episodes == 2 and w.num_steps == 11
        assert [w.add_episode(**ep) for ep in more] == [2, 3]
    s = EpisodeStore(tmp_path / "s")
    np.testing.assert_array_equal(s.episode_ends, [5, 11, 15, 20])
    for i, ep in enumerate(eps + more):
        _assert_episode_equal(s.get_episode(i), ep)
    assert s.subtask_table == ["reach", "grasp", "place"]
    x = np.concatenate([ep["action"] for ep in eps + more])
    np.testing.assert_allclose(s.stats["action"]["mean"], x.mean(0), rtol=1e-6, atol=1e-6)
    assert verify_store(tmp_path / "s")["ok"]


def test_optional_reward_success_round_trip_and_consistency(tmp_path):
    eps = write_store(tmp_path / "s", lengths=(4, 3), with_optional=True)
    s = EpisodeStore(tmp_path / "s")
    assert s.optional_keys == ("reward", "success")
    got = s.get_episode(1)
    np.testing.assert_array_equal(got["reward"], eps[1]["reward"])
    np.testing.assert_array_equal(got["success"], [False, False, True])
    with open_writer(tmp_path / "s") as w, pytest.raises(StoreError, match="has data/reward"):
        w.add_episode(**make_episode(5, 3))


def test_schema_mismatch_on_append_is_refused(tmp_path):
    write_store(tmp_path / "s", lengths=(3,))
    with pytest.raises(StoreError, match=r"schema mismatch: action_dim: store has 3, writer asked for 5"):
        open_writer(tmp_path / "s", action_dim=5)
    with pytest.raises(StoreError, match="cameras"):
        open_writer(tmp_path / "s", cameras={"front": (8, 10)})


def test_env_options_are_recorded_and_must_match_on_append(tmp_path):
    with open_writer(tmp_path / "s", env_options={"layout": "slots"}) as w:
        w.add_episode(**make_episode(0, 3))
    assert EpisodeStore(tmp_path / "s").env_options == {"layout": "slots"}
    with open_writer(tmp_path / "s", env_options={"layout": "slots"}) as w:   # same options: appends
        w.add_episode(**make_episode(1, 3))
    assert EpisodeStore(tmp_path / "s").num_episodes == 2
    with pytest.raises(StoreError, match=r"env_options: store has \{'layout': 'slots'\}, writer asked for \{\}"):
        open_writer(tmp_path / "s")
    write_store(tmp_path / "plain", lengths=(3,))
    assert EpisodeStore(tmp_path / "plain").env_options == {}
    with pytest.raises(StoreError, match="env_options values must be str/int/float/bool"):
        open_writer(tmp_path / "bad", env_options={"layout": ["slots"]})


def test_second_writer_is_refused_while_first_is_open(tmp_path):
    w = open_writer(tmp_path / "s")
    with pytest.raises(StoreError, match="another EpisodeWriter"):
        open_writer(tmp_path / "s")
    w.close()
    open_writer(tmp_path / "s").close()


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path, match: str, **changes):
    w = open_writer(tmp_path / "s")
    w.add_episode(**make_episode(0, 5))
    ep = make_episode(1, 5)
    ep.update(changes)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*"))
    with pytest.raises(StoreError, match=match):
        w.add_episode(**ep)
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s").rglob("*"))
    assert before == after, "a refused episode must not write a single file"
    w.close()
    assert EpisodeStore(tmp_path / "s").num_steps == 5


def test_wrong_dtype_is_refused(tmp_path):
    ep = make_episode(1, 5)
    _bad(tmp_path, r"episode 1: images\['front'\] must have dtype uint8, got float32",
         images={**ep["images"], "front": ep["images"]["front"].astype(np.float32)})


def test_integer_action_is_refused(tmp_path):
    _bad(tmp_path, r"episode 1: action must have a float dtype .* got int64", action=np.zeros((5, A), np.int64))


def test_wrong_image_shape_is_refused(tmp_path):
    ep = make_episode(1, 5)
    _bad(tmp_path, r"images\['wrist'\] must have shape \(5, 6, 6, 3\), got \(5, 6, 7, 3\)",
         images={**ep["images"], "wrist": np.zeros((5, 6, 7, 3), np.uint8)})


def test_wrong_state_shape_and_length_are_refused(tmp_path):
    _bad(tmp_path, r"state must have shape \(5, 4\) \(T from action\), got \(4, 4\)",
         state=np.zeros((4, S), np.float32))


def test_nan_names_key_episode_and_step(tmp_path):
    action = make_episode(1, 5)["action"]
    action[3, 2] = np.nan
    _bad(tmp_path, r"episode 1: action has NaN at step 3 dim 2", action=action)


def test_inf_in_state_is_refused(tmp_path):
    state = make_episode(1, 5)["state"]
    state[4, 0] = -np.inf
    _bad(tmp_path, r"episode 1: state has inf at step 4 dim 0", state=state)


def test_missing_and_unknown_camera_keys_are_refused(tmp_path):
    ep = make_episode(1, 5)
    _bad(tmp_path, r"missing \['wrist'\], unknown \['side'\]",
         images={"front": ep["images"]["front"], "side": ep["images"]["wrist"]})


def test_missing_key_is_refused(tmp_path):
    w = open_writer(tmp_path / "s")
    ep = make_episode(0, 5)
    del ep["state"]
    with pytest.raises(TypeError, match="state"):
        w.add_episode(**ep)


def test_empty_episode_subtasks_and_instruction_are_refused(tmp_path):
    empty = make_episode(1, 1)
    empty = {**empty, "action": empty["action"][:0], "state": empty["state"][:0], "subtasks": [],
             "images": {c: v[:0] for c, v in empty["images"].items()}}
    w = open_writer(tmp_path / "s")
    with pytest.raises(StoreError, match="empty episode"):
        w.add_episode(**empty)
    with pytest.raises(StoreError, match=r"subtasks must have one label per step \(5\), got 4"):
        w.add_episode(**{**make_episode(1, 5), "subtasks": ["a"] * 4})
    with pytest.raises(StoreError, match=r"subtasks\[2\] \(step 2\) must be a str"):
        w.add_episode(**{**make_episode(1, 5), "subtasks": ["a", "a", 3, "b", "b"]})
    with pytest.raises(StoreError, match="instruction must be a str, got NoneType"):
        w.add_episode(**{**make_episode(1, 5), "instruction": None})
    w.close()


def test_not_a_store_and_format_version_are_refused(tmp_path):
    with pytest.raises(StoreError, match="no such directory"):
        EpisodeStore(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"plain is not a vla episode store: zarr\.json is missing"):
        EpisodeStore(tmp_path / "plain")
    (tmp_path / "plain" / "x.txt").write_text("hello")
    with pytest.raises(StoreError, match="exists and is not a vla episode store"):
        open_writer(tmp_path / "plain")
    write_store(tmp_path / "s", lengths=(3,))
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"format version 99 is not supported; this vla reads versions \[1\].*newer"):
        EpisodeStore(tmp_path / "s")
    doc["attributes"]["format"] = "lerobot"
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"format='lerobot', expected 'vla.episodes'"):
        EpisodeStore(tmp_path / "s")


def test_episode_index_out_of_range(tmp_path):
    write_store(tmp_path / "s", lengths=(3, 3))
    s = EpisodeStore(tmp_path / "s")
    with pytest.raises(StoreError, match="episode 2 out of range; the store has 2 episodes"):
        s.get_episode(2)


def test_verify_clean_store(tmp_path):
    write_store(tmp_path / "s", lengths=(3, 4))
    rep = verify_store(tmp_path / "s")
    assert rep["ok"] and rep["num_episodes"] == 2 and rep["num_steps"] == 7
    assert rep["orphans"] == {} and rep["problems"] == [] and rep["bytes"] > 0


def test_verify_detects_stale_stats_and_repairs(tmp_path):
    write_store(tmp_path / "s", lengths=(3, 4))
    meta = tmp_path / "s" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["stats"]["action"]["mean"] = [9.0] * A
    meta.write_text(json.dumps(doc))
    rep = verify_store(tmp_path / "s")
    assert not rep["ok"] and any("action.mean do not match" in p for p in rep["problems"])
    assert verify_store(tmp_path / "s", repair=True)["ok"]
    assert verify_store(tmp_path / "s")["ok"]


def test_running_stats_and_partition_quantiles_match_numpy():
    from vla.datasets.stats import RunningStats, compute_stats, quantiles

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 101):
        x = rng.normal(size=(n, 3))
        np.testing.assert_allclose(quantiles(x), np.quantile(x, [0.01, 0.99], axis=0), rtol=0, atol=1e-12)
    parts = [rng.normal(2, 3, size=(int(rng.integers(1, 40)), 4)).astype(np.float32) for _ in range(12)]
    r = RunningStats(4)
    for p in parts:
        r.update(p)
    r.stage(np.full((5, 4), 1e6, np.float32))  # staged but never committed: must not count
    r.stage(parts[0])
    r.commit()
    want = compute_stats(np.concatenate(parts + [parts[0]]))
    got = r.result()
    for k in STAT_KEYS:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
