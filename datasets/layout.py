"""Internal building blocks of the episode store: format constants, opening and checking a
store, the commit-point logic, truncation of orphan rows, and the statistics record.

``EpisodeWriter`` (writer.py), ``EpisodeStore`` (store.py) and ``verify_store`` (verify.py) share
them. The on-disk layout itself is documented in ``vla.datasets.store``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
# Root attribute of stores written with checksums: every chunk carries a crc32c and every chunk
# is written even when it equals the fill value, so a missing chunk file is damage, not zeros.
INTEGRITY = {"checksum": "crc32c", "empty_chunks": "written"}
# Root attribute holding a copy of the per-episode index (episode_ends and the meta arrays),
# written in the same attribute update that precedes each commit; see ``vla.datasets.store``.
INDEX_ATTR = "index"
INDEX_KEYS: tuple[str, ...] = ("episode_ends",) + META_KEYS


def empty_index() -> dict[str, list[int]]:
    """The root-attribute copy of the per-episode index for a store with no episodes."""
    return {k: [] for k in INDEX_KEYS}


class StoreError(ValueError):
    """A store that cannot be opened/read as asked, or an episode that cannot be written.

    A ``ValueError`` so that the CLI prints it as one clean line.
    """


def compressor(clevel: int = 3, shuffle: str = "bitshuffle") -> list:
    """The codecs every array uses: blosc-zstd (lossless), then a crc32c checksum of the
    compressed bytes, so a damaged chunk reads as a checksum error instead of garbage."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle), Crc32cCodec()]


def writing_empty_chunks():
    """Context in which zarr writes chunks equal to the fill value too (its default skips them);
    with every chunk on disk, a missing chunk file is detectable as damage."""
    import zarr

    return zarr.config.set({"array.write_empty_chunks": True})


def default_chunk_frames(h: int, w: int) -> int:
    """About 1 MiB of raw pixels per chunk, between 8 and 64 frames (random access stays cheap)."""
    return int(min(64, max(8, (1 << 20) // max(1, h * w * 3))))


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


# -- chunk-level access (verify, checked reads) -----------------------------------------------


def chunk_rows(a) -> int:
    """Rows (first-axis length) per chunk of an array chunked along its first axis only."""
    return int(a.chunks[0])


def num_chunks(a) -> int:
    """Chunks along the first axis of ``a``."""
    c = chunk_rows(a)
    return (int(a.shape[0]) + c - 1) // c


def chunk_file(store_path: Path, a, i: int) -> Path:
    """The file holding chunk ``i`` (along the first axis) of array ``a`` in a LocalStore."""
    key = a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))
    return store_path / a.path / key


def iter_chunk_slices(a) -> Iterator[tuple[int, int, int]]:
    """(chunk index, first row, end row) of every chunk along the first axis."""
    c, n = chunk_rows(a), int(a.shape[0])
    for i in range(num_chunks(a)):
        yield i, i * c, min((i + 1) * c, n)


def episodes_of_rows(ends: np.ndarray, start: int, end: int) -> list[int]:
    """Committed episodes that hold any row in [start, end) (``ends``: exclusive end rows)."""
    ends = np.asarray(ends, np.int64)
    if end <= start or ends.size == 0:
        return []
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, end - 1, side="right"))
    return list(range(first, min(last, len(ends) - 1) + 1)) if first < len(ends) else []


def read_checked(store_path: Path, a, name: str, read=None, ends: np.ndarray | None = None) -> np.ndarray:
    """``read()`` (default: all of ``a``); a chunk that fails to decode (checksum, blosc) raises
    ``StoreError`` naming the array, the chunk, its rows and the episodes it holds instead of
    zarr's low-level error."""
    try:
        return np.asarray(read() if read is not None else a[:])
    except Exception as first_error:  # zarr raises ValueError/RuntimeError from its codecs
        for i, lo, hi in iter_chunk_slices(a):
            try:
                a[lo:hi]
            except Exception as e:
                eps = episodes_of_rows(ends, lo, hi) if ends is not None else []
                held = f", episodes {format_ranges(eps)}" if eps else ""
                raise StoreError(
                    f"{store_path}: {name} chunk {i} (rows {lo}-{hi - 1}{held}) is corrupt: {type(e).__name__}: {e}; "
                    f"run `vla dataset verify {store_path}` for a full report"
                ) from None
        raise StoreError(f"{store_path}: reading {name} failed: {type(first_error).__name__}: {first_error}") from None


def format_ranges(ids) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (episode lists in messages stay short)."""
    ids = sorted(int(i) for i in ids)
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)

