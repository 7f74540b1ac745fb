"""Data parallel training on 2 CPU processes (gloo): DDP and FSDP match one process on the combined
batch, FSDP checkpoints resume exactly, and `torchrun -m vla train` works."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from train_utils import TINY, make_store, one_step, spawn_worker, train_cfg

from vla import checkpoint as ckpt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STEP_INDICES = [0, 13, 26, 5, 18, 30]  # step t <= 8 of 12 with horizon 4: no padded actions
RESUME = ["trainer.steps=4", "trainer.batch_size=2", "trainer.log_every=1", "trainer.ckpt_every=0",
          "trainer.strategy=fsdp", "trainer.ema_decay=0.9"]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """One 2-process gloo spawn for every multi-process check (process start-up dominates the cost):
    an FSDP run of 4 steps, the same run stopped at 2 and resumed, then one DDP and one FSDP step."""
    tmp = tmp_path_factory.mktemp("ddp")
    store = make_store(tmp / "store.zarr", episodes=3, length=12)
    # Planner off and windows without padding: every sample then weighs the same in each rank's mean loss.
    # fp32 (bf16=auto is on for CPUs with native bf16): the check is exact arithmetic, not rounding.
    step = ["planner=off", "trainer.batch_size=3", "trainer.ema_decay=0.9", "trainer.bf16=false"]
    jobs = [("train", train_cfg(store, tmp / "full", *RESUME)),
            ("train", train_cfg(store, tmp / "split", *RESUME, "trainer.stop_at=2")),
            ("train", train_cfg(store, tmp / "split", *RESUME, f"resume={tmp / 'split'}")),
            ("step", train_cfg(store, tmp / "s1", *step, "trainer.strategy=ddp"), STEP_INDICES),
            ("step", train_cfg(store, tmp / "s2", *step, "trainer.strategy=fsdp"), STEP_INDICES)]
    out = tmp / "steps.pt"
    mp.spawn(spawn_worker, args=(2, [_free_port() for _ in jobs], jobs, str(out)), nprocs=2, join=True)
    steps = dict(zip(["ddp", "fsdp"], torch.load(out, weights_only=True)))
    single = one_step(train_cfg(store, tmp / "s0", "planner=off", "trainer.batch_size=6", "trainer.ema_decay=0.9",
                                "trainer.bf16=false"), STEP_INDICES)
    return {"tmp": tmp, "steps": steps, "single": single}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(two_procs, strategy):
    multi, single = two_procs["steps"][strategy], two_procs["single"]
    assert multi["strategy"] == strategy and single["strategy"] == "none"
    assert abs(multi["grad_norm"] - single["grad_norm"]) < 1e-5 * single["grad_norm"]
    for name, g in single["grads"].items():
        assert torch.allclose(multi["grads"][name], g, rtol=1e-4, atol=1e-7), name
    for name, p in single["params"].items():
        assert torch.allclose(multi["params"][name], p, rtol=0, atol=1e-6), name
        assert torch.allclose(multi["ema"][name], single["ema"][name], rtol=0, atol=1e-6), name


def test_fsdp_stop_and_resume_is_exact(two_procs):
    full, split = two_procs["tmp"] / "full", two_procs["tmp"] / "split"

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]

    assert [r[0] for r in losses(split)] == [1, 2, 3, 4]
    assert losses(split) == losses(full)
    assert "strategy=fsdp" in (full / "train.log").read_text()
    for name in ("model.safetensors", "ema.safetensors"):
        a = ckpt.load_tensors(full / "checkpoints" / "step_0000004" / name)
        b = ckpt.load_tensors(split / "checkpoints" / "step_0000004" / name)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a), name
    st = ckpt.load_trainer_state(split / "checkpoints" / "step_0000004")
    assert st["strategy"] == "fsdp" and st["optimizer_format"] == "fqn" and st["data"]["world_size"] == 2


def test_torchrun_two_processes_train_and_checkpoint(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    store = make_store(tmp_path / "store.zarr", episodes=2, length=10)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "vla", "train", f"dataset.path={store}",
           f"run_dir={run}", "trainer=debug", "device=cpu", "trainer.batch_size=2", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run dir:") == 1  # rank 0 only
    step_dir = ckpt.resolve_checkpoint(run)
    assert step_dir.name == "step_0000002"
    st = ckpt.load_trainer_state(step_dir)
    assert st["data"]["world_size"] == 2 and len(st["rng"]) == 2 and st["strategy"] == "ddp"
    assert "world_size=2" in (run / "train.log").read_text()
