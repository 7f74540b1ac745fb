"""LeRobotDataset v3 in and out: store -> v3 -> store is identical on the PNG path; a v3 folder
built here by hand (PNG images, an mp4 camera, pandas-style tasks.parquet) imports correctly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from store_helpers import make_episode, open_writer
from vla.datasets import EpisodeStore, StoreError, verify_store
from vla.datasets.lerobot import export_lerobot, import_lerobot


def _store(path: Path, n: int = 4) -> list[dict]:
    eps = [make_episode(i, 3 + 2 * i, with_optional=True) for i in range(n)]
    with open_writer(path, action_names=["x", "y", "z"], state_names=["a", "b", "c", "d"]) as w:
        for ep in eps:
            w.add_episode(**ep)
    return eps


def test_store_to_lerobot_v3_and_back_is_identical(tmp_path):
    eps = _store(tmp_path / "s")
    info = export_lerobot(tmp_path / "s", tmp_path / "v3")
    v3 = tmp_path / "v3"
    for rel in ("meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet"):
        assert (v3 / rel).is_file(), rel
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == sum(3 + 2 * i for i in range(4))
    assert info["features"]["observation.images.front"] == {"dtype": "image", "shape": [8, 10, 3],
                                                            "names": ["height", "width", "channels"]}
    data = pq.read_table(str(v3 / "data/chunk-000/file-000.parquet"))
    assert data.num_rows == info["total_frames"]
    assert data.column("index").to_pylist() == list(range(info["total_frames"]))
    tasks = pq.read_table(str(v3 / "meta/tasks.parquet"))
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    assert sorted(tasks.column("task").to_pylist()) == sorted({e["instruction"] for e in eps})
    episodes = pq.read_table(str(v3 / "meta/episodes/chunk-000/file-000.parquet")).to_pylist()
    assert [e["length"] for e in episodes] == [3, 5, 7, 9]
    assert episodes[2]["dataset_from_index"] == 8 and episodes[2]["dataset_to_index"] == 15

    back = import_lerobot(v3, tmp_path / "back")
    orig = EpisodeStore(tmp_path / "s")
    assert (back.env, back.fps, back.cameras) == (orig.env, orig.fps, orig.cameras)
    assert (back.action_names, back.state_names) == (["x", "y", "z"], ["a", "b", "c", "d"])
    assert back.optional_keys == orig.optional_keys == ("reward", "success")
    np.testing.assert_array_equal(back.episode_ends, orig.episode_ends)
    for i, want in enumerate(eps):
        got = back.get_episode(i)
        for key in ("action", "state", "reward", "success"):
            np.testing.assert_array_equal(got[key], want[key])
        for cam in want["images"]:
            np.testing.assert_array_equal(got["images"][cam], want["images"][cam])
        assert got["subtasks"] == want["subtasks"]
        assert (got["instruction"], got["task"], got["seed"]) == (want["instruction"], want["task"], want["seed"])
    for key in ("action", "state"):
        for stat in ("mean", "std", "q01", "q99"):
            np.testing.assert_allclose(back.stats[key][stat], orig.stats[key][stat], rtol=1e-6)
    assert verify_store(tmp_path / "back")["ok"]


def test_mp4_export_imports_close_to_the_original(tmp_path):
    eps = _store(tmp_path / "s", n=2)
    info = export_lerobot(tmp_path / "s", tmp_path / "v3", images="mp4")
    assert info["features"]["observation.images.wrist"]["dtype"] == "video"
    assert (tmp_path / "v3/videos/observation.images.wrist/chunk-000/file-000.mp4").is_file()
    back = import_lerobot(tmp_path / "v3", tmp_path / "back")
    for i, want in enumerate(eps):
        got = back.get_episode(i)
        np.testing.assert_array_equal(got["action"], want["action"])
        assert got["images"]["front"].shape == want["images"]["front"].shape


def _fixture(root: Path) -> dict:
    """A LeRobot v3 folder as LeRobot 0.4 lays it out, built with pyarrow alone: camera 'top' as
    PNG images, camera 'side' as an mp4, two tasks, 3 episodes of 4, 6 and 5 frames."""
    import cv2
    from vla.datasets.video import encode_video

    rng = np.random.default_rng(7)
    lengths, fps = [4, 6, 5], 10
    n = sum(lengths)
    top = rng.integers(0, 256, size=(n, 6, 8, 3), dtype=np.uint8)
    side = np.repeat(np.linspace(0, 255, n, dtype=np.uint8)[:, None, None, None], 3, axis=-1) * np.ones(
        (1, 8, 8, 3), np.uint8)  # smooth frames survive H.264 nearly unchanged
    action = rng.normal(size=(n, 2)).astype(np.float32)
    state = rng.normal(size=(n, 3)).astype(np.float32)
    ep_index = np.repeat(np.arange(3), lengths)
    frame_index = np.concatenate([np.arange(t) for t in lengths])
    task_of_ep = [1, 0, 1]
    tasks = ["open the drawer", "push the button"]
    feats = {
        "action": {"dtype": "float32", "shape": [2], "names": ["dx", "dy"]},
        "observation.state": {"dtype": "float32", "shape": [3], "names": {"motors": ["j0", "j1", "j2"]}},
        "observation.images.top": {"dtype": "image", "shape": [6, 8, 3], "names": ["height", "width", "channel"]},
        "observation.images.side": {"dtype": "video", "shape": [8, 8, 3], "names": ["height", "width", "channel"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {"codebase_version": "v3.0", "robot_type": "so100", "fps": fps, "total_episodes": 3, "total_frames": n,
            "total_tasks": 2, "chunks_size": 1000, "features": feats,
            "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
            "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"}
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    (root / "data/chunk-000").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps(info))
    pq.write_table(pa.table({"task_index": [0, 1], "__index_level_0__": tasks}), str(root / "meta/tasks.parquet"))
    pngs = [{"bytes": cv2.imencode(".png", im[..., ::-1])[1].tobytes(), "path": None} for im in top]
    pq.write_table(pa.table({
        "action": [list(map(float, a)) for a in action], "observation.state": [list(map(float, s)) for s in state],
        "observation.images.top": pngs, "timestamp": (frame_index / fps).astype(np.float32),
        "frame_index": frame_index, "episode_index": ep_index, "index": np.arange(n),
        "task_index": np.asarray([task_of_ep[e] for e in ep_index]),
    }), str(root / "data/chunk-000/file-000.parquet"))
    encode_video(side, root / "videos/observation.images.side/chunk-000/file-000.mp4", fps, crf=0)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    pq.write_table(pa.Table.from_pylist([
        {"episode_index": i, "tasks": [tasks[task_of_ep[i]]], "length": lengths[i], "data/chunk_index": 0,
         "data/file_index": 0, "dataset_from_index": int(starts[i]), "dataset_to_index": int(ends[i]),
         "videos/observation.images.side/chunk_index": 0, "videos/observation.images.side/file_index": 0,
         "videos/observation.images.side/from_timestamp": float(starts[i] / fps),
         "videos/observation.images.side/to_timestamp": float(ends[i] / fps)}
        for i in range(3)]), str(root / "meta/episodes/chunk-000/file-000.parquet"))
    return {"lengths": lengths, "top": top, "side": side, "action": action, "state": state, "tasks": tasks,
            "task_of_ep": task_of_ep}


def test_a_hand_built_v3_folder_imports_correctly(tmp_path):
    want = _fixture(tmp_path / "v3")
    s = import_lerobot(tmp_path / "v3", tmp_path / "s")
    assert s.num_episodes == 3 and s.env == "so100" and s.fps == 10
    assert s.cameras == {"top": (6, 8), "side": (8, 8)}
    assert (s.action_names, s.state_names) == (["dx", "dy"], ["j0", "j1", "j2"])
    np.testing.assert_array_equal(s.episode_lengths, want["lengths"])
    np.testing.assert_array_equal(s.lowdim("action"), want["action"])
    np.testing.assert_array_equal(s.lowdim("state"), want["state"])
    np.testing.assert_array_equal(s.read_frames("top", np.arange(15)), want["top"])
    side = s.read_frames("side", np.arange(15)).astype(int)
    assert np.abs(side - want["side"].astype(int)).max() <= 3  # lossy, but frames stay in order
    for i in range(3):
        ep = s.get_episode(i)
        text = want["tasks"][want["task_of_ep"][i]]
        assert ep["instruction"] == ep["task"] == text and ep["seed"] == i
        assert ep["subtasks"] == [text] * want["lengths"][i]
    assert verify_store(tmp_path / "s")["ok"]


def test_import_refuses_other_versions_and_missing_features(tmp_path):
    root = tmp_path / "v2"
    (root / "meta").mkdir(parents=True)
    (root / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "features": {}}))
    with pytest.raises(StoreError, match=r"codebase_version 'v2.1', expected v3"):
        import_lerobot(root, tmp_path / "s")
    (root / "meta/info.json").write_text(json.dumps({"codebase_version": "v3.0", "fps": 10,
                                                     "features": {"action": {}}}))
    with pytest.raises(StoreError, match=r"feature 'observation.state' is missing"):
        import_lerobot(root, tmp_path / "s")
    with pytest.raises(StoreError, match="meta/info.json is missing"):
        import_lerobot(tmp_path / "nothing", tmp_path / "s")


def test_cli_export_then_import(tmp_path, capsys):
    from vla.commands.dataset import main

    _store(tmp_path / "s", n=2)
    assert main(["export-lerobot", str(tmp_path / "s"), str(tmp_path / "v3")]) == 0
    assert main(["import-lerobot", str(tmp_path / "v3"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "LeRobotDataset v3.0, 2 episodes" in out and "imported" in out
    assert EpisodeStore(tmp_path / "back").num_episodes == 2
