"""``verify_store``: check an episode store chunk by chunk and, when asked, repair it safely.

What it checks: the structure (format, required arrays, dtypes and trailing shapes); every chunk
of every array (it must exist and decode: stores with checksums carry a crc32c per chunk, and
every chunk is written, so a missing chunk file is damage); that ``meta/episode_ends`` is
strictly increasing and within the data; the root-attribute copy of the episode index; orphan
rows/entries past the last committed episode; leftover ``*.partial`` temp files; string-table
indices; NaN/inf; and that the stored statistics match the data. ``quick=True`` skips the chunk
scan (metadata, index and statistics only). It reports, it never raises on a damaged store; a
path that is not a store at all raises ``StoreError``.

What ``repair=True`` does, and only when every fix is proven:
- restores ``meta/episode_ends`` and the per-episode meta arrays from the index copy when their
  chunks are lost or corrupt (nothing lost);
- drops the committed episodes whose rows lie in a corrupt or missing data chunk, by writing a
  compacted store beside the original, swapping it in, and keeping the original as
  ``<store>.pre-repair-<time>``; refuses when that removes more than ``max_loss`` of the episodes
  (default 10%) unless ``force``;
- truncates orphans of a crashed writer, removes temp files, recomputes the statistics;
- writes ``<store>.repair-<time>.json`` listing what it changed and removed.
Corruption it cannot prove the extent of (an index lost with no copy, a non-monotonic index in
the middle) is reported and never "fixed".
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.layout import (
    INDEX_ATTR,
    LOCK_NAME,
    META_KEYS,
    OPTIONAL_KEYS,
    StoreError,
    chunk_file,
    committed_episodes,
    data_arrays,
    dir_bytes,
    episodes_of_rows,
    format_ranges,
    get_array,
    iter_chunk_slices,
    meta_arrays,
    num_chunks,
    open_group,
    partial_files,
    read_checked,
    required_arrays,
    stats_record,
    truncate,
    writing_empty_chunks,
)
from vla.datasets.stats import STAT_KEYS

DEFAULT_MAX_LOSS = 0.10


def verify_store(path: str | os.PathLike, repair: bool = False, quick: bool = False,
                 max_loss: float = DEFAULT_MAX_LOSS, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Check a store; see ``_verify`` for the report. Damage the checks did not foresee is
    reported as a problem too: only a path that is not a store at all raises ``StoreError``."""
    lock = _lock_for_repair(Path(path)) if repair else None
    try:
        return _verify(path, repair, quick, max_loss, force, progress)
    except StoreError:
        raise
    except Exception as e:
        return {"path": str(path), "ok": False, "repaired": False, "quick": bool(quick), "num_episodes": 0,
                "num_steps": 0, "damaged_chunks": [], "damaged_episodes": [], "orphans": {}, "fixed": [],
                "removed_episodes": [], "problems": [f"verify stopped on an unexpected error: {type(e).__name__}: {e}"]}
    finally:
        if lock is not None:
            lock.close()


def _lock_for_repair(path: Path):
    """Take the writer lock (repair must never race a running ``vla collect``); None without fcntl."""
    try:
        import fcntl
    except ImportError:
        return None
    if not (path / "zarr.json").is_file():
        return None  # open_group reports what is wrong with the path
    f = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - held for the repair's duration
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StoreError(f"{path}: a writer (e.g. `vla collect`) holds this store open; stop it before "
                         "--repair") from None
    return f


