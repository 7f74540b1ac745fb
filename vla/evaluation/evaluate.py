"""Closed-loop evaluation: rollouts of a policy in simulation, success statistics, videos, a chart.

``run_evaluation`` runs ``episodes_per_task`` episodes of every task over a stated seed range
(``seed_start + i``; evaluation seeds default to ``vla.envs.EVAL_SEED_START``, disjoint from the
collection seeds) and returns a JSON-ready dict:

- per task: episodes, successes, success rate with a Wilson 95% interval, mean episode length;
- per episode: task, seed, instruction, success, length, the policy's final plan;
- throughput: env steps, wall time, env steps/s.

Rollouts go through the one rollout engine (``vla.envs.rollout``): ``n_envs > 1`` runs the envs
in spawned worker processes (``vla.envs.pool.ProcessPool``; every episode starts from its own
seed; a worker lost mid-episode is restarted and its episode re-run) and the policy is queried
once per step for all envs that need a new action chunk (``Policy.act_batch``); ``n_envs == 1``
runs one env in-process. An episode
succeeds when ``info["success"]`` is true at any step and ends right there (no time wasted on
the rest of the horizon); otherwise it ends at termination, truncation or ``max_steps``.

Videos (mp4 via imageio-ffmpeg) of the first ``videos_per_task`` episodes of each task show the
policy's cameras upscaled (64 px -> 256 px) under a text band with the instruction, the current
decoded subtask and the step. ``write_outputs`` adds ``eval_info.json`` and a PNG bar chart with
the confidence intervals; ``format_table`` is the compact summary printed at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vla.envs.rollout import Recorder

if TYPE_CHECKING:
    from vla.policies.base import PolicyProtocol

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# ---- statistics ---------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which is
    where small robot evaluations often land. ``n == 0`` gives the uninformative (0, 1).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval: expected 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


INSTRUCTION_SPLITS = ("train", "eval", "paraphrase", "all")


def summarize(episodes: list[dict], tasks: list[str] | None = None) -> dict[str, Any]:
    """Per-task and overall success statistics from per-episode records (``task``, ``success``, ``length``).

    ``overall`` pools every episode; ``mean_over_tasks`` averages the per-task rates (they differ
    when tasks have different episode counts or rates; both are labelled wherever they are shown)."""
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(e["task"] for e in episodes))
    per_task: dict[str, dict] = {}
    for task in tasks:
        eps = [e for e in episodes if e["task"] == task]
        per_task[task] = _stats(eps)
    rates = [s["success_rate"] for s in per_task.values()]
    return {"per_task": per_task, "overall": _stats(episodes),
            "mean_over_tasks": float(np.mean(rates)) if rates else 0.0}


def lerobot_keys(episodes: list[dict], wall_s: float) -> dict[str, Any]:
    """LeRobot's eval_info keys beside ours: ``per_episode`` and ``aggregated`` (pc_success in percent)."""
    n = len(episodes)
    per_episode = [{"episode_ix": i, "success": bool(e["success"]), "seed": int(e["seed"]),
                    "sum_reward": float(e.get("sum_reward", 0.0)), "task": e["task"]} for i, e in enumerate(episodes)]
    return {"per_episode": per_episode,
            "aggregated": {"pc_success": 100.0 * sum(bool(e["success"]) for e in episodes) / n if n else 0.0,
                           "avg_sum_reward": float(np.mean([e["sum_reward"] for e in per_episode])) if n else 0.0,
                           "eval_s": float(wall_s), "eval_ep_s": float(wall_s) / n if n else 0.0}}


def _stats(eps: list[dict]) -> dict[str, Any]:
    n = len(eps)
    k = sum(bool(e["success"]) for e in eps)
    lo, hi = wilson_interval(k, n)
    lengths = [e["length"] for e in eps]
    succ_lengths = [e["length"] for e in eps if e["success"]]
    return {
        "episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "ci95": [lo, hi],
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "mean_length_success": float(np.mean(succ_lengths)) if succ_lengths else None,
        # partial progress (tabletop): mean fraction of the plan's subtasks completed in order
        "mean_subtask_progress": (float(np.mean([e["subtasks_done"] / e["num_subtasks"] for e in eps]))
                                  if eps and all(e.get("num_subtasks") for e in eps) else None),
    }


