"""`vla bench inference [key=value ...]`: action-chunk latency, FLOPs and fraction of matmul peak, as JSON.

    vla bench inference                                  # presets tiny,small on the CPU, batch 1, fp32
    vla bench inference presets=[tiny] repeats=5 cameras=2
    vla bench inference presets=[small,base] device=cuda dtype=bf16
    vla bench inference presets=[tiny] plan_vocabs=[bytes,words]   # + plan decode: byte vs word plans
    vla bench inference presets=[tiny] baseline=main threads=1     # + the same chunks with main's model.py
    vla bench inference presets=[tiny,small,base] device=cuda dtype=bf16 batch=[1,32] cameras=[1,2] \
        image_size=128 repeats=50 graphs=true kernels=true           # the GPU latency table (BENCHMARKS.md)

For each preset (random weights; one or more ``image_size`` cameras, state 4, action 4) it times
`VLA.sample` at batch ``batch``:

* ``cached``: the prefix is encoded once into a KV cache, the plan decoded greedily against it, and
  each of the 10 Euler steps runs only the action block; ``uncached`` recomputes the whole sequence
  for every plan token and every flow step (reported for the action phase, with a given plan).
* ``plan_s`` (greedy decoding; random weights rarely emit <eos>, so this decodes up to the cap:
  ``plan_tokens`` says how many) is reported apart from ``actions_s`` (state token + Euler steps)
  and ``prefix_s``.
* ``flops_per_chunk`` is counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
  attention) for the cached chunk with a given plan of ``plan_len`` tokens; ``achieved_frac_of_peak``
  divides the achieved FLOP/s by the matmul peak measured in the same run (square fp32 matmuls,
  or bf16 when ``dtype=bf16``).
* ``plan_vocabs=[bytes,words]`` adds ``plan_decode_by_vocab``: per plan vocabulary, the greedy decode
  of the 4-step plan ``PLAN_4`` (the model is capped at exactly that plan's token count, since random
  weights never stop early), so "before" (bytes) and "after" (words) decode the same plan in one run;
  with ``words`` also ``minilm_encode_s``, the once-per-episode cost of the pretrained text encoder.
* ``baseline=REF`` (a git ref such as ``main``, or a path to a ``model.py``) adds ``vs_baseline``:
  that revision's ``vla/model.py`` is loaded beside the current one (the rest of the package is the
  current one), given the same weights, and both time the same chunks alternately (new, baseline,
  new, baseline, ...; ``baseline_repeats`` each) so load changes hit both alike: cached chunk with
  the given plan, and with the plan decoded; the speed-ups, both FLOP fractions and the largest
  action difference between the two (same noise).
* ``batch`` and ``cameras`` take lists: every combination is a row (key "PRESET batch=B cameras=C").
* ``graphs=true`` adds the cached chunk (given plan, and plan decoded) with the Euler loop replayed
  from CUDA graphs (`VLA.use_cuda_graphs`), its speed-up and its relative action difference from
  the plain path (on the CPU: the graphs' static-buffer path without capture).
* ``kernels=true`` counts the CUDA kernels of one cached chunk (torch.profiler), with and without graphs.
* On CUDA, chunk totals are timed with CUDA events; the phase split comes from separate calls
  (it synchronizes between phases).
* ``load_avg_1min`` (``/proc/loadavg``) is recorded at the start and at the end.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from vla.bench import parse_bench_args

DEFAULTS: dict[str, Any] = {
    "presets": ["tiny", "small"],
    "device": "cpu",
    "dtype": "fp32",
    "batch": [1],
    "cameras": [1],
    "image_size": 64,
    "repeats": 5,
    "plan_len": 24,
    "peak_sizes": [1024, 2048],
    "threads": 0,
    "plan_vocabs": [],
    "baseline": None,
    "baseline_repeats": 15,
    "graphs": False,
    "kernels": False,
}
PLAN_4 = "open the drawer; pick up the red cube; put it in the drawer; close the drawer"
INSTRUCTION = "put the red cube in the drawer and close it"


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    args = parse_bench_args("inference", argv, DEFAULTS, int_lists=("peak_sizes", "batch", "cameras"))
    if not args["batch"] or not args["cameras"] or min(args["batch"] + args["cameras"]) < 1:
        raise ValueError(f"vla bench inference: batch and cameras take positive ints (a list is a grid), "
                         f"got batch={args['batch']} cameras={args['cameras']}")
    if int(args["baseline_repeats"]) < 1:
        raise ValueError("vla bench inference: baseline_repeats must be >= 1")
    bad = [v for v in args["plan_vocabs"] if v not in ("bytes", "words")]
    if bad:
        raise ValueError(f"vla bench inference: plan_vocabs entries must be bytes or words, got {bad}")
    if args["dtype"] not in ("fp32", "bf16"):
        raise ValueError(f"vla bench inference: dtype must be fp32 or bf16, got '{args['dtype']}'")
    return args


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(sizes: list[int], device, dtype) -> dict[str, float]:
    """Best-of-several GFLOP/s of an n x n matmul for each n."""
    import torch

    out = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        _sync(device)
        best = float("inf")
        reps = 3 if device.type == "cpu" else 20
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t)
        out[str(n)] = 2 * n**3 / best / 1e9
    return out


_T0 = time.perf_counter()


def _note(stage: str) -> None:
    """Progress on stderr (which stage, seconds since start): a slow row shows where its time goes."""
    import sys

    print(f"bench inference: {stage} at {time.perf_counter() - _T0:.1f} s", file=sys.stderr, flush=True)


def _kernel_count(fn, device) -> int | None:
    """CUDA kernels launched by one call of ``fn`` (torch.profiler; None off CUDA or without CUPTI)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return None
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - a profiler that cannot start must not stop the benchmark
        return None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())