def _verify(path: str | os.PathLike, repair: bool, quick: bool, max_loss: float, force: bool,
            progress: bool) -> dict[str, Any]:
    """Check a store; with ``repair=True`` apply the safe repairs described in the module docstring.

    Returns a report: {"path", "ok", "repaired", "quick", "checksums", "format", "version",
    "num_episodes", "num_steps", "chunks_checked", "damaged_chunks": [{array, chunk, rows, kind,
    error, episodes}], "damaged_episodes", "index_source", "orphans": {array: rows}, "problems",
    "fixed", "removed_episodes", "backup", "report_file", "bytes"}. ``ok`` is True when nothing
    is wrong (after the repair, if one was asked for and done).
    """
    path = Path(path)
    group, attrs = open_group(path, read_only=not repair)
    report: dict[str, Any] = {
        "path": str(path), "ok": True, "repaired": False, "quick": bool(quick),
        "checksums": attrs.get("integrity", {}).get("checksum") == "crc32c",
        "format": attrs.get("format"), "version": attrs.get("version"), "num_episodes": 0, "num_steps": 0,
        "chunks_checked": 0, "damaged_chunks": [], "damaged_episodes": [], "index_source": "meta/episode_ends",
        "orphans": {}, "problems": [], "fixed": [], "removed_episodes": [], "backup": None, "report_file": None,
        "bytes": 0,
    }
    problems: list[str] = report["problems"]
    repairable: list[str] = []

    for key in ("fps", "env", "cameras", "action_dim", "state_dim", "strings"):
        if key not in attrs:
            problems.append(f"root attribute '{key}' is missing")
    missing = [n for n in required_arrays(attrs) if get_array(group, n) is None]
    if missing:
        problems.append(f"missing arrays {missing}")
    if problems:
        return _finish(report, path)

    data = data_arrays(group, attrs)
    metas = meta_arrays(group)
    ends_arr = group["meta/episode_ends"]
    expect = {"data/action": ("float32", (attrs["action_dim"],)), "data/state": ("float32", (attrs["state_dim"],)),
              "data/subtask": ("int32", ()), "data/reward": ("float32", ()), "data/success": ("bool", ())}
    for cam, (h, w) in attrs["cameras"].items():
        expect[f"data/images/{cam}"] = ("uint8", (h, w, 3))
    for name, a in data.items():
        dt, tail = expect[name]
        if str(a.dtype) != dt or tuple(a.shape[1:]) != tail:
            want = ", ".join(map(str, ("N",) + tail))
            problems.append(f"{name} has dtype {a.dtype} shape {a.shape}, expected {dt} ({want})")
    if problems:
        return _finish(report, path)

    # 1. every chunk of every array: present and decodable
    arrays = {**data, **metas, "meta/episode_ends": ends_arr}
    bad: dict[str, dict[int, dict]] = {name: {} for name in arrays}
    if not quick:
        _scan_chunks(path, arrays, bad, strict_missing=report["checksums"], progress=progress, report=report)
    else:
        for name in list(metas) + ["meta/episode_ends"]:  # the index must be read even in quick mode
            try:
                arrays[name][:]
            except Exception as e:
                bad[name][-1] = {"kind": "corrupt", "error": f"{type(e).__name__}: {e}", "rows": [0, 0]}

    # 2. the episode index: the array, or the root-attribute copy when the array is damaged
    data_len = min(a.shape[0] for a in data.values())
    copy = _index_copy(attrs, data_len)
    meta_values: dict[str, np.ndarray] = {}
    index_damaged = bool(bad["meta/episode_ends"])
    if index_damaged:
        where = _chunk_list(bad["meta/episode_ends"])
        if copy is None:
            problems.append(f"meta/episode_ends is damaged ({where}) and the store has no valid copy of the index in "
                            "its root attributes: episode boundaries are lost; refusing to guess (no repair)")
            return _finish(report, path)
        ends = copy["episode_ends"]
        committed = len(ends)
        report["index_source"] = f"root attribute '{INDEX_ATTR}'"
        repairable.append(f"meta/episode_ends is damaged ({where}); restorable from the root-attribute index copy "
                          f"({committed} episodes, nothing lost)")
    else:
        ends_raw = np.asarray(ends_arr[:], np.int64)
        meta_len = min(a.shape[0] for a in metas.values())
        committed, corrupt = committed_episodes(ends_raw, data_len, meta_len)
        if corrupt:
            if copy is not None and _prefix_ok(copy["episode_ends"], ends_raw):
                ends = copy["episode_ends"]
                committed = len(ends)
                report["index_source"] = f"root attribute '{INDEX_ATTR}'"
                repairable.append("meta/episode_ends is inconsistent (" + "; ".join(corrupt) + "); restorable from "
                                  "the root-attribute index copy")
                index_damaged = True
            else:
                problems.extend(corrupt)
                return _finish(report, path)
        else:
            ends = ends_raw[:committed]
            if committed < len(ends_raw):
                repairable.append(f"meta/episode_ends has a torn last entry (episode {committed}) from an "
                                  "interrupted commit")
            if copy is not None and not np.array_equal(copy["episode_ends"][:committed], ends):
                repairable.append("the root-attribute index copy disagrees with meta/episode_ends; it will be "
                                  "rewritten from the array")
    ends = np.asarray(ends, np.int64)
    for key in META_KEYS:
        name = f"meta/{key}"
        if bad[name] or index_damaged:
            if copy is not None and len(copy[key]) >= committed:
                meta_values[name] = np.asarray(copy[key][:committed], np.int64)
                if bad[name]:
                    repairable.append(f"{name} is damaged ({_chunk_list(bad[name])}); restorable from the "
                                      "root-attribute index copy (nothing lost)")
            elif bad[name]:  # a store from before the index copy: these entries are simply lost
                problems.append(f"{name} is damaged ({_chunk_list(bad[name])}) and the store has no copy of the "
                                "index in its root attributes; not repairable (re-collect, or restore a backup)")
    num_steps = int(ends[-1]) if committed else 0
    report["num_episodes"], report["num_steps"] = committed, num_steps

    # 3. damaged data chunks -> the committed episodes they hold
    damaged: set[int] = set()
    damage_msgs: list[str] = []
    for name, chunks in bad.items():
        for ci, info in chunks.items():
            if name.startswith("data/"):
                info["episodes"] = episodes_of_rows(ends, *info["rows"])
            damaged.update(info.get("episodes", []))
            held = f"episodes {format_ranges(info['episodes'])}" if info.get("episodes") else "no committed episode"
            rows = f"rows {info['rows'][0]}-{info['rows'][1] - 1}" if ci >= 0 else "unknown chunk"
            report["damaged_chunks"].append({"array": name, "chunk": ci, **info})
            if name.startswith("data/") or info.get("episodes"):
                damage_msgs.append(f"{name} chunk {ci} ({rows}) is {info['kind']}: {info['error']}; holds {held}")
    report["damaged_episodes"] = sorted(damaged)

    # 4. crash leftovers: orphans past the last committed episode, temp files
    for name, a in arrays.items():
        limit = num_steps if name.startswith("data/") else committed
        if a.shape[0] > limit:
            report["orphans"][name] = int(a.shape[0] - limit)
    if report["orphans"]:
        repairable.append(f"orphan rows/entries past the last committed episode: {report['orphans']}")
    partials = partial_files(path)
    if partials:
        repairable.append(f"{len(partials)} leftover *.partial temp files from an interrupted write")

    # 5. contents of the undamaged arrays: string tables, NaN/inf, statistics
    try:
        _check_contents(path, group, attrs, bad, ends, committed, num_steps, meta_values, problems, repairable)
    except StoreError as e:  # --quick: a damaged chunk met while reading contents
        problems.append(str(e))

    fatal = list(problems)
    problems[:0] = damage_msgs
    if not repair or fatal:
        if repair:
            problems.append("not repaired: the problems above are not crash leftovers or damage of known extent")
        problems.extend(repairable)
        return _finish(report, path)
    if damaged:
        share = len(damaged) / max(1, committed)
        if share > max_loss and not force:
            problems.append(f"repair would remove {len(damaged)} of {committed} episodes ({share:.0%}), more than "
                            f"the allowed {max_loss:.0%}; rerun with --force to accept that loss")
            problems.extend(repairable)
            return _finish(report, path)
    _repair(path, group, attrs, report, ends, committed, num_steps, meta_values, damaged, repairable)
    # the repaired store is checked again from scratch; its report is the one returned
    after = _verify(path, False, quick, max_loss, force, False)
    for key in ("ok", "num_episodes", "num_steps", "chunks_checked", "problems", "bytes", "orphans", "checksums"):
        report[key] = after[key]
    report["damaged_chunks_before"] = report["damaged_chunks"]
    report["damaged_chunks"] = after["damaged_chunks"]
    report["repaired"] = True
    return report


