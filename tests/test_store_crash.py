"""A writer SIGKILLed in the middle of an episode leaves a valid store; verify --repair and a
resumed writer both drop the orphan rows, and appending afterwards keeps every row aligned."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from store_helpers import make_episode, open_writer, stop_writer_at
from vla.datasets import EpisodeStore, verify_store

HERE = Path(__file__).parent

# The child writes two episodes, then wraps zarr (test code, not the library) so that it flags
# and sleeps when the third episode reaches ``stage``; the test kills it there with SIGKILL.
SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time
    sys.path.insert(0, {here!r})
    from store_helpers import make_episode, open_writer, stop_writer_at
    w = open_writer({path!r})
    w.add_episode(**make_episode(0, 6))
    w.add_episode(**make_episode(1, 5))

    def pause(stage):
        pathlib.Path({flag!r}).write_text(stage)
        time.sleep(3600)

    stop_writer_at({stage!r}, pause)
    w.add_episode(**make_episode(2, 40))
    """
)


def _write_and_kill(path: Path, stage: str) -> None:
    flag = path.parent / "paused.flag"
    code = SCRIPT.format(here=str(HERE), path=str(path), stage=stage, flag=str(flag))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            if proc.poll() is not None:
                raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError("writer never reached the pause point")
            time.sleep(0.02)
        assert flag.read_text() == stage
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _check_first_two(s: EpisodeStore) -> None:
    for i, n in enumerate((6, 5)):
        want = make_episode(i, n)
        got = s.get_episode(i)
        np.testing.assert_array_equal(got["action"], want["action"])
        np.testing.assert_array_equal(got["images"]["front"], want["images"]["front"])
        assert got["subtasks"] == want["subtasks"]


@pytest.mark.parametrize("stage", ["after_data", "before_commit", "torn_commit"])
def test_sigkill_mid_episode_then_repair_then_append(tmp_path, stage):
    path = tmp_path / "s"
    _write_and_kill(path, stage)

    s = EpisodeStore(path)  # readers ignore the uncommitted episode
    assert s.num_episodes == 2 and s.num_steps == 11
    _check_first_two(s)
    x = np.concatenate([make_episode(0, 6)["action"], make_episode(1, 5)["action"]])
    np.testing.assert_allclose(s.stats["action"]["mean"], x.mean(0), rtol=1e-6, atol=1e-6)

    rep = verify_store(path)
    assert not rep["ok"]
    assert rep["orphans"]["data/action"] == 40 and rep["orphans"]["data/images/wrist"] == 40
    if stage == "torn_commit":
        assert rep["orphans"]["meta/episode_ends"] == 1
        assert any("torn last entry" in p for p in rep["problems"])

    rep = verify_store(path, repair=True)
    assert rep["ok"] and rep["repaired"] and rep["fixed"]
    rep = verify_store(path)
    assert rep["ok"] and rep["orphans"] == {}

    with open_writer(path) as w:
        assert w.add_episode(**make_episode(7, 3)) == 2
    s = EpisodeStore(path)
    np.testing.assert_array_equal(s.episode_ends, [6, 11, 14])
    _check_first_two(s)
    np.testing.assert_array_equal(s.get_episode(2)["images"]["wrist"], make_episode(7, 3)["images"]["wrist"])
    assert verify_store(path)["ok"]


def test_resumed_writer_truncates_orphans_without_repair(tmp_path):
    path = tmp_path / "s"
    _write_and_kill(path, "before_commit")
    with open_writer(path) as w:
        assert w.repaired_on_open["data/action"] == 40
        assert w.num_steps == 11
        assert w.add_episode(**make_episode(8, 4)) == 2
    s = EpisodeStore(path)
    np.testing.assert_array_equal(s.episode_ends, [6, 11, 15])
    want = make_episode(8, 4)
    got = s.get_episode(2)
    np.testing.assert_array_equal(got["state"], want["state"])
    np.testing.assert_array_equal(got["images"]["front"], want["images"]["front"])
    assert got["instruction"] == want["instruction"] and got["seed"] == 8
    assert verify_store(path)["ok"]


class _Crash(Exception):
    pass


def _crash_at(monkeypatch, stage: str) -> None:
    def crash(s: str) -> None:
        raise _Crash(s)

    stop_writer_at(stage, crash, monkeypatch.setattr)


def test_crash_in_first_episode_with_optional_arrays(tmp_path, monkeypatch):
    path = tmp_path / "s"
    w = open_writer(path)
    _crash_at(monkeypatch, "before_commit")
    with pytest.raises(_Crash):
        w.add_episode(**make_episode(0, 5, with_optional=True))
    w.close()
    monkeypatch.undo()
    assert EpisodeStore(path).num_episodes == 0
    assert verify_store(path)["orphans"]["data/reward"] == 5
    with open_writer(path) as w:  # the next first episode decides the optional arrays again
        assert w.repaired_on_open["data/images/front"] == 5
        w.add_episode(**make_episode(1, 4))
    s = EpisodeStore(path)
    assert s.num_episodes == 1 and s.optional_keys == () and verify_store(path)["ok"]
    np.testing.assert_array_equal(s.get_episode(0)["action"], make_episode(1, 4)["action"])


def test_same_writer_continues_after_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "s"
    w = open_writer(path)
    w.add_episode(**make_episode(0, 6))
    _crash_at(monkeypatch, "after_data")
    with pytest.raises(_Crash):
        w.add_episode(**make_episode(1, 9, labels=["never"] * 9))
    monkeypatch.undo()
    assert w.add_episode(**make_episode(2, 3)) == 1
    w.close()
    s = EpisodeStore(path)
    np.testing.assert_array_equal(s.episode_ends, [6, 9])
    np.testing.assert_array_equal(s.get_episode(1)["state"], make_episode(2, 3)["state"])
    assert "never" not in s.subtask_table
    assert verify_store(path)["ok"]
