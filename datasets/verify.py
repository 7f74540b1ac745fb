"""``verify_store``: check an episode store and optionally repair what a crashed writer left.

Checks the structure (format, required arrays, dtypes and trailing shapes), that
``meta/episode_ends`` is strictly increasing and within the data, orphan rows/entries past the
last committed episode, a torn last ``episode_ends`` entry, leftover ``*.partial`` temp files,
string-table indices, NaN/inf, and that the stored statistics match the data. ``repair=True``
truncates orphans, removes temp files and recomputes the statistics; corruption that is not a
crash leftover (e.g. a non-monotonic ``episode_ends`` in the middle) is reported, never "fixed".
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from vla.datasets.layout import (
    committed_episodes,
    data_arrays,
    dir_bytes,
    get_array,
    meta_arrays,
    open_group,
    partial_files,
    required_arrays,
    stats_record,
    truncate,
)
from vla.datasets.stats import STAT_KEYS


def verify_store(path: str | os.PathLike, repair: bool = False) -> dict[str, Any]:
    """Check a store; with ``repair=True`` drop orphan rows/entries and recompute statistics.

    Returns a report: {"path", "ok", "repaired", "format", "version", "num_episodes",
    "num_steps", "orphans": {array: rows}, "problems": [str], "fixed": [str], "bytes"}.
    ``ok`` is True when nothing is wrong (after the repair, if one was asked for). A store that
    cannot be opened at all (not a store, unsupported version) raises ``StoreError``.
    """
    path = Path(path)
    group, attrs = open_group(path, read_only=not repair)
    report: dict[str, Any] = {"path": str(path), "ok": True, "repaired": False, "format": attrs.get("format"),
                              "version": attrs.get("version"), "num_episodes": 0, "num_steps": 0,
                              "orphans": {}, "problems": [], "fixed": [], "bytes": 0}
    problems: list[str] = report["problems"]
    repairable: list[str] = []

    for key in ("fps", "env", "cameras", "action_dim", "state_dim", "strings"):
        if key not in attrs:
            problems.append(f"root attribute '{key}' is missing")
    missing = [n for n in required_arrays(attrs) if get_array(group, n) is None]
    if missing:
        problems.append(f"missing arrays {missing}")
    if problems:
        report["ok"] = False
        return report

    data = data_arrays(group, attrs)
    expect = {"data/action": ("float32", (attrs["action_dim"],)), "data/state": ("float32", (attrs["state_dim"],)),
              "data/subtask": ("int32", ()), "data/reward": ("float32", ()), "data/success": ("bool", ())}
    for cam, (h, w) in attrs["cameras"].items():
        expect[f"data/images/{cam}"] = ("uint8", (h, w, 3))
    for name, a in data.items():
        dt, tail = expect[name]
        if str(a.dtype) != dt or tuple(a.shape[1:]) != tail:
            want = ", ".join(map(str, ("N",) + tail))
            problems.append(f"{name} has dtype {a.dtype} shape {a.shape}, expected {dt} ({want})")

    ends_raw = np.asarray(group["meta/episode_ends"][:], np.int64)
    metas = meta_arrays(group)
    data_len = min(a.shape[0] for a in data.values())
    meta_len = min(a.shape[0] for a in metas.values())
    committed, corrupt = committed_episodes(ends_raw, data_len, meta_len)
    problems.extend(corrupt)
    if committed < len(ends_raw) and not corrupt:
        repairable.append(f"meta/episode_ends has a torn last entry (episode {committed}) from an interrupted commit")
    num_steps = int(ends_raw[committed - 1]) if committed else 0
    report["num_episodes"], report["num_steps"] = committed, num_steps
    for name, a in list(data.items()) + list(metas.items()) + [("meta/episode_ends", group["meta/episode_ends"])]:
        limit = num_steps if name.startswith("data/") else committed
        if a.shape[0] > limit:
            report["orphans"][name] = int(a.shape[0] - limit)
    if report["orphans"]:
        repairable.append(f"orphan rows/entries past the last committed episode: {report['orphans']}")
    partials = partial_files(path)
    if partials:
        repairable.append(f"{len(partials)} leftover *.partial temp files from an interrupted write")

    if not corrupt:
        strings = attrs.get("strings") or {}
        sub = np.asarray(group["data/subtask"][:num_steps])
        if sub.size and (sub.min() < 0 or sub.max() >= len(strings.get("subtasks", []))):
            problems.append("data/subtask has indices outside the subtask table")
        for key, table in (("episode_instruction", "instructions"), ("episode_task", "tasks")):
            ids = np.asarray(group[f"meta/{key}"][:committed])
            if ids.size and (ids.min() < 0 or ids.max() >= len(strings.get(table, []))):
                problems.append(f"meta/{key} has indices outside the {table} table")
        stats = attrs.get("stats")
        if num_steps and not stats:
            repairable.append("normalization statistics are missing")
        elif num_steps and stats.get("num_steps") != num_steps:
            repairable.append(f"statistics describe {stats.get('num_steps')} rows, the store has {num_steps}")
        elif num_steps:
            action = np.asarray(group["data/action"][:num_steps])
            state = np.asarray(group["data/state"][:num_steps])
            for key, arr in (("action", action), ("state", state)):
                if not np.isfinite(arr).all():
                    problems.append(f"data/{key} holds NaN/inf")
            fresh = stats_record(action, state)
            for key in ("action", "state"):
                for s in STAT_KEYS:
                    if not np.allclose(stats[key][s], fresh[key][s], rtol=1e-4, atol=1e-5):
                        repairable.append(f"statistics {key}.{s} do not match the data")

    if repair and repairable and not problems:
        removed = truncate(group, attrs, num_steps, committed)
        for p in partials:
            p.unlink(missing_ok=True)
        if committed:
            action = np.asarray(group["data/action"][:num_steps], np.float32)
            state = np.asarray(group["data/state"][:num_steps], np.float32)
            group.attrs.update({"stats": stats_record(action, state)})
        else:
            group.attrs.update({"stats": None})
        report["fixed"] = list(repairable) + ([f"truncated {removed}"] if removed else [])
        report["repaired"] = True
        report["orphans"] = {}
        repairable = []
    problems.extend(repairable)
    report["ok"] = not problems
    report["bytes"] = dir_bytes(path)
    return report