def _finish(report: dict, path: Path) -> dict:
    report["ok"] = not report["problems"]
    report["bytes"] = dir_bytes(path)
    return report


def _chunk_list(chunks: dict[int, dict]) -> str:
    return ", ".join(f"chunk {i} {c['kind']}" if i >= 0 else "unreadable" for i, c in sorted(chunks.items()))


def _scan_chunks(path: Path, arrays: dict, bad: dict, strict_missing: bool, progress: bool, report: dict) -> None:
    """Read every chunk; record missing (file absent) and corrupt (fails to decode) ones in ``bad``."""
    from tqdm import tqdm

    total = sum(num_chunks(a) for a in arrays.values())
    with tqdm(total=total, desc="verify", unit="chunk", disable=not progress, file=sys.stderr) as bar:
        for name, a in arrays.items():
            # without checksums/empty-chunk writing, only meta chunks can be told missing: their
            # fill value 0 is never a real entry of episode_ends; data chunks of zeros are valid
            strict = strict_missing or name == "meta/episode_ends"
            for i, lo, hi in iter_chunk_slices(a):
                bar.update(1)
                report["chunks_checked"] += 1
                if strict and not chunk_file(path, a, i).is_file():
                    bad[name][i] = {"kind": "missing", "error": f"chunk file {a.path}/"
                                    f"{a.metadata.encode_chunk_key((i,) + (0,) * (a.ndim - 1))} is absent",
                                    "rows": [lo, hi]}
                    continue
                try:
                    a[lo:hi]
                except Exception as e:  # checksum mismatch, blosc error, truncated file
                    bad[name][i] = {"kind": "corrupt", "error": f"{type(e).__name__}: {e}", "rows": [lo, hi]}


