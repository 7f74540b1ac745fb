"""`vla dataset {info,verify,import-lerobot,export-lerobot}`: inspect, check, convert a store.

``info`` prints episodes, steps, tasks and instructions with counts, the subtask table with
step counts, cameras, bytes on disk and a statistics summary (``--json``: one object). ``verify``
reads every chunk of every array (``--quick``: metadata, index and statistics only) and exits 0
when the store is valid (or was repaired), 1 when problems remain; ``--repair`` applies only
proven repairs and refuses to drop more than ``--max-loss`` of the episodes without ``--force``.
``import-lerobot SRC OUT`` / ``export-lerobot STORE OUT`` convert from / to a LeRobotDataset v3
folder. A path that is not a store is a ``StoreError`` (a ``ValueError``), which the CLI prints
as one line with exit code 2.
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
    ver.add_argument("--repair", action="store_true",
                     help="restore the index from its copy, drop episodes in damaged chunks and orphan rows of a "
                          "crashed writer, recompute statistics; writes <store>.repair-<time>.json")
    ver.add_argument("--quick", action="store_true", help="metadata, index and statistics only (no chunk scan)")
    ver.add_argument("--max-loss", type=float, default=0.10,
                     help="largest share of episodes --repair may remove (default 0.10)")
    ver.add_argument("--force", action="store_true", help="let --repair remove more than --max-loss")
    ver.add_argument("--json", action="store_true", help="print the report as one JSON object")
    imp = sub.add_parser("import-lerobot", help="convert a local LeRobotDataset v3 folder into a new store")
    imp.add_argument("src")
    imp.add_argument("out")
    imp.add_argument("--env", default=None, help="env name recorded in the store (default: info.json robot_type)")
    exp = sub.add_parser("export-lerobot", help="write a store as a LeRobotDataset v3 folder")
    exp.add_argument("store")
    exp.add_argument("out")
    exp.add_argument("--images", choices=("png", "mp4"), default="png",
                     help="png: lossless images in the parquet files; mp4: one video per camera (lossy)")
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
        "env_options": s.env_options,
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
    opts = "".join(f", {k}={v}" for k, v in sm["env_options"].items())
    print(f"  env {sm['env']}{opts}, {sm['fps']:g} fps, {sm['episodes']} episodes, {sm['steps']} steps, "
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
    if args.action == "import-lerobot":
        from vla.datasets.lerobot import import_lerobot

        s = import_lerobot(args.src, args.out, env=args.env)
        print(f"imported {args.src} -> {args.out}: {s.num_episodes} episodes, {s.num_steps} steps")
        return 0
    if args.action == "export-lerobot":
        from vla.datasets.lerobot import export_lerobot

        info = export_lerobot(args.store, args.out, images=args.images)
        print(f"exported {args.store} -> {args.out}: LeRobotDataset {info['codebase_version']}, "
              f"{info['total_episodes']} episodes, {info['total_frames']} frames")
        return 0
    import sys

    from vla.datasets import verify_store

    report = verify_store(args.path, repair=args.repair, quick=args.quick, max_loss=args.max_loss,
                          force=args.force, progress=sys.stderr.isatty() and not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        state = "OK" if report["ok"] else "PROBLEMS FOUND"
        checked = "metadata only (--quick)" if args.quick else f"{report.get('chunks_checked', 0)} chunks read"
        print(f"{report['path']}: {state} -- {report['num_episodes']} episodes, {report['num_steps']} steps, "
              f"{checked}")
        for msg in report["fixed"]:
            print(f"  fixed: {msg}")
        for msg in report["problems"]:
            print(f"  problem: {msg}")
        if report.get("report_file"):
            print(f"  repair report: {report['report_file']}")
        if not report["ok"] and not args.repair:
            print("  run `vla dataset verify PATH --repair` to apply the safe repairs (see --help)")
    return 0 if report["ok"] else 1