def format_table(result: dict) -> str:
    """A compact fixed-width table of per-task success (what `vla eval` prints at the end)."""
    rows = [("task", "succ/n", "rate", "95% CI", "mean len")]
    items = list(result["per_task"].items())
    if len(items) > 1:
        items.append(("overall (pooled)", result["overall"]))
    for task, s in items:
        lo, hi = s["ci95"]
        rows.append(
            (task, f"{s['successes']}/{s['episodes']}", f"{s['success_rate']:.1%}", f"[{lo:.2f}, {hi:.2f}]",
             f"{s['mean_length']:.1f}")
        )
    if len(result["per_task"]) > 1 and "mean_over_tasks" in result:
        rows.append(("mean over tasks", "", f"{result['mean_over_tasks']:.1%}", "", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---- videos and chart ---------------------------------------------------------------------------
def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return lines + ([cur] if cur else [])


def render_frame(
    images: dict[str, np.ndarray],
    instruction: str,
    subtask: str | None = None,
    step: int | None = None,
    success: bool = False,
    scale_to: int = 256,
) -> np.ndarray:
    """One video frame u8[H', W', 3]: cameras side by side, upscaled, under a text band.

    Nearest-neighbour upscaling keeps small policy images honest (no invented detail). The band
    holds the instruction (wrapped), ``> subtask`` and the step; a green border marks success.
    Dimensions are multiples of 16 so ffmpeg needs no resizing.
    """
    import cv2

    tiles = []
    for img in images.values():
        img = np.asarray(img, dtype=np.uint8)
        h, w = img.shape[:2]
        s = max(1, round(scale_to / h))
        tiles.append(cv2.resize(img, (w * s, h * s), interpolation=cv2.INTER_NEAREST))
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    body = np.concatenate(tiles, axis=1)  # (h, sum w, 3)
    width = body.shape[1]
    font, fs, lh = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 14
    chars = max(10, int(width / 7.5))
    lines = _wrap(instruction, chars)[:2]
    lines.append("> " + (subtask if subtask else "-") + ("" if step is None else f"   [t={step}]"))
    band_h = 16 * math.ceil((len(lines) * lh + 8) / 16)
    band = np.zeros((band_h, width, 3), np.uint8)
    for k, line in enumerate(lines):
        color = (120, 220, 255) if line.startswith(">") else (255, 255, 255)
        cv2.putText(band, line[: chars + 12], (4, 12 + k * lh), font, fs, color, 1, cv2.LINE_AA)
    frame = np.concatenate([band, body], axis=0)
    pad_w = (-frame.shape[1]) % 16
    pad_h = (-frame.shape[0]) % 16
    frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))
    if success:
        frame[:3], frame[-3:], frame[:, :3], frame[:, -3:] = (0, 200, 0), (0, 200, 0), (0, 200, 0), (0, 200, 0)
    return np.ascontiguousarray(frame)


def check_video_backend(where: str) -> None:
    """Fail before any episode runs, not after, when mp4s cannot be written (imageio-ffmpeg missing)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise RuntimeError(f"{where}: videos need imageio-ffmpeg's ffmpeg (pip install imageio-ffmpeg), which is "
                           f"missing here ({e}); run with videos=0 for no videos") from e


def write_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int = 20) -> Path:
    """Write u8[H, W, 3] frames to an H.264 mp4 (imageio-ffmpeg). Creates parent folders."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError(f"write_video {path}: no frames")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=16,
                            ffmpeg_log_level="error") as writer:
        for f in frames:
            writer.append_data(f)
    return path


