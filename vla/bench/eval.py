"""`vla bench eval [key=value ...]`: closed-loop evaluation throughput (env steps/s), as JSON.

    vla bench eval                                      # expert + tiny VLA, n_envs 1 and 2
    vla bench eval policies=[vla] n_envs=[4] episodes=8 checkpoint=outputs/.../run

Runs ``vla.evaluation.run_evaluation`` exactly as ``vla eval`` does (batched policy inference,
async spawn workers for ``n_envs > 1``, terminate on success, no videos) and reports env steps/s
over the whole call (``env_steps_per_s``, including env start-up) and over the rollout loop only
(``rollout_env_steps_per_s``). ``vla``: the checkpoint when given, else a random-weight model of
the ``tiny`` preset at the env's image size. A random model never succeeds, so its episodes run to
``max_steps`` and decode plans up to the length cap: a pessimistic but stable load. With
``replan_every`` the plan is re-decoded only every N steps (the default re-decodes every chunk).
"""

from __future__ import annotations

import json
import time
from typing import Any

from vla.bench import parse_bench_args

DEFAULTS: dict[str, Any] = {
    "policies": ["expert", "vla"],
    "env": "metaworld",
    "task": "drawer-open-v3",
    "episodes": 4,
    "n_envs": [1, 2],
    "cameras": ["corner"],
    "image_size": 64,
    "max_steps": 100,
    "n_action_steps": 8,
    "replan_every": 0,  # 0 = every chunk
    "checkpoint": "",
    "seed_start": 2_000_000,
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    args = parse_bench_args("eval", argv, DEFAULTS, int_lists=("n_envs",))
    bad = [p for p in args["policies"] if p not in ("expert", "vla")]
    if bad:
        raise ValueError(f"vla bench eval: policies must be expert and/or vla, got {bad}")
    return args


def _tiny_vla(args: dict[str, Any]) -> Any:
    import numpy as np

    from vla.config import compose
    from vla.model import VLA, VLAConfig
    from vla.normalize import Normalizer
    from vla.policies import VLAPolicy
    from vla.processor import Processor

    model_cfg = dict(compose("train", ["dataset.path=unused"]).model)
    cfg = VLAConfig.from_dict(model_cfg, cameras=list(args["cameras"]), image_size=int(args["image_size"]),
                              state_dim=4, action_dim=4)
    unit = {"mean": np.zeros(4), "std": np.ones(4), "min": -np.ones(4), "max": np.ones(4),
            "q01": -np.ones(4), "q99": np.ones(4)}
    proc = Processor(cfg, Normalizer({"action": unit, "state": unit}))
    return VLAPolicy(VLA(cfg), proc, n_action_steps=args["n_action_steps"],
                     replan_every=args["replan_every"] or None, seed=0)


def main(argv: list[str]) -> int:
    import os

    from vla.evaluation import run_evaluation
    from vla.policies import ExpertPolicy, VLAPolicy

    args = parse_args(argv)
    report: dict[str, Any] = {"benchmark": "eval", "env": args["env"], "task": args["task"],
                              "episodes": args["episodes"], "cameras": args["cameras"],
                              "image_size": args["image_size"], "max_steps": args["max_steps"],
                              "cpu_count": os.cpu_count(), "results": []}
    for name in args["policies"]:
        if name == "expert":
            policy = ExpertPolicy(args["env"])
            env_kwargs = {"cameras": tuple(args["cameras"]), "image_size": int(args["image_size"])}
        elif args["checkpoint"]:
            policy = VLAPolicy.from_checkpoint(args["checkpoint"], n_action_steps=args["n_action_steps"],
                                               replan_every=args["replan_every"] or None)
            env_kwargs = policy.env_kwargs()
        else:
            policy = _tiny_vla(args)
            env_kwargs = policy.env_kwargs()
        for n_envs in args["n_envs"]:
            t0 = time.perf_counter()
            r = run_evaluation(policy, args["env"], [args["task"]], int(args["episodes"]), n_envs=int(n_envs),
                               seed_start=args["seed_start"], max_steps=args["max_steps"], env_kwargs=env_kwargs,
                               progress=False)
            tp = r["throughput"]
            entry = {"policy": name, "n_envs": int(n_envs), "env_steps": tp["env_steps"],
                     "wall_s": round(time.perf_counter() - t0, 2),
                     "env_steps_per_s": round(tp["env_steps_per_s"], 1),
                     "rollout_env_steps_per_s": round(tp["rollout_env_steps_per_s"], 1),
                     "success_rate": r["overall"]["success_rate"], "torch_threads": tp["torch_threads"]}
            if isinstance(policy, VLAPolicy):
                entry["params"] = sum(p.numel() for p in policy.model.parameters())
                entry["replan_every"] = policy.replan_every
            report["results"].append(entry)
    print(json.dumps(report))
    return 0