def _bench_graphs(model, cfg, args, run, median_of, with_plan, batch, cached, flops_cached, peak_gflops,
                  device) -> dict[str, Any]:
    """The cached chunk with the Euler loop replayed from CUDA graphs (see the module docstring)."""
    _, _, plain_out = run(with_plan, True, False, False)
    model.use_cuda_graphs(capture=device.type == "cuda")
    graphed = median_of(with_plan, True, False)
    _, _, graph_out = run(with_plan, True, False, False)
    diff = graph_out["actions"].float() - plain_out["actions"].float()
    res: dict[str, Any] = {
        "phases_cached_graphs_s": {k: v for k, v in graphed.items() if k != "total_s"},
        "speedup_graphs": cached["total_s"] / graphed["total_s"],
        "graphs_rel_action_diff": float(diff.norm() / plain_out["actions"].float().norm()),
        "achieved_frac_of_peak_cached_graphs": flops_cached / graphed["total_s"] / 1e9 / peak_gflops,
        "chunk_latency_graphs_s": graphed["total_s"],
    }
    if args["kernels"]:
        res["kernels_cached_graphs"] = _kernel_count(lambda: run(with_plan, True, False, False), device)
    if cfg.planner:
        res["plan_decode_graphs_total_s"] = median_of(batch, True, True)["total_s"]
    return res


