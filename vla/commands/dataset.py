"""`vla dataset {info,verify} PATH [--repair] [--json]`: inspect or check an episode store.

``info`` prints episodes, steps, tasks and instructions with counts, the subtask table with
step counts, cameras, bytes on disk and a statistics summary. ``verify`` exits 0 when the store
is valid (or was repaired), 1 when problems were found and not repaired. A path that is not a
store is a ``StoreError`` (a ``ValueError``), which the CLI prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla dataset", description="Inspect or verify a vla episode store.")
    sub = p.add_subparsers(dest="action", required=True)
    info = sub.add_parser("info", help="summarize a store")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ver = sub.add_parser("verify", help="check a store (exit 1 if problems remain)")
    ver.add_argument("path")
    ver.add_argument("--repair", action="store_true", help="drop orphan rows left by a crashed writer, recompute stats")
    ver.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def store_summary(path: str | Path) -> dict:
    """The `info` summary as a JSON-able dict (also used by other commands)."""
    from vla.datasets import EpisodeStore
    from vla.datasets.layout import dir_bytes

    s = EpisodeStore(path)
    lengths = s.episode_lengths
    sub_counts = np.bincount(s.lowdim("subtask"), minlength=len(s.subtask_table)) if s.num_steps else []
    summary = {
        "path": str(s.path),
        "format": f"vla.episodes v{s.version}",
        "env": s.env,
        "fps": s.fps,
        "episodes": s.num_episodes,
        "steps": s.num_steps,
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())}
        if s.num_episodes else None,
        "cameras": {c: list(hw) for c, hw in s.cameras.items()},
        "action_dim": s.action_dim,
        "state_dim": s.state_dim,
        "optional": list(s.optional_keys),
        "tasks": dict(Counter(s.episode_tasks).most_common()),
        "instructions": dict(Counter(s.episode_instructions).most_common()),
        "subtasks": {name: int(sub_counts[i]) for i, name in enumerate(s.subtask_table)} if s.num_steps else {},
        "bytes": dir_bytes(s.path),
        "vla_version": s.attrs.get("vla_version"),
    }
    if s.num_steps:
        summary["stats"] = {k: {st: [round(float(x), 4) for x in v] for st, v in d.items()} for k, d in s.stats.items()}
    return summary


def _print_info(sm: dict) -> None:
    print(f"{sm['path']}  ({sm['format']}, written by vla {sm['vla_version']})")
    print(f"  env {sm['env']}, {sm['fps']:g} fps, {sm['episodes']} episodes, {sm['steps']} steps, "
          f"{_fmt_bytes(sm['bytes'])} on disk")
    if sm["episode_length"]:
        el = sm["episode_length"]
        print(f"  episode length min {el['min']} / mean {el['mean']:.1f} / max {el['max']}")
    print("  cameras: " + ", ".join(f"{c} {h}x{w}" for c, (h, w) in sm["cameras"].items()))
    print(f"  action_dim {sm['action_dim']}, state_dim {sm['state_dim']}"
          + (f", optional {sm['optional']}" if sm["optional"] else ""))
    for title, key, unit in (("tasks", "tasks", "episodes"), ("instructions", "instructions", "episodes"),
                             ("subtasks", "subtasks", "steps")):
        print(f"  {title} ({len(sm[key])}):")
        for name, n in sm[key].items():
            print(f"    {n:>7} {unit:<8} {name}")
    for key, d in sm.get("stats", {}).items():
        print(f"  stats {key}:")
        for st, v in d.items():
            print(f"    {st:<4} {np.array2string(np.asarray(v), precision=3, max_line_width=110)}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action == "info":
        sm = store_summary(args.path)
        if args.json:
            print(json.dumps(sm))
        else:
            _print_info(sm)
        return 0
    from vla.datasets import verify_store

    report = verify_store(args.path, repair=args.repair)
    if args.json:
        print(json.dumps(report))
    else:
        state = "OK" if report["ok"] else "PROBLEMS FOUND"
        print(f"{report['path']}: {state} -- {report['num_episodes']} episodes, {report['num_steps']} steps")
        for msg in report["fixed"]:
            print(f"  fixed: {msg}")
        for msg in report["problems"]:
            print(f"  problem: {msg}")
        if not report["ok"] and not args.repair:
            print("  run `vla dataset verify PATH --repair` to drop orphan rows and recompute statistics")
    return 0 if report["ok"] else 1
