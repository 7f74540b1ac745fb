"""Why does a tabletop pick fail? Where the hand closes, against the named object, and the goal head's error.

    python scripts/grasp_probe.py CHECKPOINT [--episodes N] [--seed-start S] [--task T] [--split SPLIT] [--oracle-goal]

Runs ``N`` closed-loop episodes (default 30, seeds from ``S``, default 9,000,000: apart from the main job's
demonstration, evaluation and tuning seeds) of a tabletop family (default pick-place) whose plan starts with a pick,
and prints one JSON row per episode: success, steps, subtasks done, gripper closings and, for every pick of the plan
the policy reached (``picks``), the goal head's xy error at the pick's first frame (cm, against the object that pick
names; checkpoints with ``model.goal_condition``), the hand's offset from that object (x, y, z, cm) when the policy
first closes the gripper in the pick, and whether the pick was done. The row's own ``goal_err_cm`` and
``close_offset_cm`` are the first pick's. Then, per pick, the medians over the picks done and those not done.
``--oracle-goal`` hands the action expert the true x, y of the object being picked instead of the goal head's
during every pick: how much would a perfect goal head give, and what is left for the actions?
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np


def summarize(rows: list[dict[str, Any]], pick: int | None = None) -> dict[str, dict[str, float]]:
    """Medians over the successes and over the failures: goal error (cm) and hand xy offset at the first close (cm).
    ``pick=None``: episodes split by success, the first pick's values. ``pick=k``: the plan's k-th pick (0-based) in
    the episodes that reached it, split by whether the pick was done."""
    if pick is not None:
        rows = [r["picks"][pick] for r in rows if len(r.get("picks", ())) > pick]
    out = {}
    wins, losses = [r for r in rows if r["success"]], [r for r in rows if not r["success"]]
    for name, part in (("success", wins), ("failure", losses)):
        if not part:
            continue
        goal = [r["goal_err_cm"] for r in part if r.get("goal_err_cm") is not None]
        hand = [float(np.hypot(*r["close_offset_cm"][:2])) for r in part if r.get("close_offset_cm") is not None]
        out[name] = {"episodes": len(part), "goal_err_cm": float(np.median(goal)) if goal else float("nan"),
                     "close_xy_offset_cm": float(np.median(hand)) if hand else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    import torch
    from vla.envs import make_env
    from vla.envs.tabletop import tasks as T
    from vla.policies.vla_policy import VLAPolicy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--episodes", type=int, default=30)
    ap.add_argument("--seed-start", type=int, default=9_000_000)
    ap.add_argument("--task", default="pick-place")
    ap.add_argument("--split", default="paraphrase", help="instruction split (train | paraphrase | eval)")
    ap.add_argument("--oracle-goal", action="store_true")
    args = ap.parse_args(argv)
    policy = VLAPolicy.from_checkpoint(args.checkpoint)
    model, normalizer = policy.model, policy.processor.normalizer
    if args.oracle_goal and not model.cfg.goal_condition:
        raise SystemExit(f"--oracle-goal needs a checkpoint trained with model.goal_condition=true ({args.checkpoint})")
    goals: list[np.ndarray] = []  # the goal head's prediction (raw state units) of each model call
    oracle: dict[str, Any] = {"xy": None}
    sample, goal_from_prefix = model.sample, model.goal_from_prefix

    def recording_sample(*a: Any, **k: Any) -> dict:
        out = sample(*a, **k)
        if out.get("goal") is not None:
            goals.append(normalizer.unnormalize("state", out["goal"].float()).numpy()[0])
        return out

    def oracle_goal(prefix_out: torch.Tensor) -> torch.Tensor:
        goal = goal_from_prefix(prefix_out)
        if oracle["xy"] is None:
            return goal
        raw = normalizer.unnormalize("state", goal.float())
        raw[:, :2] = torch.as_tensor(oracle["xy"], dtype=raw.dtype)
        return normalizer.normalize("state", raw).to(goal.dtype)

    model.sample = recording_sample
    if args.oracle_goal:
        model.goal_from_prefix = oracle_goal
    env = make_env("tabletop", args.task, **policy.env_kwargs(), instruction_split=args.split)
    rows = []
    try:
        for e in range(args.episodes):
            goals.clear()
            policy.reset()
            obs, info = env.reset(seed=args.seed_start + e)
            plan = T.decode_privileged(info["privileged"])["plan"]
            if plan[0].op != T.PICK:
                raise SystemExit(f"{args.task}: its plans do not start with a pick; choose a pick family")
            picks: dict[int, dict[str, Any]] = {}  # plan index of a pick -> what the probe saw in it
            closes, prev, done, steps = 0, -1.0, False, 0
            while not done:
                now = T.decode_privileged(info["privileged"])
                k = int(info["subtasks_done"])
                picking = k < len(plan) and plan[k].op == T.PICK
                target = now["objects"][plan[k].a]["pos"] if picking else None
                oracle["xy"] = target[:2] if picking else None
                n_goals = len(goals)
                action = policy.act(obs, info["instruction"])
                if picking:
                    seen = picks.setdefault(k, {"goal_err_cm": None, "close_offset_cm": None})
                    if seen["goal_err_cm"] is None and len(goals) > n_goals:
                        seen["goal_err_cm"] = round(float(np.hypot(*(goals[-1][:2] - target[:2]))) * 100, 2)
                if action[3] > 0 >= prev:
                    closes += 1
                    if picking and picks[k]["close_offset_cm"] is None:
                        picks[k]["close_offset_cm"] = [round(float(v) * 100, 1) for v in now["hand"] - target]
                prev = float(action[3])
                obs, _, term, trunc, info = env.step(action)
                steps += 1
                done = term or trunc or bool(info.get("success"))
            for k, seen in picks.items():
                seen["success"] = int(info["subtasks_done"]) > k
            first = picks[0]
            row = {"seed": args.seed_start + e, "success": bool(info.get("success")), "steps": steps,
                   "subtasks": int(info["subtasks_done"]), "closes": closes, "goal_err_cm": first["goal_err_cm"],
                   "close_offset_cm": first["close_offset_cm"], "picks": [picks[k] for k in sorted(picks)]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        env.close()
    for name, s in summarize(rows).items():
        print(f"{name}: {s['episodes']} episodes, goal error at the first frame {s['goal_err_cm']:.1f} cm (median), "
              f"hand xy offset from the named object at the first close {s['close_xy_offset_cm']:.1f} cm")
    for k in range(max(len(r["picks"]) for r in rows) if rows else 0):
        for name, s in summarize(rows, pick=k).items():
            state = "done" if name == "success" else "not done"
            print(f"pick {k + 1} {state}: {s['episodes']} episodes, goal error at its first frame "
                  f"{s['goal_err_cm']:.1f} cm, hand xy offset at its first close "
                  f"{s['close_xy_offset_cm']:.1f} cm (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