def bench_preset(name: str, args: dict[str, Any], device, peak_gflops: float, b: int = 1,
                 n_cams: int = 1) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from vla.config import compose
    from vla.flops import count_flops
    from vla.model import VLA, VLAConfig
    from vla.tokenizer import ByteTokenizer

    mcfg = OmegaConf.to_container(compose("train", [f"model={name}", "dataset.path=unused"]).model)
    mcfg = {k: v for k, v in mcfg.items() if k not in ("preset", "name")}
    size = int(args["image_size"])
    cfg = VLAConfig.from_dict(mcfg, cameras=[f"cam{i}" for i in range(n_cams)], image_size=size,
                              state_dim=4, action_dim=4)
    torch.manual_seed(0)
    model = VLA(cfg).to(device).eval()
    tok = ByteTokenizer(cfg.action_bins)
    g = torch.Generator().manual_seed(0)
    it, im = tok.batch_encode(["open the top drawer and put the red block inside"] * b, cfg.max_instruction_tokens)
    plan_text = "reach the handle; pull the drawer; grasp the block; place it in the drawer"
    plan_text = plan_text[: int(args["plan_len"]) - 2]
    pt, pm = tok.batch_encode([plan_text] * b, cfg.max_plan_tokens, eos=True, first=tok.plan_id)
    batch = {"images": (torch.rand(b, cfg.num_views, 3, size, size, generator=g) * 2 - 1).to(device),
             "state": torch.randn(b, cfg.state_dim, generator=g).to(device),
             "instruction_tokens": it.to(device), "instruction_mask": im.to(device)}
    with_plan = dict(batch, plan_tokens=pt.to(device), plan_mask=pm.to(device)) if cfg.planner else batch
    noise = torch.randn(b, cfg.horizon, cfg.action_dim, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["dtype"] == "bf16")

    def run(inputs: dict, use_cache: bool, decode: bool, phases: bool = True) -> tuple[float, dict[str, float], Any]:
        """One chunk; its wall time (CUDA events on the GPU) and, with ``phases``, the phase split
        (which synchronizes between phases, so it is timed in separate calls from the total)."""
        timings: dict[str, float] | None = {} if phases else None
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with autocast:
                out = model.sample(inputs, noise=noise, use_cache=use_cache, decode_plan=decode, timings=timings)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, timings or {}, out
        t = time.perf_counter()
        with autocast:
            out = model.sample(inputs, noise=noise, use_cache=use_cache, decode_plan=decode, timings=timings)
        _sync(device)
        return time.perf_counter() - t, timings or {}, out

    def median_of(inputs: dict, use_cache: bool, decode: bool) -> dict[str, Any]:
        run(inputs, use_cache, decode)  # warm-up
        totals = [run(inputs, use_cache, decode, phases=False)[0] for _ in range(int(args["repeats"]))]
        runs = [run(inputs, use_cache, decode) for _ in range(int(args["repeats"]))]
        res = {"total_s": statistics.median(totals)}
        for key in runs[0][1]:
            res[key] = statistics.median(r[1][key] for r in runs)
        return res

    n_params = sum(p.numel() for p in model.parameters())
    n_prefix = cfg.num_image_tokens + int(im.sum(1).max())
    _note("cached")
    cached = median_of(with_plan, True, False)
    _note("uncached")
    uncached = median_of(with_plan, False, False)
    with autocast:
        flops_cached = count_flops(lambda: model.sample(with_plan, noise=noise, use_cache=True))
        flops_uncached = count_flops(lambda: model.sample(with_plan, noise=noise, use_cache=False))
    result: dict[str, Any] = {
        "params": n_params,
        "prefix_tokens": n_prefix,
        "plan_tokens_given": int(pm.sum(1).max()) if cfg.planner else 0,
        "action_tokens": 1 + cfg.horizon,
        "chunk_latency_s": {"cached": cached["total_s"], "uncached": uncached["total_s"]},
        "phases_cached_s": {k: v for k, v in cached.items() if k != "total_s"},
        "phases_uncached_s": {k: v for k, v in uncached.items() if k != "total_s"},
        "speedup_cached": uncached["total_s"] / cached["total_s"],
        "flops_per_chunk": {"cached": flops_cached, "uncached": flops_uncached},
        "achieved_gflops_cached": flops_cached / cached["total_s"] / 1e9,
        "achieved_frac_of_peak_cached": flops_cached / cached["total_s"] / 1e9 / peak_gflops,
    }
    if args["kernels"]:
        result["kernels_per_chunk"] = {"cached": _kernel_count(lambda: run(with_plan, True, False, False), device)}
    _note("graphs")
    if args["graphs"]:
        try:
            result.update(_bench_graphs(model, cfg, args, run, median_of, with_plan, batch, cached, flops_cached,
                                        peak_gflops, device))
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the rest of the table
            result["graphs_error"] = f"{type(e).__name__}: {e}"
        finally:
            model.use_cuda_graphs(False)
        if args["kernels"] and "kernels_cached_graphs" in result:
            result["kernels_per_chunk"]["cached_graphs"] = result.pop("kernels_cached_graphs")
        if "chunk_latency_graphs_s" in result:
            result["chunk_latency_s"]["cached_graphs"] = result.pop("chunk_latency_graphs_s")
    if args["baseline"]:
        result["vs_baseline"] = bench_vs_baseline(model, args, with_plan, batch if cfg.planner else None, noise,
                                                  flops_cached, peak_gflops, autocast, device)
    if cfg.planner:
        _note("plan decode")
        decoded = median_of(batch, True, True)
        _, _, out = run(batch, True, True)
        result["plan_decode"] = {"plan_s": decoded["plan_s"], "plan_tokens": int(out["plan_tokens"].shape[1]),
                                 "s_per_token": decoded["plan_s"] / out["plan_tokens"].shape[1],
                                 "total_with_plan_s": decoded["total_s"]}
    return result


