"""WindowDataset: windows, padding at episode starts and ends, plan strings, batching, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from store_helpers import A, S, make_episode, open_writer
from vla.datasets import EpisodeStore, StoreError, WindowDataset, collate_windows

LENGTHS = (5, 7, 4)
LABELS = (["a", "a", "b", "b", "c"], ["a", "a", "b", "b", "c", "c", "a"], ["d", "d", "d", "d"])


def _encoded_store(path) -> EpisodeStore:
    """Every value encodes its global row: action[r] = (r, ep, t), state[r] = r, frames filled with r."""
    row = 0
    with open_writer(path) as w:
        for e, (n, labels) in enumerate(zip(LENGTHS, LABELS)):
            ep = make_episode(e, n, labels=labels)
            rows = np.arange(row, row + n, dtype=np.float32)
            ep["action"] = np.stack([rows, np.full(n, e, np.float32), np.arange(n, dtype=np.float32)], 1)
            ep["state"] = np.repeat(rows[:, None], S, 1)
            ep["images"] = {c: np.broadcast_to(rows.astype(np.uint8)[:, None, None, None], v.shape).copy()
                            for c, v in ep["images"].items()}
            w.add_episode(**ep)
            row += n
    return EpisodeStore(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _encoded_store(tmp_path_factory.mktemp("sampler") / "s")


def test_length_and_episode_selection(store):
    assert len(WindowDataset(store)) == 16
    ds = WindowDataset(store, episodes=[2, 0])
    assert len(ds) == 9
    assert [ds[i]["episode"] for i in (0, 3, 4, 8)] == [2, 2, 0, 0]
    assert ds.index_of(0, 2) == 6


def test_window_at_episode_start_repeats_first_frame(store):
    ds = WindowDataset(store, n_obs_steps=3, horizon=4, frame_offset=2)
    x = ds[ds.index_of(1, 0)]  # episode 1 starts at global row 5
    assert x["episode"] == 1 and x["step"] == 0
    np.testing.assert_array_equal(x["state"][:, 0], [5, 5, 5])
    np.testing.assert_array_equal(x["images"]["front"][:, 0, 0, 0], [5, 5, 5])
    np.testing.assert_array_equal(x["images"]["wrist"][:, 0, 0, 0], [5, 5, 5])
    x = ds[ds.index_of(1, 1)]
    np.testing.assert_array_equal(x["state"][:, 0], [5, 5, 6])
    np.testing.assert_array_equal(x["action"][:, 0], [6, 7, 8, 9])
    assert not x["action_is_pad"].any()
    np.testing.assert_array_equal(x["future_image"][0, 0], [8, 8, 8])
    assert x["future_is_pad"] is False


def test_window_at_episode_end_pads_with_last_action(store):
    ds = WindowDataset(store, n_obs_steps=2, horizon=4, frame_offset=3)
    x = ds[ds.index_of(1, 5)]  # rows 5..11, t=5 is row 10, last row 11
    assert x["action"].shape == (4, A) and x["action"].dtype == np.float32
    np.testing.assert_array_equal(x["action"][:, 0], [10, 11, 11, 11])
    np.testing.assert_array_equal(x["action"][:, 1], [1, 1, 1, 1])
    np.testing.assert_array_equal(x["action_is_pad"], [False, False, True, True])
    np.testing.assert_array_equal(x["state"][:, 0], [9, 10])
    np.testing.assert_array_equal(x["future_image"][..., 0], np.full((8, 10), 11))
    assert x["future_is_pad"] is True
    x = ds[ds.index_of(1, 4)]  # t+3 = 7 > last step 6
    assert x["future_is_pad"] is True
    x = ds[ds.index_of(1, 3)]  # t+3 = 6 is the last step: not padded
    assert x["future_is_pad"] is False
    np.testing.assert_array_equal(x["future_image"][0, 0], [11, 11, 11])
    x = ds[ds.index_of(2, 3)]  # last step of the last episode: everything past it is padding
    np.testing.assert_array_equal(x["action"][:, 0], [15, 15, 15, 15])
    np.testing.assert_array_equal(x["action_is_pad"], [False, True, True, True])


def test_subtask_and_plan_strings(store):
    ds = WindowDataset(store)
    plans = [ds[ds.index_of(1, t)]["plan"] for t in range(7)]
    assert plans == ["a; b; c; a", "a; b; c; a", "b; c; a", "b; c; a", "c; a", "c; a", "a"]
    assert [ds[ds.index_of(1, t)]["subtask"] for t in range(7)] == LABELS[1]
    assert [ds[ds.index_of(0, t)]["plan"] for t in (1, 3, 4)] == ["a; b; c", "b; c", "c"]
    assert ds[ds.index_of(2, 0)]["plan"] == "d"
    x = ds[0]
    assert x["instruction"] == "instruction 0" and x["task"] == "task-0"


def test_camera_selection_and_frame_camera(store):
    ds = WindowDataset(store, cameras=["wrist"], frame_camera="front", frame_offset=1)
    x = ds[2]
    assert list(x["images"]) == ["wrist"] and x["images"]["wrist"].shape == (1, 6, 6, 3)
    assert x["future_image"].shape == (8, 10, 3) and x["future_image"][0, 0, 0] == 3
    with pytest.raises(StoreError, match=r"cameras \['side'\] not in the store's cameras"):
        WindowDataset(store, cameras=["side"])
    with pytest.raises(StoreError, match="horizon must be an int >= 1, got 0"):
        WindowDataset(store, horizon=0)
    with pytest.raises(StoreError, match=r"episodes \[3\] out of range"):
        WindowDataset(store, episodes=[3])
    with pytest.raises(IndexError):
        WindowDataset(store)[16]


def test_batched_fetch_equals_single_fetch(store):
    ds = WindowDataset(store, n_obs_steps=2, horizon=3, frame_offset=2)
    idx = [15, 0, 7, 7, 4]
    batch = ds.__getitems__(idx)
    for b, i in enumerate(idx):
        one, many = ds[i], batch[b]
        assert one.keys() == many.keys()
        for k in one:
            if k == "images":
                for c in one[k]:
                    np.testing.assert_array_equal(one[k][c], many[k][c])
            else:
                np.testing.assert_array_equal(one[k], many[k])


@pytest.mark.parametrize("collate", [collate_windows, None])
def test_dataloader_collates(store, collate):
    ds = WindowDataset(store, n_obs_steps=2, horizon=4)
    kw = {"collate_fn": collate} if collate else {}
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, **kw)))
    assert b["images"]["front"].shape == (5, 2, 8, 10, 3) and b["images"]["front"].dtype == torch.uint8
    assert b["state"].shape == (5, 2, S) and b["state"].dtype == torch.float32
    assert b["action"].shape == (5, 4, A) and b["action_is_pad"].dtype == torch.bool
    assert b["future_image"].shape == (5, 8, 10, 3) and b["future_is_pad"].shape == (5,)
    assert b["plan"] == ["a; b; c"] * 2 + ["b; c"] * 2 + ["c"]
    assert b["step"].tolist() == [0, 1, 2, 3, 4]


def test_in_memory_store_and_workers_agree(tmp_path, store):
    mem = EpisodeStore(store.path, in_memory=True)
    a = WindowDataset(store, n_obs_steps=2, horizon=4)
    b = WindowDataset(mem, n_obs_steps=2, horizon=4)
    dl = torch.utils.data.DataLoader(a, batch_size=4, num_workers=2, collate_fn=collate_windows)
    got = list(dl)
    want = [collate_windows(b.__getitems__(range(i, min(i + 4, len(b))))) for i in range(0, len(b), 4)]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert torch.equal(g["action"], w["action"]) and torch.equal(g["images"]["wrist"], w["images"]["wrist"])
        assert g["plan"] == w["plan"]


def test_goal_state_is_the_state_at_the_next_gripper_switch(tmp_path):
    # Gripper command (last action entry) per step: open, open, closed, closed, closed, open, open
    # -> switches at t=2 (grasp) and t=5 (release); after the last switch: the episode's last row.
    grip = np.array([-1, -1, 1, 1, 1, -1, -1], np.float32)
    with open_writer(tmp_path / "g") as w:
        for e in range(2):
            ep = make_episode(e, len(grip))
            ep["action"][:, -1] = grip if e == 0 else -grip
            ep["state"] = np.repeat(np.arange(len(grip), dtype=np.float32)[:, None] + 100 * e, S, 1)
            w.add_episode(**ep)
    ds = WindowDataset(EpisodeStore(tmp_path / "g"), horizon=2)
    goal = collate_windows(ds.__getitems__(list(range(len(ds)))))["goal_state"]  # (14, S)
    assert goal.shape == (14, S) and goal.dtype == torch.float32
    want_t = [2, 2, 5, 5, 5, 6, 6]  # the same switch rows whichever sign "closed" starts with
    assert goal[:, 0].tolist() == want_t + [100 + t for t in want_t]
    assert goal[3].tolist() == [5.0] * S  # every state entry of that row
    # an episode whose gripper never switches: the goal is its last state
    sel = WindowDataset(EpisodeStore(tmp_path / "g"), horizon=2, episodes=[1])
    assert sel[0]["goal_state"][0] == 102.0 and sel[6]["goal_state"][0] == 106.0
