"""Measure the tabletop suite: scripted-expert success per family, env steps/s with rendering,
and start/goal pictures.

    python -m vla.bench.tabletop success --episodes 20 [--split train] [--tasks a,b]
    python -m vla.bench.tabletop speed --steps 200
    python -m vla.bench.tabletop pictures --out docs/tabletop

`success` and `speed` print one JSON object on stdout (the `vla bench` convention); `pictures`
writes one PNG per family (start and goal, front and wrist cameras) plus a contact sheet.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla.envs.rollout import Recorder


class _ExpertEpisodes(Recorder):
    """Per episode: success, steps, the subtask labels, the final info and (optionally) the
    camera images at the start and at the end."""

    def __init__(self, keep_images: bool = False) -> None:
        self.keep_images = keep_images
        self.rows: list[dict] = []
        self._running: dict[int, dict] = {}

    def start(self, ep, obs, info) -> None:
        self._running[ep.slot] = {"labels": [], "start": obs["images"] if self.keep_images else None}

    def step(self, ep, obs, action, subtask, reward, next_obs, info) -> None:
        row = self._running[ep.slot]
        row["labels"].append(subtask)
        row["info"], row["goal"] = info, next_obs["images"] if self.keep_images else None

    def needs_images(self, ep) -> bool:
        return self.keep_images

    def end(self, ep) -> None:
        row = self._running.pop(ep.slot)
        info = row.pop("info")
        self.rows.append({"seed": ep.seed, "success": bool(info["success"]), "steps": ep.length,
                          "subtasks_done": info["subtasks_done"], "num_subtasks": info["num_subtasks"],
                          "instruction": info["instruction"], **row})


def _expert_done(policy: Any):
    """Episode end rule of these measurements: the goal holds and the expert has run its whole plan."""

    def done(ep, info) -> bool:
        return bool(info["success"]) and policy.expert(ep.slot).k >= info["num_subtasks"]

    return done


def run_expert_episodes(pool: Any, task: str, seeds: list[int], keep_images: bool = False) -> list[dict]:
    """Roll the scripted expert for one episode per seed in ``pool`` (a ``vla.envs.pool`` pool of
    the tabletop family); an episode stops once the goal holds and the expert is done, or at the
    env's time limit. One dict per episode, in seed order."""
    from vla.envs.rollout import rollout
    from vla.policies import ExpertPolicy

    policy = ExpertPolicy("tabletop")
    recorder = _ExpertEpisodes(keep_images)
    rollout(policy, pool, [(task, int(s)) for s in seeds], [recorder], done=_expert_done(policy))
    return sorted(recorder.rows, key=lambda r: seeds.index(r["seed"]))


def measure_success(tasks: list[str], episodes: int, split: str = "train", seed_start: int = 0) -> dict:
    """Expert success rate per family over `episodes` seeds (no rendering)."""
    from vla.envs.pool import InProcessPool

    rows = {}
    for task in tasks:
        with InProcessPool("tabletop", 1, {"cameras": (), "instruction_split": split}) as pool:
            t0 = time.perf_counter()
            results = run_expert_episodes(pool, task, [seed_start + i for i in range(episodes)])
            dt = time.perf_counter() - t0
        n_ok = sum(r["success"] for r in results)
        steps = [r["steps"] for r in results]
        rows[task] = {"success_rate": n_ok / episodes, "successes": n_ok, "episodes": episodes,
                      "num_subtasks": results[0]["num_subtasks"], "mean_steps": float(np.mean(steps)),
                      "max_steps": int(max(steps)), "failed_seeds": [r["seed"] for r in results if not r["success"]],
                      "physics_expert_steps_per_s": round(sum(steps) / dt, 1)}
    return rows


def measure_speed(task: str, steps: int, seed: int = 0) -> dict:
    """Env steps/s under the scripted expert, for several camera sets and image sizes."""
    from vla.envs.pool import InProcessPool
    from vla.envs.rollout import rollout
    from vla.policies import ExpertPolicy

    out = {}
    for cams in [(), ("front",), ("front", "wrist")]:
        for size in ([64] if not cams else [64, 128]):
            policy = ExpertPolicy("tabletop")
            with InProcessPool("tabletop", 1, {"cameras": cams, "image_size": size}) as pool:
                pool.reset({0: (task, seed)})  # env construction outside the timing
                run = rollout(
                    policy, pool, [(task, seed + k) for k in range(steps)], max_env_steps=steps,
                    done=_expert_done(policy), lazy_images=False,  # this measures the renders
                )
            key = "no_render" if not cams else f"{'+'.join(cams)}@{size}px"
            out[key] = round(run.env_steps / run.seconds, 1)
    return out


