"""Checksums, a verify that reads every chunk, and safe repair, tried on the hand-made faults of
issue 18: random bytes over a chunk of data/action and of an image array, the one chunk of
meta/episode_ends deleted; plus stores written before checksums existed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_episode, open_writer
from vla.datasets import EpisodeStore, StoreError, verify_store
from vla.datasets.layout import chunk_file, open_group

N_EPISODES = 36


def _lengths(n: int = N_EPISODES) -> list[int]:
    return [5 + (i * 7) % 9 for i in range(n)]


def _write(path: Path, n: int = N_EPISODES, **kw) -> list[dict]:
    eps = [make_episode(i, t) for i, t in enumerate(_lengths(n))]
    with open_writer(path, image_chunk_frames=kw.pop("image_chunk_frames", 4), **kw) as w:
        for ep in eps:
            w.add_episode(**ep)
    return eps


def _chunk(path: Path, name: str, i: int) -> Path:
    group, _ = open_group(path, read_only=True)
    return chunk_file(path, group[name], i)


def _scribble(f: Path, n: int = 200, seed: int = 0) -> None:
    """Overwrite ``n`` random bytes of a chunk file in place (the issue's hand-made fault)."""
    data = bytearray(f.read_bytes())
    rng = np.random.default_rng(seed)
    at = int(rng.integers(0, max(1, len(data) - n)))
    data[at:at + n] = rng.integers(0, 256, size=min(n, len(data) - at), dtype=np.uint8).tobytes()
    f.write_bytes(bytes(data))


def _same_episode(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(got["action"], want["action"])
    np.testing.assert_array_equal(got["state"], want["state"])
    for cam in want["images"]:
        np.testing.assert_array_equal(got["images"][cam], want["images"][cam])
    assert got["subtasks"] == want["subtasks"]
    assert (got["instruction"], got["task"], got["seed"]) == (want["instruction"], want["task"], want["seed"])


def test_new_store_writes_checksums_and_an_index_copy(tmp_path):
    _write(tmp_path / "s", n=3)
    group, attrs = open_group(tmp_path / "s", read_only=True)
    assert attrs["integrity"] == {"checksum": "crc32c", "empty_chunks": "written"}
    for name in ("data/action", "data/images/front", "meta/episode_ends", "meta/episode_seed"):
        assert "Crc32cCodec" in [type(c).__name__ for c in group[name].metadata.codecs], name
    assert attrs["index"]["episode_ends"] == list(np.cumsum(_lengths(3)))
    assert attrs["index"]["episode_seed"] == [0, 1, 2]


def test_corrupt_action_chunk_is_reported_with_its_episodes_not_raised(tmp_path):
    path = tmp_path / "s"
    _write(path)
    _scribble(_chunk(path, "data/action", 0))

    rep = verify_store(path)
    assert not rep["ok"]
    [bad] = rep["damaged_chunks"]
    assert bad["array"] == "data/action" and bad["chunk"] == 0 and bad["kind"] == "corrupt"
    assert bad["episodes"] == list(range(N_EPISODES))  # 1024-row chunk: the whole small store
    assert any("data/action chunk 0" in p and "episodes 0-35" in p for p in rep["problems"])
    with pytest.raises(StoreError, match=r"data/action chunk 0 \(rows 0-.*episodes 0-35\) is corrupt"):
        EpisodeStore(path).lowdim("action")

    # removing every episode is far over the 10% share: refused, nothing touched
    before = sorted(p.name for p in tmp_path.iterdir())
    rep = verify_store(path, repair=True)
    assert not rep["ok"] and not rep["repaired"]
    assert any("would remove 36 of 36 episodes (100%)" in p and "--force" in p for p in rep["problems"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_corrupt_image_chunk_is_found_and_repair_drops_only_its_episodes(tmp_path):
    path = tmp_path / "s"
    eps = _write(path)
    assert verify_store(path)["ok"]
    _scribble(_chunk(path, "data/images/front", 10))

    assert verify_store(path, quick=True)["ok"]  # metadata only: images are not read
    rep = verify_store(path)
    assert not rep["ok"]
    [bad] = rep["damaged_chunks"]
    ends = np.cumsum(_lengths())
    want = sorted({int(np.searchsorted(ends, r, side="right")) for r in range(40, 44)})  # rows of chunk 10
    assert bad["array"] == "data/images/front" and bad["chunk"] == 10 and bad["episodes"] == want
    assert rep["damaged_episodes"] == want

    rep = verify_store(path, repair=True)
    assert rep["ok"] and rep["repaired"] and rep["removed_episodes"] == want
    s = EpisodeStore(path)
    kept = [i for i in range(N_EPISODES) if i not in want]
    assert s.num_episodes == len(kept)
    for j, i in enumerate(kept):
        _same_episode(s.get_episode(j), eps[i])
    log = json.loads(Path(rep["report_file"]).read_text())
    assert log["removed_episodes"] == want and Path(log["backup"]).is_dir()
    assert EpisodeStore(log["backup"]).num_episodes == N_EPISODES  # the original is kept
    assert verify_store(path)["ok"]


def test_missing_image_chunk_file_is_damage(tmp_path):
    path = tmp_path / "s"
    _write(path)
    _chunk(path, "data/images/wrist", 3).unlink()
    rep = verify_store(path)
    [bad] = rep["damaged_chunks"]
    assert bad["kind"] == "missing" and bad["array"] == "data/images/wrist" and bad["episodes"]


def test_lost_episode_ends_chunk_is_restored_with_nothing_lost(tmp_path):
    path = tmp_path / "s"
    eps = _write(path)
    _chunk(path, "meta/episode_ends", 0).unlink()

    rep = verify_store(path)
    assert not rep["ok"]
    assert rep["num_episodes"] == N_EPISODES and rep["orphans"] == {}  # rows are not taken for orphans
    assert rep["damaged_episodes"] == []
    assert any("meta/episode_ends is damaged (chunk 0 missing)" in p and "nothing lost" in p
               for p in rep["problems"])

    rep = verify_store(path, repair=True)
    assert rep["ok"] and rep["repaired"] and rep["removed_episodes"] == []
    s = EpisodeStore(path)
    assert s.num_episodes == N_EPISODES
    for i in (0, 17, 35):
        _same_episode(s.get_episode(i), eps[i])


def test_corrupt_meta_chunk_is_restored_from_the_index_copy(tmp_path):
    path = tmp_path / "s"
    eps = _write(path, n=6)
    _scribble(_chunk(path, "meta/episode_seed", 0), n=20)
    rep = verify_store(path)
    assert not rep["ok"] and rep["damaged_chunks"][0]["array"] == "meta/episode_seed"
    assert verify_store(path, repair=True)["ok"]
    s = EpisodeStore(path)
    assert [s.get_episode(i)["seed"] for i in range(6)] == [e["seed"] for e in eps]


def test_repair_share_limit_and_force(tmp_path):
    path = tmp_path / "s"
    _write(path, n=8, image_chunk_frames=64)  # chunk 0 holds rows 0-63: episodes 0-6 of 8
    _scribble(_chunk(path, "data/images/front", 0))
    assert not verify_store(path, repair=True)["repaired"]
    assert not verify_store(path, repair=True, max_loss=0.5)["repaired"]
    rep = verify_store(path, repair=True, force=True)
    assert rep["repaired"] and rep["ok"] and rep["removed_episodes"] == list(range(7))
    s = EpisodeStore(path)
    assert s.num_episodes == 1
    _same_episode(s.get_episode(0), make_episode(7, _lengths(8)[7]))


def _write_old_style(path: Path, monkeypatch, n: int = 5) -> list[dict]:
    """A store as written before checksums: blosc only, empty chunks skipped, no index copy."""
    import vla.datasets.writer as writer_mod
    from zarr.codecs import BloscCodec

    monkeypatch.setattr(writer_mod, "compressor", lambda clevel=3, shuffle="bitshuffle": BloscCodec(
        cname="zstd", clevel=clevel, shuffle=shuffle))
    monkeypatch.setattr(writer_mod, "writing_empty_chunks", lambda: __import__("contextlib").nullcontext())
    eps = _write(path, n=n)
    monkeypatch.undo()
    group, _ = open_group(path, read_only=False)
    attrs = dict(group.attrs)
    del attrs["integrity"], attrs["index"]
    group.attrs.put(attrs)
    return eps


def test_store_without_checksums_still_opens_verifies_and_appends(tmp_path, monkeypatch):
    path = tmp_path / "old"
    eps = _write_old_style(path, monkeypatch)
    rep = verify_store(path)
    assert rep["ok"] and not rep["checksums"] and rep["chunks_checked"] > 0
    s = EpisodeStore(path)
    _same_episode(s.get_episode(4), eps[4])
    with open_writer(path) as w:  # appending adds the index copy
        w.add_episode(**make_episode(9, 4))
    _, attrs = open_group(path, read_only=True)
    assert len(attrs["index"]["episode_ends"]) == 6
    assert verify_store(path)["ok"]


def test_lost_index_without_a_copy_is_refused_not_guessed(tmp_path, monkeypatch):
    path = tmp_path / "old"
    _write_old_style(path, monkeypatch)
    _chunk(path, "meta/episode_ends", 0).unlink()
    action_rows = open_group(path, read_only=True)[0]["data/action"].shape[0]
    for repair in (False, True):
        rep = verify_store(path, repair=repair)
        assert not rep["ok"] and not rep["repaired"]
        assert any("no valid copy of the index" in p for p in rep["problems"])
    assert open_group(path, read_only=True)[0]["data/action"].shape[0] == action_rows  # nothing truncated


def test_verify_cli_reports_a_corrupt_chunk_in_one_clean_report(tmp_path, capsys):
    from vla.commands.dataset import main

    path = tmp_path / "s"
    _write(path, n=4)
    _scribble(_chunk(path, "data/action", 0))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS FOUND" in out and "data/action chunk 0" in out and "Traceback" not in out
    assert main(["verify", str(path), "--quick", "--json"]) == 1  # the statistics check meets the chunk
    rep = json.loads(capsys.readouterr().out)
    assert any("data/action chunk 0" in p and "is corrupt" in p for p in rep["problems"])


def test_repair_refuses_while_a_writer_holds_the_store(tmp_path):
    path = tmp_path / "s"
    _write(path, n=2)
    with open_writer(path), pytest.raises(StoreError, match="holds this store open"):
        verify_store(path, repair=True)
    assert verify_store(path, repair=True)["ok"]


def test_info_json_is_one_parseable_object(tmp_path, capsys):
    from vla.commands.dataset import main

    _write(tmp_path / "s", n=3)
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["episodes"] == 3 and info["steps"] == sum(_lengths(3))
    assert info["cameras"] == {"front": [8, 10], "wrist": [6, 6]}

