"""`vla bench eval [key=value ...]`: closed-loop evaluation throughput (env steps/s), as JSON.

    vla bench eval                                      # expert + tiny VLA, n_envs 1 and 2
    vla bench eval policies=[vla] n_envs=[4] episodes=8 checkpoint=outputs/.../run

Runs ``vla.evaluation.run_evaluation`` exactly as ``vla eval`` does (batched policy inference,
async spawn workers for ``n_envs > 1``, terminate on success, no videos) and reports env steps/s
over the whole call (``env_steps_per_s``, including env start-up) and over the rollout loop only
(``rollout_env_steps_per_s``). ``vla``: the checkpoint when given, else a random-weight model of
the ``tiny`` preset at the env's image size. A random model never succeeds, so its episodes run to
``max_steps`` and decode plans up to the length cap: a pessimistic but stable load. With
``replan_every`` the plan is re-decoded only every N steps (the default re-decodes every chunk;
between re-plans the policy feeds the last decoded plan back in, see `VLAPolicy`).

``policy_ms_per_env_step`` is the time spent inside the policy's ``act_batch`` per env step (model
calls, pre- and post-processing; comparable to other policies' per-step cost), and
``env_ms_per_step`` the rest of the rollout loop per step (env step, rendering, bookkeeping).
``torch_threads`` (0 = `run_evaluation`'s default) sets the policy's intra-op threads.
``lazy_images=[true,false]`` runs each policy both ways, alternating ``rounds`` times, and adds
``vs_full_render``: env steps/s rendering only the observations the policy reads (once per chunk) over
rendering every step, with the policy's and the rest's ms per step of each (same episodes either way).
``load_avg_1min`` (``/proc/loadavg``) is recorded at the start, after every run and at the end.
``baseline=REF`` (a git ref such as ``main``, or a path to a ``model.py``; see `vla bench inference`)
also evaluates the same VLA weights under that revision's model code, alternating new and baseline
``rounds`` times, and adds ``vs_baseline``: env steps/s and policy time per step of each, and the ratios
(over the rounds after the first, which warms up: env start-up, GL context, first model calls).
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
    "torch_threads": 0,
    "baseline": None,  # a git ref or model.py path: also run the VLA under that model.py (vla bench inference)
    "rounds": 3,  # with a baseline or two lazy_images values: alternate this many times per n_envs
    "lazy_images": [True],  # [true, false]: time rendering only what is read against rendering every step
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    args = parse_bench_args("eval", argv, DEFAULTS, int_lists=("n_envs",))
    bad = [p for p in args["policies"] if p not in ("expert", "vla")]
    if bad:
        raise ValueError(f"vla bench eval: policies must be expert and/or vla, got {bad}")
    words = {"true": True, "1": True, "false": False, "0": False}
    lazies = [x if isinstance(x, bool) else words.get(str(x).strip().lower()) for x in args["lazy_images"]]
    if not lazies or None in lazies:
        raise ValueError(f"vla bench eval: lazy_images must be a list of true/false, got {args['lazy_images']}")
    args["lazy_images"] = lazies
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


def _rates(runs: list[dict[str, Any]], with_env: bool = False) -> dict[str, float]:
    """Env steps/s and policy ms per env step over ``runs`` pooled (and the rest's ms per step)."""
    n, sec, ps = (sum(r[k] for r in runs) for k in ("env_steps", "rollout_s", "policy_s"))
    out = {"rollout_env_steps_per_s": round(n / sec, 1), "policy_ms_per_env_step": round(ps / n * 1e3, 3)}
    if with_env:
        out["env_ms_per_step"] = round((sec - ps) / n * 1e3, 3)
    return out


class _Timed:
    """Wraps a policy; sums the seconds spent in ``act_batch`` (every other attribute passes through)."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.seconds = policy, 0.0

    def act_batch(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.policy.act_batch(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("policy", "seconds"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.policy, name, value)


def main(argv: list[str]) -> int:
    import os

    from vla.bench.inference import load_avg
    from vla.evaluation import run_evaluation
    from vla.policies import ExpertPolicy, VLAPolicy

    args = parse_args(argv)
    report: dict[str, Any] = {"benchmark": "eval", "env": args["env"], "task": args["task"],
                              "episodes": args["episodes"], "cameras": args["cameras"],
                              "image_size": args["image_size"], "max_steps": args["max_steps"],
                              "cpu_count": os.cpu_count(), "load_avg_1min_at_start": load_avg(),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": []}
    def one_run(name: str, policy: Any, env_kwargs: dict, n_envs: int, variant: str | None,
                lazy: bool = True) -> dict[str, Any]:
        t0 = time.perf_counter()
        timed = _Timed(policy)
        r = run_evaluation(timed, args["env"], [args["task"]], int(args["episodes"]), n_envs=n_envs,
                           seed_start=args["seed_start"], max_steps=args["max_steps"], env_kwargs=env_kwargs,
                           progress=False, torch_threads=int(args["torch_threads"]) or None, lazy_images=lazy)
        tp = r["throughput"]
        steps = max(1, tp["env_steps"])
        entry = {"policy": name, "n_envs": n_envs, "env_steps": tp["env_steps"],
                 "wall_s": round(time.perf_counter() - t0, 2),
                 "env_steps_per_s": round(tp["env_steps_per_s"], 1),
                 "rollout_env_steps_per_s": round(tp["rollout_env_steps_per_s"], 1),
                 "rollout_s": round(tp["rollout_s"], 3), "policy_s": round(timed.seconds, 3),
                 "policy_ms_per_env_step": round(timed.seconds / steps * 1e3, 3),
                 "env_ms_per_step": round((tp["rollout_s"] - timed.seconds) / steps * 1e3, 3),
                 "success_rate": r["overall"]["success_rate"], "torch_threads": tp["torch_threads"],
                 "load_avg_1min": load_avg()}
        if variant is not None:
            entry["variant"] = variant
        entry["lazy_images"] = bool(lazy)
        if isinstance(policy, VLAPolicy):
            entry["params"] = sum(p.numel() for p in policy.model.parameters())
            entry["replan_every"] = policy.replan_every
        return entry

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
        variants = {None: policy}
        if args["baseline"] and isinstance(policy, VLAPolicy):  # the same weights under the baseline's model.py
            from vla.bench.inference import load_baseline_model

            base_cls, desc = load_baseline_model(args["baseline"])
            base = base_cls(policy.model.cfg).eval()
            base.load_state_dict(policy.model.state_dict())
            report["baseline"] = desc
            base_policy = VLAPolicy(base, policy.processor, n_action_steps=policy.n_action_steps,
                                    replan_every=policy.replan_every, seed=0)
            variants = {"new": policy, "baseline": base_policy}
        lazies = [bool(x) for x in args["lazy_images"]]
        if len(lazies) > 1:  # rendering what is read vs every step, alternating, same policy and seeds
            for n_envs in args["n_envs"]:
                runs = []
                for _ in range(int(args["rounds"])):
                    runs += [one_run(name, policy, env_kwargs, int(n_envs), None, lazy) for lazy in lazies]
                report["results"] += runs
                counted = runs[len(lazies):] if len(runs) > len(lazies) else runs  # round 1 warms up
                summary: dict[str, Any] = {"lazy" if lazy else "full_render": _rates(
                    [r for r in counted if r["lazy_images"] == lazy], with_env=True) for lazy in lazies}
                summary["speedup_env_steps_per_s"] = round(summary["lazy"]["rollout_env_steps_per_s"]
                                                           / summary["full_render"]["rollout_env_steps_per_s"], 3)
                report.setdefault("vs_full_render", []).append({"policy": name, "n_envs": int(n_envs), **summary})
            continue
        for n_envs in args["n_envs"]:
            runs = []
            for _ in range(int(args["rounds"]) if len(variants) > 1 else 1):  # alternate: new, baseline, new, ...
                runs += [one_run(name, p, env_kwargs, int(n_envs), v) for v, p in variants.items()]
            report["results"] += runs
            if len(variants) > 1:
                counted = runs[len(variants):] if len(runs) > len(variants) else runs  # round 1 warms up
                summary = {v: _rates([r for r in counted if r["variant"] == v]) for v in variants}
                summary["speedup_env_steps_per_s"] = round(summary["new"]["rollout_env_steps_per_s"]
                                                           / summary["baseline"]["rollout_env_steps_per_s"], 3)
                summary["speedup_policy_per_step"] = round(summary["baseline"]["policy_ms_per_env_step"]
                                                           / summary["new"]["policy_ms_per_env_step"], 3)
                report.setdefault("vs_baseline", []).append({"policy": name, "n_envs": int(n_envs), **summary})
    report["load_avg_1min_at_end"] = load_avg()
    print(json.dumps(report))
    return 0
