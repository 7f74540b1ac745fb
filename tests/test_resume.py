"""Exact resume: a run stopped after k steps and resumed matches an uninterrupted run step for step."""

from __future__ import annotations

import json

import pytest
import torch
from train_utils import make_store, train_cfg

from vla import checkpoint as ckpt
from vla.training import train


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["action_loss"], r["plan_loss"], r["grad_norm"], r["lr"]) for r in rows
            if r["split"] == "train"]


@pytest.mark.parametrize("workers", [0, 1])
def test_stop_and_resume_equals_uninterrupted(tmp_path, workers):
    store = make_store(tmp_path / "store.zarr", episodes=3, length=12)  # 36 windows: 4 batches of 8 per epoch
    common = ["trainer.steps=7", "trainer.batch_size=8", "trainer.warmup_steps=2", "trainer.log_every=1",
              "trainer.ckpt_every=0", "trainer.ema_decay=0.9", f"trainer.num_workers={workers}"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(train_cfg(store, full, *common))
    train(train_cfg(store, split, *common, "trainer.stop_at=3"))  # stops mid-epoch, checkpointed
    assert ckpt.resolve_checkpoint(split).name == "step_0000003"
    train(train_cfg(store, split, *common, f"resume={split}"))  # crosses into epoch 2

    assert [r[0] for r in _losses(split)] == list(range(1, 8))
    assert _losses(split) == _losses(full)  # bitwise: losses, grad norms, learning rates
    for name in ("model.safetensors", "ema.safetensors"):
        a = ckpt.load_tensors(full / "checkpoints" / "step_0000007" / name)
        b = ckpt.load_tensors(split / "checkpoints" / "step_0000007" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (name, k)
    sa = ckpt.load_trainer_state(full / "checkpoints" / "step_0000007")
    sb = ckpt.load_trainer_state(split / "checkpoints" / "step_0000007")
    assert sa["data"] == sb["data"] and sa["data"]["epoch"] == 1 and sa["data"]["position"] == 3
    assert sa["ema"] == sb["ema"]
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])


def test_resume_is_one_command(tmp_path):
    """`vla train resume=RUN_DIR` (the README's command) continues from the run's own saved config,
    no other argument, and matches the uninterrupted run step for step."""
    from vla.cli import main as vla_main

    store = make_store(tmp_path / "store.zarr", episodes=3, length=12)
    common = ["trainer.steps=6", "trainer.batch_size=8", "trainer.warmup_steps=2", "trainer.log_every=1",
              "trainer.ckpt_every=0", "trainer.ema_decay=0.9", "trainer.lr=0.002"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(train_cfg(store, full, *common))
    train(train_cfg(store, split, *common, "trainer.stop_at=2"))
    assert vla_main(["train", f"resume={split}"]) == 0
    assert _losses(split) == _losses(full)
    assert ckpt.resolve_checkpoint(split).name == "step_0000006"


def test_resume_overrides_are_checked(tmp_path, capsys):
    from vla.cli import main as vla_main
    from vla.training.resume import resume_config

    store = make_store(tmp_path / "store.zarr", episodes=2, length=10)
    run = tmp_path / "run"
    train(train_cfg(store, run, "trainer.steps=4", "trainer.stop_at=1", "trainer.batch_size=4"))
    # exactness-breaking keys are refused by name
    for bad, key in (("trainer.lr=0.1", "trainer.lr"), ("model.d_model=64", "model.d_model"), ("seed=3", "seed"),
                     ("dataset.tasks=[reach]", "dataset.tasks"), ("model=small", r"model\.\w+")):
        with pytest.raises(ValueError, match=f"resume: '{key}' cannot change when resuming.*the run has"):
            resume_config(str(run), [bad])
    assert vla_main(["train", f"resume={run}", "trainer.warmup_steps=77"]) == 2
    assert "'trainer.warmup_steps' cannot change" in capsys.readouterr().err
    # repeating the run's own values (the whole original command line) is accepted
    same = resume_config(str(run), [f"dataset.path={store}", "trainer.batch_size=4", "trainer=debug",
                                    "model.d_model=32"])
    assert same.trainer.batch_size == 4 and same.model.d_model == 32
    # bookkeeping keys are applied; the saved stop_at is dropped, run_dir is the run's folder
    cfg = resume_config(str(run), [f"resume={run}", "trainer.log_every=7", "trainer.stop_at=3", "device=cpu"])
    assert cfg.trainer.log_every == 7 and cfg.trainer.stop_at == 3 and cfg.trainer.steps == 4
    assert cfg.trainer.batch_size == 4 and cfg.run_dir == str(run)
    assert resume_config(str(run), ["trainer.steps=8"]).trainer.steps == 8  # raised to train further
    assert resume_config(str(run), []).trainer.stop_at is None
    assert vla_main(["train", f"resume={run}", "trainer.stop_at=3"]) == 0
    assert ckpt.resolve_checkpoint(run).name == "step_0000003"
    moved = tmp_path / "moved"
    run.rename(moved)  # a run folder moved elsewhere still resumes in place
    assert vla_main(["train", f"resume={moved}"]) == 0
    assert ckpt.resolve_checkpoint(moved).name == "step_0000004"