def load_avg() -> float | None:
    """The 1-minute load average (/proc/loadavg), or None where there is none."""
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def load_baseline_model(ref: str) -> tuple[Any, str]:
    """The ``VLA`` class of another revision's ``vla/model.py`` (a git ref, or a path to the file),
    imported as its own module beside the current package; returns (class, description)."""
    import importlib.util
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    path = Path(ref)
    desc = str(path)
    if not path.is_file():
        root = Path(__file__).resolve().parents[2]
        try:
            text = subprocess.run(["git", "-C", str(root), "show", f"{ref}:vla/model.py"], check=True,
                                  capture_output=True, text=True).stdout
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", ref], check=True,
                                    capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as e:
            raise ValueError(f"vla bench inference: baseline={ref!r} is neither a file nor a git ref of {root}") from e
        path = Path(tempfile.mkdtemp(prefix="vla_baseline_")) / "model.py"
        path.write_text(text)
        desc = f"{ref} ({commit}) vla/model.py"
    name = f"vla_baseline_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module.VLA, desc


def bench_vs_baseline(model: Any, args: dict[str, Any], inputs: dict, decode_inputs: dict | None, noise: Any,
                      flops: int, peak_gflops: float, autocast: Any, device) -> dict[str, Any]:
    """Chunk latency of ``model`` and of the baseline revision's model, alternating; see the module docstring."""
    import torch

    from vla.flops import count_flops

    base_cls, desc = load_baseline_model(args["baseline"])
    base = base_cls(model.cfg).to(device).eval()
    base.load_state_dict(model.state_dict())

    def once(m: Any, batch: dict) -> tuple[float, Any]:
        _sync(device)
        t = time.perf_counter()
        with autocast:
            out = m.sample(batch, noise=noise)
        _sync(device)
        return time.perf_counter() - t, out

    out: dict[str, Any] = {"baseline": desc}
    cases = {"cached_given_plan": inputs}
    if decode_inputs is not None:
        cases["cached_plan_decoded"] = decode_inputs
    for case, batch in cases.items():
        (_, new_out), (_, base_out) = once(model, batch), once(base, batch)  # warm-up, and the actions
        times: dict[str, list[float]] = {"new": [], "baseline": []}
        for _ in range(int(args["baseline_repeats"])):
            times["new"].append(once(model, batch)[0])
            times["baseline"].append(once(base, batch)[0])
        new_s, base_s = statistics.median(times["new"]), statistics.median(times["baseline"])
        out[case] = {"new_s": new_s, "baseline_s": base_s, "speedup": base_s / new_s,
                     "new_min_s": min(times["new"]), "baseline_min_s": min(times["baseline"]),
                     "max_abs_action_diff": float((new_out["actions"].float() - base_out["actions"].float())
                                                  .abs().max()),
                     "same_plan": bool(new_out["plan_tokens"] is None or torch.equal(new_out["plan_tokens"],
                                                                                      base_out["plan_tokens"]))}
    with autocast:
        base_flops = count_flops(lambda: base.sample(inputs, noise=noise))
    given = out["cached_given_plan"]
    out["flops_per_chunk"] = {"new": flops, "baseline": base_flops}
    out["achieved_frac_of_peak"] = {"new": flops / given["new_s"] / 1e9 / peak_gflops,
                                    "baseline": base_flops / given["baseline_s"] / 1e9 / peak_gflops}
    return out


