"""Where does a policy think the named object is? The goal head's readout at each episode's first frame.

    python scripts/goal_probe.py CHECKPOINT STORE [STORE ...]

For a checkpoint trained with ``model.goal_loss_weight`` > 0: the goal head predicts the state at the
demonstration's next gripper switch (at t = 0: where the hand will close on the named object). Prints,
per store, the median xy error of that prediction (cm, the first two state entries are the hand's x, y
in metres on the tabletop env), beside guessing the store's mean goal and the hand-to-goal distance.
Run it on the training store and on a store of unseen layouts (`vla collect ... seed_start=900000`):
a model that grounds the instruction is better than the mean guess on both. On a store whose goals fall on a
few fixed places (``layout=slots``) it also prints how often the prediction is nearest the right place.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from vla.datasets import EpisodeStore, WindowDataset, collate_windows
from vla.policies.vla_policy import VLAPolicy


def probe(policy: VLAPolicy, store_path: str, max_episodes: int = 30) -> dict[str, float]:
    model, processor = policy.model, policy.processor
    store = EpisodeStore(store_path)
    ds = WindowDataset(store, horizon=model.cfg.horizon)
    idx = [ds.index_of(int(e), 0) for e in ds.episodes[:max_episodes]]
    raw = collate_windows(ds.__getitems__(idx))
    with torch.no_grad():
        pred = processor.normalizer.unnormalize("state", model.predict_goal(processor.training_batch(raw))).numpy()
    true, hand = raw["goal_state"].numpy(), raw["state"].numpy()[:, -1]
    cm = lambda a, b: float(np.median(np.linalg.norm(a[:, :2] - b[:, :2], axis=1)) * 100)  # noqa: E731
    out = {"episodes": len(idx), "xy_error_cm": cm(pred, true), "mean_guess_cm": cm(true.mean(0, keepdims=True), true),
           "hand_to_goal_cm": cm(hand, true)}
    places = goal_places(true[:, :2])
    if len(places) <= len(idx) // 3:  # fixed places (layout=slots): did the prediction pick the named one?
        near = lambda x: np.linalg.norm(x[:, None, :2] - places[None], axis=-1).argmin(1)  # noqa: E731
        out["places"] = len(places)
        out["choice_accuracy"] = float((near(pred) == near(true)).mean())
    return out


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
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    policy = VLAPolicy.from_checkpoint(argv[0])
    for path in argv[1:]:
        r = probe(policy, path)
        print(f"{path}: {r['episodes']} episodes, t=0 goal xy error median {r['xy_error_cm']:.1f} cm "
              f"(mean guess {r['mean_guess_cm']:.1f} cm, hand to goal {r['hand_to_goal_cm']:.1f} cm)"
              + (f"; nearest of {r['places']} places right {r['choice_accuracy']:.0%} (chance {1 / r['places']:.0%})"
                 if "places" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