def _caption(img: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    import cv2

    bar = np.full((height, img.shape[1], 3), 255, np.uint8)
    scale = 0.38
    while cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > img.shape[1] - 6 and scale > 0.2:
        scale -= 0.02
    cv2.putText(bar, text, (3, height - 7), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


def make_pictures(out_dir: Path, size: int = 192, seed: int = 3) -> list[Path]:
    """Per family: start and goal (front + wrist) in one PNG; plus a contact sheet of all families."""
    import imageio.v3 as iio

    from vla.envs.pool import InProcessPool
    from vla.envs.tabletop import list_tasks

    out_dir.mkdir(parents=True, exist_ok=True)
    written, sheet_rows = [], []
    for task in list_tasks():
        with InProcessPool("tabletop", 1, {"cameras": ("front", "wrist"), "image_size": size}) as pool:
            row = run_expert_episodes(pool, task, [seed], keep_images=True)[0]
        start, goal = row["start"], row["goal"]
        tiles = [_caption(start["front"], "start (front)"), _caption(start["wrist"], "start (wrist)"),
                 _caption(goal["front"], f"goal (front) success={row['success']}"),
                 _caption(goal["wrist"], "goal (wrist)")]
        row_img = np.concatenate(tiles, 1)
        row_img = _caption(row_img, f"{task}: \"{row['instruction']}\"", height=26)
        path = out_dir / f"{task}.png"
        iio.imwrite(path, row_img)
        written.append(path)
        sheet_rows.append(row_img)
    cols = 2
    width = max(r.shape[1] for r in sheet_rows)
    pad = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in sheet_rows]
    while len(pad) % cols:
        pad.append(np.full_like(pad[0], 255))
    grid = np.concatenate([np.concatenate(pad[i:i + cols], 1) for i in range(0, len(pad), cols)], 0)
    step = max(1, math.ceil(grid.shape[1] / 1600))
    path = out_dir / "contact_sheet.png"
    iio.imwrite(path, grid[::step, ::step])
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    from vla.envs.tabletop import list_tasks

    parser = argparse.ArgumentParser(prog="python -m vla.bench.tabletop", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_s = sub.add_parser("success", help="scripted-expert success per family (JSON)")
    p_s.add_argument("--episodes", type=int, default=20)
    p_s.add_argument("--split", default="train", choices=["train", "eval"])
    p_s.add_argument("--seed-start", type=int, default=0)
    p_s.add_argument("--tasks", default="", help="comma-separated families (default: all)")
    p_v = sub.add_parser("speed", help="env steps/s with rendering (JSON)")
    p_v.add_argument("--steps", type=int, default=200)
    p_v.add_argument("--task", default="pick-place")
    p_p = sub.add_parser("pictures", help="start/goal PNGs per family")
    p_p.add_argument("--out", default="docs/tabletop")
    p_p.add_argument("--size", type=int, default=192)
    p_p.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    machine = {"machine": platform.machine(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if args.what == "success":
        tasks = [t for t in args.tasks.split(",") if t] or list_tasks()
        unknown = [t for t in tasks if t not in list_tasks()]
        if unknown:
            raise ValueError(f"--tasks: unknown {unknown}; expected names from {list_tasks()}")
        rows = measure_success(tasks, args.episodes, args.split, args.seed_start)
        overall = sum(r["successes"] for r in rows.values()) / sum(r["episodes"] for r in rows.values())
        print(json.dumps({"bench": "tabletop_expert_success", "split": args.split, "overall": overall,
                          "families": rows, **machine}))
    elif args.what == "speed":
        print(json.dumps({"bench": "tabletop_env_steps_per_s", "task": args.task, "steps": args.steps,
                          "steps_per_s": measure_speed(args.task, args.steps), **machine}))
    else:
        for path in make_pictures(Path(args.out), args.size, args.seed):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