def _index_copy(attrs: dict, data_len: int) -> dict[str, list[int]] | None:
    """The root-attribute index copy when it is complete and consistent, else None."""
    index = attrs.get(INDEX_ATTR)
    keys = ("episode_ends",) + META_KEYS
    if not isinstance(index, dict) or not all(isinstance(index.get(k), list) for k in keys):
        return None
    if len({len(index[k]) for k in keys}) != 1:
        return None
    ends = np.asarray(index["episode_ends"], np.int64)
    prev = np.concatenate([[0], ends[:-1]])
    if ends.size and not ((ends > prev).all() and ends[-1] <= data_len):
        return None
    return index


def _prefix_ok(copy_ends: list[int], ends_raw: np.ndarray) -> bool:
    """The copy may be one episode ahead of the array (written just before the commit)."""
    return len(copy_ends) >= len(ends_raw) - 1


def _check_contents(path, group, attrs, bad, ends, committed, num_steps, meta_values, problems, repairable) -> None:
    def clean(name: str) -> bool:
        return not bad.get(name)

    strings = attrs.get("strings") or {}
    if clean("data/subtask"):
        a = group["data/subtask"]
        sub = read_checked(path, a, "data/subtask", lambda: a[:num_steps], ends)
        if sub.size and (sub.min() < 0 or sub.max() >= len(strings.get("subtasks", []))):
            problems.append("data/subtask has indices outside the subtask table")
    for key, table in (("episode_instruction", "instructions"), ("episode_task", "tasks")):
        name = f"meta/{key}"
        ids = meta_values.get(name)
        if ids is None and clean(name):
            ids = np.asarray(group[name][:committed])
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= len(strings.get(table, []))):
            problems.append(f"{name} has indices outside the {table} table")
    stats = attrs.get("stats")
    if not num_steps:
        return
    if not stats:
        repairable.append("normalization statistics are missing")
    elif stats.get("num_steps") != num_steps:
        repairable.append(f"statistics describe {stats.get('num_steps')} rows, the store has {num_steps}")
    elif clean("data/action") and clean("data/state"):
        a, b = group["data/action"], group["data/state"]
        action = read_checked(path, a, "data/action", lambda: a[:num_steps], ends)
        state = read_checked(path, b, "data/state", lambda: b[:num_steps], ends)
        for key, arr in (("action", action), ("state", state)):
            if not np.isfinite(arr).all():
                problems.append(f"data/{key} holds NaN/inf")
        fresh = stats_record(action, state)
        for key in ("action", "state"):
            for s in STAT_KEYS:
                if not np.allclose(stats[key][s], fresh[key][s], rtol=1e-4, atol=1e-5):
                    repairable.append(f"statistics {key}.{s} do not match the data")


# -- repair ------------------------------------------------------------------------------------


