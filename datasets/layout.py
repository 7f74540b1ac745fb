"""Internal building blocks of the episode store: format constants, opening and checking a
store, the commit-point logic, truncation of orphan rows, and the statistics record.

``EpisodeWriter`` (writer.py), ``EpisodeStore`` (store.py) and ``verify_store`` (verify.py) share
them. The on-disk layout itself is documented in ``vla.datasets.store``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.stats import compute_stats, guard_stats, stats_to_json

FORMAT_NAME = "vla.episodes"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
LOWDIM_KEYS: tuple[str, ...] = ("action", "state", "subtask")
OPTIONAL_KEYS: tuple[str, ...] = ("reward", "success")
META_KEYS: tuple[str, ...] = ("episode_instruction", "episode_task", "episode_seed")
LOCK_NAME = ".writer.lock"
# Crash-test hook (tests only): with VLA_STORE_PAUSE_AT=<stage> the writer touches
# VLA_STORE_PAUSE_FILE and sleeps at that stage so a test can SIGKILL it deterministically.
_PAUSE_ENV, _PAUSE_FILE_ENV = "VLA_STORE_PAUSE_AT", "VLA_STORE_PAUSE_FILE"


class StoreError(ValueError):
    """A store that cannot be opened/read as asked, or an episode that cannot be written.

    A ``ValueError`` so that the CLI prints it as one clean line.
    """


def compressor(clevel: int = 3, shuffle: str = "bitshuffle"):
    """The blosc-zstd codec every array uses (lossless)."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle)


