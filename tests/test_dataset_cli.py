"""`vla dataset info/verify` on a small store, including a crashed one and a non-store path."""

from __future__ import annotations

import json

import numpy as np
from store_helpers import write_store

from vla.cli import main


def test_info_prints_summary(tmp_path, capsys):
    write_store(tmp_path / "s", lengths=(5, 7, 4))
    assert main(["dataset", "info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "3 episodes, 16 steps" in out
    assert "front 8x10" in out and "wrist 6x6" in out
    assert "reach" in out and "grasp" in out and "task-0" in out and "instruction 1" in out
    assert "stats action" in out and "q99" in out


def test_info_json_counts(tmp_path, capsys):
    write_store(tmp_path / "s", lengths=(5, 7, 4))
    assert main(["dataset", "info", str(tmp_path / "s"), "--json"]) == 0
    sm = json.loads(capsys.readouterr().out)
    assert sm["episodes"] == 3 and sm["steps"] == 16
    assert sm["tasks"] == {"task-0": 2, "task-1": 1}
    assert sm["subtasks"] == {"reach": 2 + 3 + 2, "grasp": 3 + 4 + 2}
    assert sm["cameras"] == {"front": [8, 10], "wrist": [6, 6]} and sm["env_options"] == {}
    assert sm["bytes"] > 0 and len(sm["stats"]["action"]["q01"]) == 3


def test_verify_exit_codes_and_repair(tmp_path, capsys):
    write_store(tmp_path / "s", lengths=(5, 7))
    assert main(["dataset", "verify", str(tmp_path / "s")]) == 0
    assert "OK -- 2 episodes, 12 steps" in capsys.readouterr().out
    # Simulate a crash after the data rows: extend every data array by orphan rows.
    import zarr

    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    for name in ("data/action", "data/state", "data/subtask", "data/images/front", "data/images/wrist"):
        a = g[name]
        a.resize((15,) + a.shape[1:])
        a[12:15] = np.ones((3,) + a.shape[1:], a.dtype)
    assert main(["dataset", "verify", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out and "orphan rows" in out and "--repair" in out
    assert main(["dataset", "verify", str(tmp_path / "s"), "--repair"]) == 0
    assert "fixed:" in capsys.readouterr().out
    assert main(["dataset", "verify", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orphans"] == {}


def test_non_store_path_is_one_clean_line(tmp_path, capsys):
    assert main(["dataset", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a vla episode store" in err and "zarr.json is missing" in err
    assert main(["dataset", "verify", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bench_dataloader_prints_json(capsys):
    args = ["bench", "dataloader", "episodes=2", "steps=20", "image_size=32", "batch_size=8", "batches=2",
            "workers=[0]", "video=false"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    res = out["results"]
    assert set(res) == {"disk_workers0", "disk_chunked_workers0", "memory_workers0"}
    assert all(r["samples_per_s"] > 0 and r["batches"] == 2 for r in res.values())
    assert out["store"]["zarr_bytes"] > 0


def test_bench_dataloader_rejects_unknown_key(capsys):
    assert main(["bench", "dataloader", "speed=11"]) == 2
    assert "unknown key 'speed'" in capsys.readouterr().err
