"""Shared helpers for the training tests: a tiny synthetic store and a composed train config."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


def make_store(path: Path, episodes: int = 3, length: int = 12, image_size: int = 16, cameras: int = 1,
               action_dim: int = 3, state_dim: int = 2, tasks: tuple[str, ...] = ("reach", "push"),
               seed: int = 0, env_options: dict | None = None) -> Path:
    """A small store whose actions are a smooth function of time (learnable) with two subtasks."""
    from vla.datasets import EpisodeWriter

    rng = np.random.default_rng(seed)
    cams = {f"cam{i}": (image_size, image_size) for i in range(cameras)}
    w = EpisodeWriter(path, env="synthetic", fps=10, cameras=cams, action_dim=action_dim, state_dim=state_dim,
                      env_options=env_options)
    try:
        for e in range(episodes):
            t = np.linspace(0, 1, length, dtype=np.float32)[:, None]  # (T, 1)
            action = np.cos(np.pi * t * np.arange(1, action_dim + 1)).astype(np.float32)  # (T, A)
            state = np.concatenate([t] * state_dim, axis=1).astype(np.float32) + 0.1 * e  # (T, S)
            images = {c: rng.integers(0, 256, size=(length, image_size, image_size, 3), dtype=np.uint8)
                      for c in cams}
            half = length // 2
            w.add_episode(action=action, state=state, images=images,
                          subtasks=["go"] * half + ["stop"] * (length - half),
                          instruction=f"do {tasks[e % len(tasks)]}", task=tasks[e % len(tasks)], seed=e)
    finally:
        w.close()
    return path


# A model small enough that a step takes milliseconds on one CPU thread.
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.head_dim=16", "model.action_width=16",
        "model.frame_width=16", "model.patch_size=8", "model.horizon=4", "model.max_instruction_tokens=12",
        "model.max_plan_tokens=12", "model.frame_size=8"]


def train_cfg(store: Path, run_dir: Path, *overrides: str):
    from vla.config import compose

    return compose("train", [f"dataset.path={store}", f"run_dir={run_dir}", "trainer=debug", "device=cpu",
                             *TINY, *overrides])


@contextlib.contextmanager
def deterministic_flow():
    """Within the block, the model's flow noise is zero and its time 0.5, so losses depend only on the
    data: then W processes on B samples each and one process on W * B samples must agree (test_ddp).
    Restores both functions on exit (the patch must not leak into other tests)."""
    import torch

    import vla.model

    saved = vla.model.sample_time, torch.randn_like
    vla.model.sample_time = lambda b, device="cpu", generator=None: torch.full((b,), 0.5, device=device)
    torch.randn_like = torch.zeros_like
    try:
        yield
    finally:
        vla.model.sample_time, torch.randn_like = saved


def one_step(cfg, indices: list[int], rank: int = 0, world: int = 1, port: int = 0, out: str | None = None):
    """Build the Trainer (joining a gloo group when world > 1), run ONE step on this rank's share of
    ``indices`` and return (or save to ``out`` on rank 0) the parameters and gradients."""
    import os

    import torch

    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    from vla.datasets import collate_windows

    from vla.training import Trainer
    from vla.training import distributed as dist_utils
    from vla.training.optim import strip_wrapper_prefixes

    info = dist_utils.init("cpu")
    try:
        with deterministic_flow():
            trainer = Trainer(cfg, info)
            b = len(indices) // world
            raw = collate_windows(trainer.dataset.__getitems__(indices[rank * b : (rank + 1) * b]))
            metrics = trainer.train_step(raw)

        def full(t):  # FSDP: gather this rank's shard into the full tensor (a collective)
            return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()

        params = list(trainer.raw_model.named_parameters())
        result = {
            "strategy": trainer.strategy,
            "grad_norm": metrics["grad_norm"],
            "params": {n: full(p) for n, p in params},
            "grads": {n: full(p.grad) for n, p in params if p.grad is not None},
            # EMA names follow the wrapped module (DDP adds "module."); compare by the model's own names.
            "ema": {strip_wrapper_prefixes(n).removeprefix("model."): full(t) for n, t in trainer.ema.shadow.items()},
        }
    finally:
        # Free the DDP/FSDP wrappers before the process group goes (see vla.training.train).
        import gc

        trainer = None  # noqa: F841
        gc.collect()
        dist_utils.shutdown(info)
    if out is not None and rank == 0:
        torch.save(result, out)
    return result


def spawn_worker(rank: int, world: int, ports: list[int], jobs: list[tuple], out: str) -> None:
    """torch.multiprocessing.spawn entry point (it must live in an importable module). Runs each job in
    its own process group on a fresh port: ("step", cfg, indices) -> one_step, ("train", cfg) -> train.
    Rank 0 saves the one_step results, in job order, to ``out``."""
    import os

    import torch

    from vla.training import train

    torch.set_num_threads(1)
    results = []
    for port, job in zip(ports, jobs):
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
        if job[0] == "step":
            results.append(one_step(job[1], job[2], rank, world, port))
        else:
            train(job[1])
    if rank == 0:
        torch.save(results, out)