def plot_success_chart(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """PNG bar chart: per-task success rate with Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["per_task"])
    rates = np.array([result["per_task"][t]["success_rate"] for t in tasks])  # (T,)
    ci = np.array([result["per_task"][t]["ci95"] for t in tasks]).reshape(-1, 2)  # (T, 2)
    yerr = np.stack([rates - ci[:, 0], ci[:, 1] - rates]).clip(min=0)  # (2, T)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(tasks) + 1.5), 3.6), dpi=110)
    x = np.arange(len(tasks))
    ax.bar(x, rates, color="#4C72B0", yerr=yerr, capsize=4, ecolor="black")
    for xi, t in zip(x, tasks):
        s = result["per_task"][t]
        ax.text(xi, 1.02, f"{s['successes']}/{s['episodes']}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=30 if len(tasks) > 2 else 0, ha="right" if len(tasks) > 2 else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.set_title(title or "closed-loop success", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- recorders ----------------------------------------------------------------------------------
class EpisodeRecords(Recorder):
    """Rollout recorder: one JSON-ready record per finished episode, and the progress bar."""

    def __init__(self, policy: PolicyProtocol, bar: Any = None) -> None:
        self.policy = policy
        self.bar = bar
        self.records: list[dict] = []
        self.progress: dict[int, tuple[int | None, int | None]] = {}  # slot -> (most subtasks done, plan length)

    def start(self, ep, obs, info) -> None:
        self.progress[ep.slot] = _progress(info)

    def step(self, ep, obs, action, subtask, reward, next_obs, info) -> None:
        self.progress[ep.slot] = _progress(info, self.progress.get(ep.slot))

    def needs_images(self, ep) -> bool:
        return False

    def end(self, ep) -> None:
        done, total = self.progress.pop(ep.slot, (None, None))
        self.records.append({"task": ep.task, "seed": ep.seed, "instruction": ep.instruction,
                             "success": ep.success, "length": ep.length, "sum_reward": ep.sum_reward,
                             "subtasks_done": done, "num_subtasks": total,
                             "final_plan": self.policy.current_plan(ep.slot)})
        if self.bar is not None:
            done = [r for r in self.records if r["task"] == ep.task]
            self.bar.update(1)
            self.bar.set_postfix_str(f"{ep.task} {sum(r['success'] for r in done)}/{len(done)}")


def _progress(info: dict, last: tuple | None = None) -> tuple[int | None, int | None]:
    """(subtasks done so far, plan length) from an env info that reports them (the tabletop suite)."""
    if "subtasks_done" not in info:
        return last or (None, None)
    done = int(info["subtasks_done"])
    return max(done, (last or (0, None))[0] or 0), int(info.get("num_subtasks", 0)) or None


class VideoRecorder(Recorder):
    """Rollout recorder: an mp4 of the first ``per_task`` seeds of each task (``seed < first_seed +
    per_task``), the policy's cameras under a band with the instruction and current subtask."""

    def __init__(self, policy: PolicyProtocol, video_dir: Path, first_seed: int, per_task: int, fps: int = 20) -> None:
        check_video_backend(f"evaluation videos in {video_dir}")
        self.policy = policy
        self.video_dir = Path(video_dir)
        self.first_seed = first_seed
        self.per_task = per_task
        self.fps = fps
        self.frames: dict[int, list[np.ndarray]] = {}
        self.paths: list[str] = []

    def _frame(self, ep, obs: dict) -> None:
        if ep.slot in self.frames:
            subtask = self.policy.current_subtask(ep.slot)
            self.frames[ep.slot].append(
                render_frame(obs["images"], ep.instruction, subtask, step=ep.length, success=ep.success)
            )

    def start(self, ep, obs, info) -> None:
        if ep.seed - self.first_seed < self.per_task:
            self.frames[ep.slot] = []
            self._frame(ep, obs)

    def step(self, ep, obs, action, subtask, reward, next_obs, info) -> None:
        self._frame(ep, next_obs)

    def needs_images(self, ep) -> bool:
        return ep.slot in self.frames  # only the episodes being filmed

    def end(self, ep) -> None:
        frames = self.frames.pop(ep.slot, None)
        if frames:
            path = self.video_dir / f"{ep.task}_seed{ep.seed}_{'success' if ep.success else 'fail'}.mp4"
            self.paths.append(str(write_video(frames, path, fps=self.fps)))

    def discard(self, ep) -> None:
        self.frames.pop(ep.slot, None)


# ---- evaluation ---------------------------------------------------------------------------------
def run_evaluation(
    policy: PolicyProtocol,
    family: str,
    tasks: list[str],
    episodes_per_task: int,
    n_envs: int = 1,
    seed_start: int | None = None,
    instruction_split: str = "eval",
    max_steps: int | None = None,
    video_dir: str | os.PathLike | None = None,
    videos_per_task: int = 3,
    env_kwargs: dict | None = None,
    video_fps: int = 20,
    progress: bool = True,
    sync_chunks: bool = True,
    torch_threads: int | None = None,
    instruction: str | None = None,
    lazy_images: bool = True,
) -> dict[str, Any]:
    """Closed-loop rollouts of ``policy`` on every task; returns statistics and per-episode records.

    ``env_kwargs`` go to ``make_env`` (cameras, image_size...; a VLA policy's ``env_kwargs()``
    builds the env the model was trained on). Episode ``i`` of a task uses seed ``seed_start + i``
    for every task, so two policies evaluated with the same arguments see the same scenes.
    ``sync_chunks`` (several envs): envs with at most half a queue left join a model call made for
    another env (``Policy.refill_below``), so batches stay full after episodes end at different steps.
    An episode's flow noise follows its seed alone (``VLAPolicy.seed_episode``), so with ``n_envs=1`` or
    ``sync_chunks=False`` a seed replays the same episode however many episodes ran beside it; with
    ``sync_chunks`` the early refills move an episode's chunk boundaries with its neighbours.
    ``instruction``: one instruction for every episode (a user's own phrasing) instead of the env's;
    ``instruction_split`` picks the env's paraphrases otherwise (train, eval = held-out wording and,
    on the tabletop suite, held-out objects; paraphrase = held-out wording only; all).
    ``lazy_images`` (default): render only the observations the policy or a video reads (once per
    chunk; `vla.envs.rollout`); ``False`` renders every step (same episodes, slower).
    ``torch_threads``: intra-op threads for the policy during the rollouts; ``None`` = 1 when
    ``n_envs > 1`` (the env workers need the other cores: on 2 cores a tiny VLA with 4 envs ran
    ~1.5x faster with 1 thread than with 2), else unchanged.
    """
    from vla.envs import EVAL_SEED_START
    from vla.envs.pool import make_pool
    from vla.envs.rollout import rollout

    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("run_evaluation: expected at least one task, got none")
    if int(episodes_per_task) < 1 or int(n_envs) < 1:
        raise ValueError(f"run_evaluation: expected episodes >= 1 and n_envs >= 1, got {episodes_per_task}, {n_envs}")
    if instruction_split not in INSTRUCTION_SPLITS:
        raise ValueError(f"instruction_split: expected one of {INSTRUCTION_SPLITS}, got {instruction_split!r}")
    seed_start = EVAL_SEED_START if seed_start is None else int(seed_start)
    env_kwargs = dict(env_kwargs or {})
    env_kwargs.setdefault("instruction_split", instruction_split)
    if max_steps is not None:
        env_kwargs.setdefault("max_episode_steps", int(max_steps))
    video_dir = None if video_dir is None or videos_per_task <= 0 else Path(video_dir)
    jobs = [(task, seed_start + k) for task in tasks for k in range(int(episodes_per_task))]
    n = min(int(n_envs), len(jobs))

    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="eval", unit="ep", dynamic_ncols=True)
    records = EpisodeRecords(policy, bar)
    recorders: list[Any] = [records]
    if video_dir is not None:
        videos = VideoRecorder(policy, video_dir, seed_start, int(videos_per_task), video_fps)
        recorders.append(videos)
    import torch

    saved_threads = torch.get_num_threads()
    threads = int(torch_threads) if torch_threads else (1 if int(n_envs) > 1 else saved_threads)
    torch.set_num_threads(max(1, threads))
    saved_refill = getattr(policy, "refill_below", None)
    if sync_chunks and n_envs > 1 and saved_refill is not None:
        policy.refill_below = max(saved_refill, policy.n_action_steps // 2)
    try:
        with make_pool(family, n, env_kwargs, workers=n > 1) as pool:
            run = rollout(policy, pool, jobs, recorders, max_steps=max_steps, end_on_success=True,
                          instruction=instruction, lazy_images=lazy_images)
    finally:
        torch.set_num_threads(saved_threads)
        if saved_refill is not None:
            policy.refill_below = saved_refill
        if bar is not None:
            bar.close()
    order = {job: k for k, job in enumerate(jobs)}
    episodes = sorted(records.records, key=lambda r: order[(r["task"], r["seed"])])
    wall = time.perf_counter() - t_start
    result = {
        "family": family,
        "tasks": tasks,
        "episodes_per_task": int(episodes_per_task),
        "seed_start": seed_start,
        "seed_end": seed_start + int(episodes_per_task) - 1,
        "instruction_split": instruction_split,
        "instruction": instruction,
        "max_steps": max_steps,
        "n_envs": int(n_envs),
        "sync_chunks": bool(sync_chunks and n_envs > 1),
        "policy": getattr(policy, "name", type(policy).__name__),
        "env_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in env_kwargs.items()},
        **summarize(episodes, tasks),
        "episodes": episodes,
        "videos": sorted(videos.paths) if video_dir is not None else [],
        # episodes whose env worker was lost and that were run again from their seed, and those
        # that could not be run at all (every worker lost): reported, never dropped in silence
        "rerun_episodes": [{"task": t, "seed": s} for t, s in run.rerun],
        "unfinished_episodes": [{"task": t, "seed": s} for t, s in run.unfinished],
        **lerobot_keys(episodes, wall),
        "throughput": {
            "env_steps": run.env_steps,
            "wall_s": wall,
            "rollout_s": run.seconds,
            "env_steps_per_s": run.env_steps / wall if wall > 0 else 0.0,
            "rollout_env_steps_per_s": run.env_steps / run.seconds if run.seconds > 0 else 0.0,
            "torch_threads": max(1, threads),
        },
    }
    return result


# ---- outputs ------------------------------------------------------------------------------------
def write_outputs(result: dict, out_dir: str | os.PathLike, chart_title: str | None = None) -> dict[str, str]:
    """Write ``eval_info.json`` and ``success.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = plot_success_chart(result, out_dir / "success.png", title=chart_title)
    result = {**result, "chart": str(chart)}
    info_path = out_dir / "eval_info.json"
    tmp = info_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default))
    os.replace(tmp, info_path)
    return {"eval_info": str(info_path), "chart": str(chart)}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