def _repair(path, group, attrs, report, ends, committed, num_steps, meta_values, damaged, repairable) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    fixed: list[str] = report["fixed"]
    with writing_empty_chunks():
        # index and meta arrays restored from the copy; every chunk file of a restored array is
        # deleted first, because a partial write into a corrupt chunk would have to decode it
        restore = {"meta/episode_ends": ends} if report["index_source"] != "meta/episode_ends" else {}
        restore.update(meta_values)
        for name, values in restore.items():
            a = group[name]
            for i, _, _ in iter_chunk_slices(a):
                chunk_file(path, a, i).unlink(missing_ok=True)
            a.resize((committed,))
            if committed:
                a[:committed] = np.asarray(values, a.dtype)
            fixed.append(f"{name}: {committed} entries restored from the root-attribute index copy")
        removed = truncate(group, attrs, num_steps, committed)
        if removed:
            fixed.append(f"truncated orphans {removed}")
        for p in partial_files(path):
            p.unlink(missing_ok=True)
        index = {"episode_ends": [int(x) for x in ends]}
        for key in META_KEYS:
            index[key] = [int(x) for x in group[f"meta/{key}"][:committed]]
        group.attrs.update({INDEX_ATTR: index})
        if not damaged:
            if committed:
                action = np.asarray(group["data/action"][:num_steps], np.float32)
                state = np.asarray(group["data/state"][:num_steps], np.float32)
                group.attrs.update({"stats": stats_record(action, state)})
            else:
                group.attrs.update({"stats": None})
            fixed.extend(repairable)
    if damaged:
        backup = _compact(path, attrs, committed, damaged, stamp)
        report["backup"] = str(backup)
        report["removed_episodes"] = sorted(damaged)
        fixed.extend(repairable)
        fixed.append(f"removed {len(damaged)} damaged episodes ({format_ranges(damaged)}) of {committed}; the "
                     f"original store is kept at {backup}")
    report_file = path.parent / f"{path.name}.repair-{stamp}.json"
    report_file.write_text(json.dumps({"store": str(path), "time_utc": stamp, "fixed": fixed,
                                       "removed_episodes": report["removed_episodes"],
                                       "damaged_chunks": report["damaged_chunks"], "backup": report["backup"]},
                                      indent=1))
    report["report_file"] = str(report_file)


def _compact(path: Path, attrs: dict, committed: int, damaged: set[int], stamp: str) -> Path:
    """Write the undamaged committed episodes into a fresh store, then swap it in; returns the
    path the original was moved to. The new store is complete before the original is moved."""
    from vla.datasets.writer import EpisodeWriter

    tmp = path.parent / f".{path.name}.repair-tmp-{stamp}"
    backup = path.parent / f"{path.name}.pre-repair-{stamp}"
    group, _ = open_group(path, read_only=True)  # the index is consistent again at this point
    ends = np.asarray(group["meta/episode_ends"][:committed], np.int64)
    strings = attrs.get("strings") or {}
    meta = {k: np.asarray(group[f"meta/{k}"][:committed]) for k in META_KEYS}
    optional = [k for k in OPTIONAL_KEYS if get_array(group, f"data/{k}") is not None]
    comp = attrs.get("compression") or {}
    w = EpisodeWriter(tmp, env=attrs["env"], fps=attrs["fps"], cameras=attrs["cameras"],
                      action_dim=attrs["action_dim"], state_dim=attrs["state_dim"],
                      action_names=attrs.get("action_names"), state_names=attrs.get("state_names"),
                      image_chunk_frames=attrs.get("image_chunk_frames"), compression_level=comp.get("clevel", 3),
                      image_shuffle=comp.get("image_shuffle", "noshuffle"), env_options=attrs.get("env_options"))
    with w:
        for i in range(committed):
            if i in damaged:
                continue
            # raw range reads: an undamaged episode never touches a damaged chunk
            s, e = (int(ends[i - 1]) if i else 0), int(ends[i])
            extra = {k: np.asarray(group[f"data/{k}"][s:e]) for k in optional}
            w.add_episode(
                action=np.asarray(group["data/action"][s:e]), state=np.asarray(group["data/state"][s:e]),
                images={cam: np.asarray(group[f"data/images/{cam}"][s:e]) for cam in attrs["cameras"]},
                subtasks=[strings["subtasks"][j] for j in np.asarray(group["data/subtask"][s:e])],
                instruction=strings["instructions"][int(meta["episode_instruction"][i])],
                task=strings["tasks"][int(meta["episode_task"][i])], seed=int(meta["episode_seed"][i]), **extra)
    os.rename(path, backup)
    os.rename(tmp, path)
    return backup
