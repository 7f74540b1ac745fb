"""`vla bench dataloader [key=value ...]`: WindowDataset samples/s through a torch DataLoader.

    vla bench dataloader                                  # 20 episodes x 100 steps, 2 cameras 128x128
    vla bench dataloader episodes=10 batches=10 workers=[0] video=false

Writes a synthetic store in a temp dir (smooth per-episode backgrounds, a moving object and
optional pixel noise; at noise=0 blosc-zstd compresses it ~2.9x, rendered MetaWorld frames 3.0-6.4x), then
times ``batches`` batches (after one untimed warm-up batch, which absorbs worker start-up) of
``batch_size`` shuffled windows with ``horizon``-step action chunks, from disk
(``in_memory=False``: images decoded from zarr chunks per batch), from disk in the training
loop's chunk-local order (``disk_chunked``: whole chunks, a shuffle buffer of ``buffer_spans``
spans of ``span_chunks`` chunks; ``vla.training.chunk_loader``) and from memory, for each
``workers`` count. With ``video=true`` the same frames are also exported as per-episode H.264
mp4 files (LeRobot's layout, ``-g 2``) and windows are decoded from them
(``video_batches`` batches, workers 0), for a bytes-on-disk and speed comparison; ``video_psnr``
is the decoded frames' PSNR against the lossless originals.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vla.bench import parse_bench_args

DEFAULTS: dict[str, Any] = {
    "episodes": 20,
    "steps": 100,
    "cameras": 2,
    "image_size": 128,
    "batch_size": 64,
    "horizon": 16,
    "n_obs_steps": 1,
    "frame_offset": 8,
    "batches": 30,
    "workers": [0, 2],
    "noise": 0,
    "video": True,
    "video_batches": 3,
    "crf": 23,
    "seed": 0,
    "span_chunks": 4,       # disk_chunked: consecutive image chunks per shuffled span
    "buffer_spans": 8,      # disk_chunked: spans in the shuffle buffer
    "image_chunk_frames": 0,  # frames per image chunk at write time (0 = the writer's default, ~1 MiB)
}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` overrides, typed by ``DEFAULTS`` (see :func:`vla.bench.parse_bench_args`)."""
    return parse_bench_args("dataloader", argv, DEFAULTS, int_lists=("workers",))


