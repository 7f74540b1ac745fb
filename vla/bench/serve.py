"""`vla bench serve [key=value ...]`: `vla serve` throughput and per-request latency under concurrent
clients, serial server (``batching=false``) and dynamic batching side by side in one run, as JSON.

    vla bench serve                                      # tiny preset, random weights, 16 clients, CPU
    vla bench serve clients=16 requests=20 preset=small device=cuda
    vla bench serve checkpoint=outputs/.../run          # a trained checkpoint instead of a preset

Each mode starts a :class:`vla.serving.PolicyServer` on 127.0.0.1 with the same policy and runs
``clients`` websocket clients (threads of this process, one connection each) that each send
``warmup`` untimed then ``requests`` timed requests back to back (64 px images by default, one
camera, state 4). Reported per mode: requests/s over the timed phase, latency p50/p99 (ms, client
side: send to reply), and the mean model batch size the server reported; ``speedup`` is batched
requests/s over serial requests/s. ``model_calls=true`` (default) first times the policy's batched
``predict_chunks`` itself, without a server, at batch 1 and at ``max_batch`` (median of 5 after 2 warm-up
calls, fresh plans, the same random observations): ``batching_ceiling`` is how many times faster per request
the full batch is, the most any batching server can gain over a serial one on this machine.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from vla.bench import parse_bench_args

DEFAULTS: dict[str, Any] = {
    "preset": "tiny",
    "checkpoint": None,
    "device": "cpu",
    "clients": 16,
    "requests": 10,
    "warmup": 2,
    "image_size": 64,
    "num_flow_steps": 10,
    "max_batch": 16,
    "batch_wait_ms": 10,
    "modes": ["serial", "batched"],
    "threads": 0,
    "model_calls": True,
}


def build_policy(args: dict[str, Any]) -> Any:
    """A VLAPolicy from ``checkpoint``, or from the ``preset`` with random weights (one camera, state/action 4)."""
    import torch
    from omegaconf import OmegaConf

    from vla.policies import VLAPolicy

    if args["checkpoint"]:
        return VLAPolicy.from_checkpoint(args["checkpoint"], device=args["device"],
                                         num_flow_steps=int(args["num_flow_steps"]))
    from vla.config import compose
    from vla.model import VLA, VLAConfig
    from vla.normalize import Normalizer
    from vla.processor import Processor

    mcfg = OmegaConf.to_container(compose("train", [f"model={args['preset']}", "dataset.path=unused"]).model)
    mcfg = {k: v for k, v in mcfg.items() if k not in ("preset", "name")}
    cfg = VLAConfig.from_dict(mcfg, cameras=["cam0"], image_size=int(args["image_size"]), state_dim=4, action_dim=4)
    stats = {"mean": np.zeros(4), "std": np.ones(4), "min": -np.ones(4), "max": np.ones(4),
             "q01": -np.ones(4), "q99": np.ones(4)}
    torch.manual_seed(0)
    model = VLA(cfg).to(args["device"]).eval()
    proc = Processor(cfg, Normalizer({"action": stats, "state": stats}))
    return VLAPolicy(model, proc, num_flow_steps=int(args["num_flow_steps"]), device=args["device"])


def random_requests(meta: dict, n: int) -> list[dict]:
    """``n`` requests with random images and states for the served cameras (the clients' and model_calls' inputs)."""
    cams = {c: tuple(hw) for c, hw in meta["cameras"].items()}
    rng = np.random.default_rng(0)
    return [{"observation": {"images": {c: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for c, hw in cams.items()},
                             "state": rng.uniform(-1, 1, int(meta["state_dim"])).astype(np.float32)},
             "instruction": "open the top drawer"} for _ in range(n)]


def time_model_calls(policy: Any, meta: dict, batch: int, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Median ms of one ``predict_chunks`` call at batch 1 and at ``batch`` (plans decoded); their per-request ratio."""
    reqs = random_requests(meta, batch)
    out: dict[str, Any] = {}
    for n in sorted({1, batch}):
        obs, instr = [r["observation"] for r in reqs[:n]], [r["instruction"] for r in reqs[:n]]
        times = []
        for k in range(warmup + repeats):
            t = time.perf_counter()
            policy.predict_chunks(obs, instr, env_indices=list(range(n)), decode_plan=True)
            if k >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
        out[f"batch_{n}_ms"] = round(float(np.median(times)), 2)
    out["batching_ceiling"] = round(batch * out["batch_1_ms"] / out[f"batch_{batch}_ms"], 2)
    for i in range(batch):
        policy.reset(i)
    return out


