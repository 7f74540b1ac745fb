"""Where does a policy think the named object is? The goal head's readout at each episode's first frame.

    python scripts/goal_probe.py CHECKPOINT STORE [STORE ...] [--max N] [--confusion]

For a checkpoint trained with ``model.goal_loss_weight`` > 0: the goal head predicts the state at the
demonstration's next gripper switch (at t = 0: where the hand will close on the named object). Prints,
per store, the median xy error of that prediction (cm, the first two state entries are the hand's x, y
in metres on the tabletop env), beside guessing the store's mean goal and the hand-to-goal distance.
Run it on the training store and on a store of unseen layouts (`vla collect ... seed_start=900000`):
a model that grounds the instruction is better than the mean guess on both. On a store whose goals fall on a
few fixed places (``layout=slots``) it also prints how often the prediction is nearest the right place.
A goal-frame store (`vla collect goal_frames=N`) works too and is cheap to make large: its first
``--max N`` frames (default 30 for episode stores, 1000 for goal frames) are the examples. With
``--confusion`` on a tabletop goal-frame store, each frame's scene is rebuilt from its seed and the object
nearest the predicted goal is classed: the named one, another of the same shape (a colour confusion),
another of the same colour (a shape confusion), or neither.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from vla.datasets import EpisodeStore, WindowDataset, collate_windows
from vla.datasets.goal_frames import FORMAT as GOAL_FRAMES_FORMAT
from vla.datasets.goal_frames import GoalFrames
from vla.policies.vla_policy import VLAPolicy


def is_goal_frames(path: str) -> bool:
    import json
    from pathlib import Path

    meta = Path(path) / "zarr.json"
    return meta.is_file() and json.loads(meta.read_text()).get("attributes", {}).get("format") == GOAL_FRAMES_FORMAT


def first_frames(model, store_path: str, max_examples: int | None) -> dict:
    """A collated batch of the first frames: each episode's t = 0, or a goal-frame store's frames."""
    cfg = model.cfg
    if is_goal_frames(store_path):
        frames = GoalFrames(store_path)
        idx = np.arange(min(len(frames), max_examples or 1000))
        return frames.batch(idx, list(cfg.cameras), cfg.n_obs_steps, cfg.horizon, cfg.action_dim, cfg.frame_camera)
    ds = WindowDataset(EpisodeStore(store_path), horizon=cfg.horizon, n_obs_steps=cfg.n_obs_steps)
    idx = [ds.index_of(int(e), 0) for e in ds.episodes[:max_examples or 30]]
    return collate_windows(ds.__getitems__(idx))


def probe(policy: VLAPolicy, store_path: str, max_examples: int | None = None) -> dict[str, float]:
    model, processor = policy.model, policy.processor
    raw = first_frames(model, store_path, max_examples)
    idx = raw["task"]
    preds = []
    with torch.no_grad():
        for lo in range(0, len(idx), 100):
            part = {k: ({c: x[lo:lo + 100] for c, x in v.items()} if isinstance(v, dict) else v[lo:lo + 100])
                    for k, v in raw.items()}
            preds.append(model.predict_goal(processor.training_batch(part)))
        pred = processor.normalizer.unnormalize("state", torch.cat(preds)).numpy()
    true, hand = raw["goal_state"].numpy(), raw["state"].numpy()[:, -1]
    cm = lambda a, b: float(np.median(np.linalg.norm(a[:, :2] - b[:, :2], axis=1)) * 100)  # noqa: E731
    out = {"episodes": len(idx), "xy_error_cm": cm(pred, true), "mean_guess_cm": cm(true.mean(0, keepdims=True), true),
           "hand_to_goal_cm": cm(hand, true)}
    places = goal_places(true[:, :2])
    if len(places) <= min(8, len(idx) // 3):  # fixed places (layout=slots): did the prediction pick the named one?
        near = lambda x: np.linalg.norm(x[:, None, :2] - places[None], axis=-1).argmin(1)  # noqa: E731
        out["places"] = len(places)
        out["choice_accuracy"] = float((near(pred) == near(true)).mean())
    out["pred_xy"], out["true_xy"] = pred[:, :2], true[:, :2]
    return out


def confusion(path: str, pred_xy: np.ndarray) -> dict[str, float]:
    """Which object the predicted goal is nearest, per frame of a tabletop goal-frame store (see the module doc)."""
    from vla.envs import make_env
    from vla.envs.tabletop import tasks as T

    frames = GoalFrames(path)
    envs: dict[str, object] = {}
    counts = dict.fromkeys(("named", "same shape", "same colour", "neither"), 0)
    for i in range(len(pred_xy)):
        task = frames.tasks[i]
        if task not in envs:
            envs[task] = make_env(frames.env, task, cameras=(), **frames.env_options)
        _, info = envs[task].reset(seed=frames.seeds[i])
        p = T.decode_privileged(info["privileged"])
        target = p["objects"][p["plan"][0].a]
        present = [o for o in p["objects"] if o["present"]]
        o = present[int(np.argmin([np.linalg.norm(o["pos"][:2] - pred_xy[i]) for o in present]))]
        key = ("named" if np.allclose(o["pos"], target["pos"]) else "same shape" if o["shape"] == target["shape"]
               else "same colour" if o["color"] == target["color"] else "neither")
        counts[key] += 1
    for env in envs.values():
        env.close()
    return {k: v / max(len(pred_xy), 1) for k, v in counts.items()}


def goal_places(xy: np.ndarray, radius: float = 0.04) -> np.ndarray:
    """Cluster goal positions (N, 2) into places: a goal within ``radius`` m of a place's first goal joins it.
    With ``layout=slots`` the goals fall on a few fixed places (jitter <= 1.5 cm); with random layouts every goal
    is its own place."""
    places: list[np.ndarray] = []
    members: list[list[np.ndarray]] = []
    for p in xy:
        d = [np.linalg.norm(p - q) for q in places]
        if d and min(d) < radius:
            members[int(np.argmin(d))].append(p)
        else:
            places.append(p)
            members.append([p])
    return np.array([np.mean(m, 0) for m in members])  # (P, 2)


def main(argv: list[str]) -> int:
    max_examples, want_confusion = None, "--confusion" in argv
    argv = [a for a in argv if a != "--confusion"]
    if "--max" in argv:
        i = argv.index("--max")
        max_examples, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    policy = VLAPolicy.from_checkpoint(argv[0])
    for path in argv[1:]:
        r = probe(policy, path, max_examples)
        print(f"{path}: {r['episodes']} examples, t=0 goal xy error median {r['xy_error_cm']:.1f} cm "
              f"(mean guess {r['mean_guess_cm']:.1f} cm, hand to goal {r['hand_to_goal_cm']:.1f} cm)"
              + (f"; nearest of {r['places']} places right {r['choice_accuracy']:.0%} (chance {1 / r['places']:.0%})"
                 if "places" in r else ""))
        if want_confusion and is_goal_frames(path):
            c = confusion(path, r["pred_xy"])
            print("  nearest object to the predicted goal: " + ", ".join(f"{k} {v:.0%}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