def synthetic_frames(rng: np.random.Generator, steps: int, size: int, noise: int) -> np.ndarray:
    """u8[steps, size, size, 3]: a smooth random background, a moving square, +-noise pixel noise."""
    import cv2

    low = rng.integers(0, 256, size=(6, 6, 3)).astype(np.float32)
    bg = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)  # (H, W, 3)
    frames = np.repeat(bg[None], steps, 0)  # (T, H, W, 3)
    side = max(2, size // 8)
    path = np.linspace(0, size - side, steps).astype(int)
    color = rng.integers(0, 256, size=3).astype(np.float32)
    for t in range(steps):
        frames[t, path[t]: path[t] + side, path[::-1][t]: path[::-1][t] + side] = color
    if noise:
        frames += rng.integers(-noise, noise + 1, size=frames.shape, dtype=np.int16)
    return np.clip(frames, 0, 255).astype(np.uint8)


def make_store(path: Path, a: dict[str, Any]) -> dict[str, Any]:
    """Write the synthetic store; returns write timing and sizes."""
    from vla.datasets import EpisodeWriter

    rng = np.random.default_rng(a["seed"])
    cams = {f"cam{i}": (a["image_size"], a["image_size"]) for i in range(a["cameras"])}
    t_gen = t_write = 0.0
    with EpisodeWriter(path, env="synthetic", fps=10, cameras=cams, action_dim=7, state_dim=9,
                       image_chunk_frames=a["image_chunk_frames"] or None) as w:
        for e in range(a["episodes"]):
            t0 = time.perf_counter()
            n = a["steps"]
            ep = {
                "action": np.cumsum(rng.normal(0, 0.1, (n, 7)), 0).astype(np.float32),
                "state": np.cumsum(rng.normal(0, 0.1, (n, 9)), 0).astype(np.float32),
                "images": {c: synthetic_frames(rng, n, a["image_size"], a["noise"]) for c in cams},
                "subtasks": ["reach"] * (n // 3) + ["grasp"] * (n // 3) + ["lift"] * (n - 2 * (n // 3)),
                "instruction": f"pick up the block {e % 4}", "task": "pick", "seed": e,
            }
            t1 = time.perf_counter()
            w.add_episode(**ep)
            t_gen += t1 - t0
            t_write += time.perf_counter() - t1
    raw = a["episodes"] * a["steps"] * a["cameras"] * a["image_size"] ** 2 * 3
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"raw_image_bytes": raw, "zarr_bytes": disk, "zarr_compression_ratio": round(raw / disk, 2),
            "write_s": round(t_write, 2), "write_MB_per_s": round(raw / 1e6 / t_write, 1)}


def time_loader(ds, batch_size: int, batches: int, workers: int, seed: int) -> dict[str, float]:
    """Samples/s over ``batches`` shuffled batches after one untimed warm-up batch."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from vla.datasets import collate_windows

    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * (batches + 1), generator=g)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_windows,
                    multiprocessing_context="fork" if workers else None)
    it = iter(dl)
    next(it)  # warm-up: worker start-up, first chunk reads
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["action"].shape[0]
    dt = time.perf_counter() - t0
    return {"samples_per_s": round(n / dt, 1), "batches": n // batch_size, "seconds": round(dt, 3)}


def time_chunked(ds, a: dict[str, Any], workers: int) -> dict[str, float]:
    """Samples/s of the chunk-local order through a ``ChunkCache`` (``vla.training.chunk_loader``)."""
    import torch
    from torch.utils.data import DataLoader

    from vla.datasets import collate_windows
    from vla.training.chunk_loader import cache_capacity, cached_windows, disk_sampler

    span, buf = a["span_chunks"], a["buffer_spans"]
    cds = cached_windows(ds, cache_capacity(span, buf, len(ds.cameras)))
    sampler = disk_sampler(ds, cds.store, a["batch_size"], 1, 0, a["seed"], span, buf)
    dl = DataLoader(cds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_windows,
                    multiprocessing_context="fork" if workers else None)
    it = iter(dl)
    next(it)  # warm-up, as in time_loader
    t0 = time.perf_counter()
    n = 0
    for _ in range(a["batches"]):
        n += next(it)["action"].shape[0]
    dt = time.perf_counter() - t0
    del it
    torch.set_num_threads(1)
    return {"samples_per_s": round(n / dt, 1), "batches": n // a["batch_size"], "seconds": round(dt, 3),
            "chunk_frames": int(cds.store.chunk_frames(ds.frame_camera)), "span_chunks": span, "buffer_spans": buf}


def run(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vla.datasets import EpisodeStore, WindowDataset

    torch.set_num_threads(1)
    out: dict[str, Any] = {"benchmark": "dataloader", "config": a}
    with tempfile.TemporaryDirectory(prefix="vla-bench-dl-") as tmp:
        path = Path(tmp) / "store"
        out["store"] = make_store(path, a)
        win = {"n_obs_steps": a["n_obs_steps"], "horizon": a["horizon"], "frame_offset": a["frame_offset"]}
        res: dict[str, Any] = {}
        for source, in_memory in (("disk", False), ("memory", True)):
            t0 = time.perf_counter()
            store = EpisodeStore(path, in_memory=in_memory)
            load_s = time.perf_counter() - t0
            ds = WindowDataset(store, **win)
            for w in a["workers"]:
                r = time_loader(ds, a["batch_size"], a["batches"], w, a["seed"])
                if in_memory:
                    r["load_s"] = round(load_s, 3)
                res[f"{source}_workers{w}"] = r
            if not in_memory:  # the training loop's disk path: whole chunks, a shuffle buffer of chunks
                for w in a["workers"]:
                    res[f"disk_chunked_workers{w}"] = time_chunked(ds, a, w)
        if a["video"]:
            from vla.datasets.video import VideoEpisodeStore, export_videos

            t0 = time.perf_counter()
            vbytes = export_videos(EpisodeStore(path), Path(tmp) / "videos", crf=a["crf"])
            enc_s = time.perf_counter() - t0
            vstore = VideoEpisodeStore(path, Path(tmp) / "videos")
            ds = WindowDataset(vstore, **win)
            r = time_loader(ds, a["batch_size"], a["video_batches"], 0, a["seed"])
            # Quality: decode a few windows from both and compare.
            ref = WindowDataset(EpisodeStore(path, in_memory=True), **win)
            idx = list(range(0, len(ds), max(1, len(ds) // 16)))[:16]
            x = ds.__getitems__(idx).arrays["future_image"].astype(np.float64)
            y = ref.__getitems__(idx).arrays["future_image"].astype(np.float64)
            mse = float(np.mean((x - y) ** 2))
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
            ratio = round(out["store"]["raw_image_bytes"] / vbytes, 2)
            r.update({"video_bytes": vbytes, "video_compression_ratio": ratio,
                      "encode_s": round(enc_s, 2), "video_psnr_db": round(psnr, 2), "codec": "libx264 yuv420p -g 2",
                      "crf": a["crf"]})
            res["video_mp4_workers0"] = r
        out["results"] = res
    import os

    out["machine"] = {"cpus": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    return out


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    print(json.dumps(run(a)))
    return 0