def run_clients(port: int, meta: dict, args: dict[str, Any]) -> dict[str, Any]:
    """``clients`` threads sending requests back to back; latencies and throughput of the timed phase."""
    from vla.serving import PolicyClient

    n, reqs, warm = int(args["clients"]), int(args["requests"]), int(args["warmup"])
    requests = random_requests(meta, n)
    clients = [PolicyClient("127.0.0.1", port, timeout=600) for _ in range(n)]
    latencies: list[list[float]] = [[] for _ in range(n)]
    batch_sizes: list[list[int]] = [[] for _ in range(n)]
    warm_done = threading.Barrier(n + 1)
    go = threading.Barrier(n + 1)
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            for _ in range(warm):
                clients[k].infer(requests[k])
        except Exception as e:  # reported, and the barrier still releases
            errors.append(f"client {k}: {type(e).__name__}: {e}")
        warm_done.wait()
        go.wait()
        try:
            for _ in range(reqs):
                t = time.perf_counter()
                reply = clients[k].infer(requests[k])
                latencies[k].append((time.perf_counter() - t) * 1e3)
                batch_sizes[k].append(int(reply["timing"].get("batch_size", 1)))
        except Exception as e:
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    warm_done.wait()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError("vla bench serve: " + "; ".join(errors[:3]))
    lat = np.concatenate([np.asarray(x) for x in latencies])
    return {
        "requests": int(lat.size),
        "wall_s": round(wall, 3),
        "requests_per_s": round(lat.size / wall, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "mean_batch_size": round(float(np.mean(np.concatenate(batch_sizes))), 2),
    }


def main(argv: list[str]) -> int:
    import os

    import torch

    import vla
    from vla.serving import PolicyServer

    args = parse_bench_args("serve", argv, DEFAULTS, str_lists=("modes",))
    bad = [m for m in args["modes"] if m not in ("serial", "batched")]
    if bad or not args["modes"]:
        raise ValueError(f"vla bench serve: modes must be a list of serial, batched; got {args['modes']}")
    if int(args["clients"]) < 1 or int(args["requests"]) < 1:
        raise ValueError(f"vla bench serve: clients and requests must be >= 1, got {args['clients']}, "
                         f"{args['requests']}")
    if int(args["threads"]) > 0:
        torch.set_num_threads(int(args["threads"]))
    policy = build_policy(args)
    report: dict[str, Any] = {
        "bench": "serve", "vla_version": vla.__version__, "args": args, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "modes": {},
    }
    if args["model_calls"]:
        report["model_calls"] = time_model_calls(policy, dict(policy.metadata()), int(args["max_batch"]))
    for mode in args["modes"]:
        server = PolicyServer(policy, port=0, batching=mode == "batched", max_batch=int(args["max_batch"]),
                              batch_wait_ms=float(args["batch_wait_ms"]))
        with server:
            report["modes"][mode] = run_clients(server.port, server.metadata, args)
    if {"serial", "batched"} <= set(report["modes"]):
        m = report["modes"]
        report["speedup"] = round(m["batched"]["requests_per_s"] / m["serial"]["requests_per_s"], 2)
    print(json.dumps(report, indent=2))
    return 0