def default_chunk_frames(h: int, w: int) -> int:
    """About 1 MiB of raw pixels per chunk, between 8 and 64 frames (random access stays cheap)."""
    return int(min(64, max(8, (1 << 20) // max(1, h * w * 3))))


def pause_hook(stage: str) -> None:
    """Crash-test hook: pause at ``stage`` when VLA_STORE_PAUSE_AT names it (see the constants)."""
    if os.environ.get(_PAUSE_ENV) == stage:
        flag = os.environ.get(_PAUSE_FILE_ENV)
        if flag:
            Path(flag).write_text(stage)
        time.sleep(3600)


def check_store_dir(path: Path) -> None:
    """Refuse a path that does not exist, is a file, or is no Zarr v3 group (naming what is missing)."""
    if not path.exists():
        raise StoreError(f"{path}: no such directory; expected a vla episode store (a Zarr v3 group)")
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a vla episode store (expected a Zarr v3 group directory)")
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a vla episode store: zarr.json is missing (not a Zarr v3 group)")


def check_format(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuse a wrong format name or an unsupported (e.g. newer) format version."""
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(f"{path} is not a vla episode store: root attribute format={fmt!r}, expected {FORMAT_NAME!r}")
    version = attrs.get("version")
    if not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        newer = isinstance(version, int) and version > max(SUPPORTED_VERSIONS)
        hint = "; it was written by a newer vla -- upgrade vla to read it" if newer else ""
        raise StoreError(
            f"{path}: store format version {version!r} is not supported; this vla reads versions "
            f"{list(SUPPORTED_VERSIONS)}{hint}"
        )


def open_group(path: Path, read_only: bool):
    """Open and check a store: returns (zarr group, root attributes as a dict)."""
    import zarr
    from zarr.storage import LocalStore

    check_store_dir(path)
    try:
        group = zarr.open_group(store=LocalStore(str(path), read_only=read_only), mode="r" if read_only else "r+")
    except Exception as e:  # zarr raises several types for a broken/foreign folder
        raise StoreError(f"{path} is not a readable Zarr v3 group: {type(e).__name__}: {e}") from None
    attrs = dict(group.attrs)
    check_format(path, attrs)
    return group, attrs


def required_arrays(attrs: Mapping[str, Any]) -> list[str]:
    """Paths of the arrays every store has (optional reward/success excluded)."""
    names = [f"data/{k}" for k in LOWDIM_KEYS] + [f"data/images/{c}" for c in attrs.get("cameras", {})]
    return names + [f"meta/{k}" for k in META_KEYS] + ["meta/episode_ends"]


def get_array(group, name: str):
    """``group[name]``, or None when it does not exist."""
    try:
        return group[name]
    except KeyError:
        return None


def committed_episodes(ends: np.ndarray, data_len: int, meta_len: int) -> tuple[int, list[str]]:
    """Number of committed episodes and a list of problems that are corruption (not a crash).

    A crash can only tear the LAST entry of ``episode_ends`` (it reads as the fill value 0), so
    a bad last entry is an uncommitted episode; a bad entry anywhere else is corruption.
    """
    ends = np.asarray(ends, dtype=np.int64)
    if ends.size == 0:
        return 0, []
    prev = np.concatenate([[0], ends[:-1]])
    valid = (ends > prev) & (ends <= data_len)
    bad = np.flatnonzero(~valid)
    problems = []
    committed = len(ends)
    if bad.size:
        first = int(bad[0])
        if first < len(ends) - 1:
            problems.append(
                f"meta/episode_ends is not strictly increasing within the data length {data_len} at "
                f"episode {first} (value {int(ends[first])}, previous {int(prev[first])})"
            )
        committed = first
    if meta_len < committed:
        problems.append(f"per-episode meta arrays hold {meta_len} entries but {committed} episodes are committed")
        committed = meta_len
    return committed, problems


def data_arrays(group, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """{path: array} of the per-row arrays present (low-dim, optional, images)."""
    out = {}
    for k in LOWDIM_KEYS + OPTIONAL_KEYS:
        a = get_array(group, f"data/{k}")
        if a is not None:
            out[f"data/{k}"] = a
    for cam in attrs.get("cameras", {}):
        a = get_array(group, f"data/images/{cam}")
        if a is not None:
            out[f"data/images/{cam}"] = a
    return out


def meta_arrays(group) -> dict[str, Any]:
    """{path: array} of the per-episode meta arrays present (episode_ends excluded)."""
    return {f"meta/{k}": a for k in META_KEYS if (a := get_array(group, f"meta/{k}")) is not None}


def truncate(group, attrs: Mapping[str, Any], num_steps: int, num_episodes: int) -> dict[str, int]:
    """Resize every data array to ``num_steps`` rows and meta array to ``num_episodes``.

    Returns {array: rows removed} for the arrays that were longer.
    """
    removed = {}
    for name, a in data_arrays(group, attrs).items():
        if a.shape[0] > num_steps:
            removed[name] = a.shape[0] - num_steps
            a.resize((num_steps,) + tuple(a.shape[1:]))
    metas = meta_arrays(group)
    metas["meta/episode_ends"] = group["meta/episode_ends"]
    for name, a in metas.items():
        if a.shape[0] > num_episodes:
            removed[name] = a.shape[0] - num_episodes
            a.resize((num_episodes,))
    return removed


def stats_record(action: np.ndarray, state: np.ndarray) -> dict:
    """The JSON statistics attribute for these committed rows (guarded; see stats.py)."""
    return stats_record_from({"action": compute_stats(action), "state": compute_stats(state)}, action.shape[0])


def stats_record_from(raw: dict[str, dict[str, np.ndarray]], num_steps: int) -> dict:
    """The JSON statistics attribute from raw {"action"|"state": stats} describing ``num_steps`` rows."""
    guarded, masks = {}, {}
    for key, s in raw.items():
        guarded[key], masks[key] = guard_stats(s)
    return {"num_steps": int(num_steps), **stats_to_json(guarded), "guarded": masks}


def partial_files(path: Path) -> list[Path]:
    """Temp files a write interrupted mid-file leaves (LocalStore writes temp + rename)."""
    return sorted(path.rglob("*.partial"))


def as_str_list(value: Any, what: str) -> list[str]:
    """Check a string table read from the attributes."""
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise StoreError(f"root attribute strings.{what} must be a list of str, got {type(value).__name__}")
    return value


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