def bench_plan_vocabs(name: str, args: dict[str, Any], device) -> dict[str, Any]:
    """Greedy decode time of `PLAN_4` per plan vocabulary (same preset, same run); see the module docstring."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from vla.config import compose
    from vla.model import VLA, VLAConfig
    from vla.normalize import Normalizer
    from vla.processor import Processor
    from vla.tokenizer import ByteTokenizer, PlanVocab, split_words

    mcfg = OmegaConf.to_container(compose("train", [f"model={name}", "dataset.path=unused"]).model)
    mcfg = {k: v for k, v in mcfg.items() if k not in ("preset", "name")}
    size, b = int(args["image_size"]), int(args["batch"][0])
    words = sorted(set(split_words(PLAN_4)) | {";"})
    lengths = {"bytes": len(ByteTokenizer().encode(PLAN_4)) + 2, "words": PlanVocab(words, 16).length(PLAN_4)}
    stats = {k: {"q01": [-1.0] * 4, "q99": [1.0] * 4, "min": [-1.0] * 4, "max": [1.0] * 4, "mean": [0.0] * 4,
                 "std": [1.0] * 4} for k in ("state", "action")}
    out: dict[str, Any] = {"plan": PLAN_4, "instruction": INSTRUCTION}
    for vocab in args["plan_vocabs"]:
        extra = {"plan_vocab": vocab, "plan_words": words} if vocab == "words" else {}
        cfg = VLAConfig.from_dict(mcfg, cameras=[f"cam{i}" for i in range(int(args["cameras"][0]))],
                                  image_size=size, state_dim=4, action_dim=4, planner=True,
                                  max_plan_tokens=lengths[vocab], **extra)
        torch.manual_seed(0)
        model = VLA(cfg).to(device).eval()
        norm = Normalizer({k: {s: np.asarray(v, np.float32) for s, v in d.items()} for k, d in stats.items()})
        proc = Processor(cfg, norm)
        g = torch.Generator().manual_seed(0)
        obs = [{"images": {c: torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                           for c in cfg.cameras}, "state": [0.0] * 4}] * b
        batch = proc.observation_batch(obs, [INSTRUCTION] * b, device)
        times = []
        for _ in range(int(args["repeats"]) + 1):  # the first is a warm-up
            timings: dict[str, float] = {}
            with torch.no_grad():
                res = model.sample(batch, use_cache=True, decode_plan=True, timings=timings)
            times.append(timings)
        plan_s = statistics.median(t["plan_s"] for t in times[1:])
        total = statistics.median(sum(t.values()) for t in times[1:])
        out[vocab] = {"plan_tokens": int(res["plan_tokens"].shape[1]), "plan_s": plan_s,
                      "s_per_token": plan_s / res["plan_tokens"].shape[1], "chunk_s": total,
                      "plan_share_of_chunk": plan_s / total}
    if "bytes" in out and "words" in out:
        out["plan_speedup_words_vs_bytes"] = out["bytes"]["plan_s"] / out["words"]["plan_s"]
    if "words" in args["plan_vocabs"]:
        try:
            from vla.text_encoder import BertEncoder, WordPieceTokenizer
        except ImportError:
            return out
        enc, wp = BertEncoder().load_pretrained().to(device).eval(), WordPieceTokenizer()
        ids, mask = wp.batch_encode([INSTRUCTION] * b, 48)
        ids, mask = ids.to(device), mask.to(device)
        runs = []
        for _ in range(int(args["repeats"]) + 1):
            t = time.perf_counter()
            with torch.no_grad():
                enc(ids, mask)
            _sync(device)
            runs.append(time.perf_counter() - t)
        out["minilm_encode_s"] = statistics.median(runs[1:])
    return out


def main(argv: list[str]) -> int:
    import os

    import torch

    args = parse_args(argv)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    device = torch.device(args["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("vla bench inference: device=cuda but CUDA is not available")
    dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
    peaks = matmul_peak(list(args["peak_sizes"]), device, dtype)
    peak = max(peaks.values())
    report: dict[str, Any] = {
        "benchmark": "inference",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "dtype": args["dtype"], "batch": args["batch"], "cameras": args["cameras"], "image_size": args["image_size"],
        "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_1min_at_start": load_avg(),
        "matmul_peak_gflops": peaks,
        "presets": {},
    }
    grid = [(b, c) for b in args["batch"] for c in args["cameras"]]
    for name in args["presets"]:
        for b, c in grid:
            key = name if len(grid) == 1 else f"{name} batch={b} cameras={c}"
            report["presets"][key] = dict(bench_preset(name, args, device, peak, b, c), batch=b, cameras=c)
        if args["plan_vocabs"]:
            report["presets"][name]["plan_decode_by_vocab"] = bench_plan_vocabs(name, args, device)
    report["load_avg_1min_at_end"] = load_avg()
    print(json.dumps(report, indent=1))
    return 0
