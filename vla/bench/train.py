"""`vla bench train [key=value ...]`: training samples/s and data-wait fraction, printed as JSON.

    vla bench train                                   # tiny,small on CPU (small,base on CUDA); batch 32; 1 camera
    vla bench train presets=[tiny] steps=20 cameras=2 workers=[0,1]
    vla bench train presets=[small,base] device=cuda  # the CUDA path: bf16 autocast (trainer.bf16=auto)
    vla bench train presets=[tiny] bf16=[false,true] rounds=3 store=data/pp96.zarr \
        "overrides=[text=minilm,model.vision=conv,model.patch_size=16]"   # fp32 vs bf16, interleaved

``bf16`` takes a list: each value is a variant, timed in turn within each of ``rounds`` rounds
(A, B, A, B, ...: a load change hits both), and ``ratios`` gives each variant's samples/s over the
first's, per round and as the median. ``store`` uses a real store instead of the synthetic one;
``overrides`` are extra `vla train` overrides (a recipe). ``compile=[false,true]`` times
``trainer.compile`` both ways. ``variants`` times recipe variants the same way, each item a set of
space-separated `vla train` overrides on top of ``overrides`` (``none``: nothing more), e.g.
``"variants=[none, model.plan_rows=8, model.plan_rows=8 model.flow_samples=2]"``. ``mfu`` (auto: on CUDA)
counts one training step's FLOPs (forward + backward, `step_flops`) and divides the achieved FLOP/s by the
matmul peak measured in the same run (bf16 8192^3 on CUDA): ``mfu``, ``achieved_tflops``, ``flops_per_sample``.

Builds a synthetic in-memory store (random images, smooth actions) in a temp dir, sets up the
real ``vla.training.Trainer`` (same data path, augmentation, optimizer, EMA as `vla train`) and times
``steps`` optimizer steps after ``warmup`` untimed ones. ``data_wait_frac`` is the share of wall
time spent waiting for the DataLoader.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vla.bench import parse_bench_args

DEFAULTS: dict[str, Any] = {
    "presets": [],  # default: tiny,small on CPU; small,base on CUDA
    "batch_size": 32,
    "steps": 10,
    "warmup": 2,
    "cameras": 1,
    "image_size": 64,
    "episodes": 8,
    "episode_len": 60,
    "workers": [0],
    "device": "auto",
    "bf16": ["auto"],
    "planner": "on",
    "rounds": 1,
    "store": None,
    "overrides": [],
    "compile": ["false"],
    "mfu": "auto",  # auto: on CUDA only (FLOPs of one training step vs the measured matmul peak)
    "variants": ["none"],  # recipe variants: each item `vla train` overrides (space-separated) or none
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    return parse_bench_args("train", argv, DEFAULTS, int_lists=("workers",))


def make_synthetic_store(path: Path, episodes: int, length: int, cameras: int, image_size: int,
                         action_dim: int = 4, state_dim: int = 4, seed: int = 0) -> Path:
    """A store of random-but-smooth episodes with subtask labels (benchmarks and tests)."""
    import numpy as np

    from vla.datasets import EpisodeWriter

    rng = np.random.default_rng(seed)
    cams = {f"cam{i}": (image_size, image_size) for i in range(cameras)}
    w = EpisodeWriter(path, env="synthetic", fps=10, cameras=cams, action_dim=action_dim, state_dim=state_dim)
    try:
        for e in range(episodes):
            t = np.linspace(0, 1, length, dtype=np.float32)[:, None]  # (T, 1)
            phase = rng.uniform(0, 2 * np.pi, size=(1, action_dim)).astype(np.float32)
            action = np.sin(2 * np.pi * t + phase).astype(np.float32)  # (T, A)
            state = np.cumsum(action[:, :state_dim], axis=0).astype(np.float32) / length  # (T, S)
            images = {c: rng.integers(0, 256, size=(length, image_size, image_size, 3), dtype=np.uint8) for c in cams}
            half = length // 2
            subtasks = ["reach the handle"] * half + ["pull the drawer"] * (length - half)
            w.add_episode(action=action, state=state, images=images, subtasks=subtasks,
                          instruction=f"open the drawer {e % 3}", task=f"task-{e % 2}", seed=e)
    finally:
        w.close()
    return path


def step_flops(trainer: Any, raw: dict[str, Any]) -> int:
    """FLOPs of one training step's forward + backward on ``raw`` (torch's FlopCounterMode: matmuls,
    convolutions, attention), counted on the unwrapped model; gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = trainer._prepare(raw, trainer.step)
    model = trainer.raw_model
    with FlopCounterMode(display=False) as counter:
        with trainer._autocast():
            loss = model.compute_loss(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def variant_overrides(variant: str) -> list[str]:
    """A ``variants`` item as `vla train` overrides: space-separated key=value, or ``none`` for none."""
    items = [] if variant.strip() in ("", "none") else variant.split()
    bad = [x for x in items if "=" not in x]
    if bad:
        raise ValueError(f"vla bench train: variants item {variant!r}: expected space-separated key=value "
                         f"overrides (or none), got {bad}")
    return items


def bench_one(store: Path, preset: str, args: dict[str, Any], workers: int, tmp: Path,
              bf16: str = "auto", compile_: str = "false", peak_gflops: float | None = None,
              variant: str = "none") -> dict[str, Any]:
    import torch

    from vla.config import compose
    from vla.training import Trainer
    from vla.training import distributed as dist_utils

    steps, warmup = int(args["steps"]), int(args["warmup"])
    cfg = compose("train", [
        f"model={preset}", f"planner={args['planner']}", f"dataset.path={store}",
        f"trainer.batch_size={args['batch_size']}", f"trainer.steps={steps + warmup}",
        f"trainer.num_workers={workers}", f"trainer.bf16={bf16}", "trainer.progress=false",
        f"trainer.compile={compile_}", f"device={args['device']}", f"run_dir={tmp / preset}", *args["overrides"],
        *variant_overrides(variant),
    ])
    info = dist_utils.init(str(cfg.device))
    trainer = Trainer(cfg, info)
    it = iter(trainer.loader())
    for _ in range(warmup):
        trainer.train_step(next(it))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    flops = step_flops(trainer, next(it)) if peak_gflops else None
    sync()
    wait = 0.0
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        raw = next(it)
        wait += time.perf_counter() - t1
        losses.append(trainer.train_step(raw)["loss"])
    sync()
    wall = time.perf_counter() - t0
    n_params = sum(p.numel() for p in trainer.raw_model.parameters())
    return {
        "preset": preset,
        "params": n_params,
        "num_workers": workers,
        "device": str(trainer.device),
        "bf16_setting": bf16,
        "bf16": trainer.bf16,
        "torch_threads": torch.get_num_threads(),
        "samples_per_s": args["batch_size"] * steps / wall,
        "step_ms": 1000 * wall / steps,
        "data_wait_frac": wait / wall,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "compile": compile_,
        "variant": variant,
        **({} if not flops else {
            "flops_per_step": flops, "flops_per_sample": flops / args["batch_size"],
            "achieved_tflops": flops * steps / wall / 1e12,
            "mfu": flops * steps / wall / 1e9 / peak_gflops, "peak_gflops": peak_gflops}),
    }


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ratios(results: list[dict[str, Any]], field: str = "bf16_setting", label: str = "bf16") -> dict[str, Any]:
    """samples/s of each value of ``field`` over the first value's, per round (every other setting equal)
    and the median."""
    import statistics

    others = ("round", "preset", "num_workers", "bf16_setting", "compile", "variant")
    settings = list(dict.fromkeys(r[field] for r in results))
    out: dict[str, Any] = {}
    for s in settings[1:]:
        per = []
        for r in results:
            if r[field] != settings[0]:
                continue
            match = [x for x in results if x[field] == s
                     and all(x.get(k) == r.get(k) for k in others if k != field)]
            if match:
                per.append(match[0]["samples_per_s"] / r["samples_per_s"])
        if per:
            out[f"{label}={s} / {label}={settings[0]}"] = {"per_round": per, "median": statistics.median(per)}
    return out


def main(argv: list[str]) -> int:
    import platform

    import torch

    args = parse_args(argv)
    for variant in args["variants"]:  # refused before any store is built
        variant_overrides(variant)
    if not args["presets"]:
        cuda = torch.cuda.is_available() and args["device"] in ("auto", "cuda")
        args["presets"] = ["small", "base"] if cuda else ["tiny", "small"]
    cuda = torch.cuda.is_available() and args["device"] in ("auto", "cuda")
    peak = None
    if args["mfu"] == "true" or (args["mfu"] == "auto" and cuda):
        from vla.bench.inference import matmul_peak

        dev = torch.device("cuda" if cuda else "cpu")
        bf16_peak = cuda or any(b == "true" for b in args["bf16"])
        peak = max(matmul_peak([8192] if cuda else [1024], dev, torch.bfloat16 if bf16_peak else torch.float32)
                   .values())
    results = []
    with tempfile.TemporaryDirectory(prefix="vla_bench_train_") as d:
        tmp = Path(d)
        if args["store"]:
            store = Path(args["store"])
            if not store.exists():
                raise FileNotFoundError(f"vla bench train: store={store} does not exist")
            store_info: dict[str, Any] = {"synthetic": False, "path": str(store)}
        else:
            store = make_synthetic_store(tmp / "store.zarr", int(args["episodes"]), int(args["episode_len"]),
                                         int(args["cameras"]), int(args["image_size"]))
            store_info = {"synthetic": True, "cameras": int(args["cameras"]), "image_size": int(args["image_size"]),
                          "episodes": int(args["episodes"]), "episode_len": int(args["episode_len"]),
                          "in_memory": True}
        for r in range(int(args["rounds"])):
            for preset in args["presets"]:
                for workers in args["workers"]:
                    for bf16 in args["bf16"]:
                        for comp in args["compile"]:
                            for variant in args["variants"]:
                                print(f"bench train: round {r} {preset} workers={workers} bf16={bf16} "
                                      f"compile={comp} variant={variant} ...", file=sys.stderr)
                                res = bench_one(store, preset, args, int(workers), tmp, bf16, comp, peak, variant)
                                res.update(round=r, loadavg_1m=_loadavg())
                                results.append(res)
    out = {
        "benchmark": "train",
        "store": store_info,
        "overrides": list(args["overrides"]),
        "ratios": {**ratios(results), **ratios(results, "compile", "compile"), **ratios(results, "variant", "variant")},
        "matmul_peak_gflops": peak,
        "batch_size": int(args["batch_size"]),
        "timed_steps": int(args["steps"]),
        "warmup_steps": int(args["warmup"]),
        "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else None},
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return 0
