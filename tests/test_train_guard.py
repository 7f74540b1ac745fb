"""Training survives bad data (issue 18 item 3): a corrupt chunk met while training is skipped
(counted) or stops the run with a checkpoint and a clear error; a NaN loss or gradient stops the
run naming the step and the batch's episodes, leaving the last good checkpoint and never writing
a NaN one. Also: temp folders of a killed checkpoint writer are cleaned at the next write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_utils import train_cfg
from vla.datasets import EpisodeStore, EpisodeWriter, WindowDataset
from vla.datasets.layout import chunk_file, open_group

from vla import checkpoint as ckpt
from vla.training import Trainer, guard, train
from vla.training import distributed as dist_utils

N_EP, LEN = 6, 12
BAD = 3  # the episode whose image chunk is damaged


def _store(path: Path) -> Path:
    """Six 12-step episodes with one image chunk per episode, so one damaged chunk is one episode."""
    rng = np.random.default_rng(0)
    w = EpisodeWriter(path, env="synthetic", fps=10, cameras={"cam0": (16, 16)}, action_dim=3, state_dim=2,
                      image_chunk_frames=LEN)
    with w:
        for e in range(N_EP):
            t = np.linspace(0, 1, LEN, dtype=np.float32)[:, None]
            w.add_episode(action=np.cos(np.pi * t * np.arange(1, 4)).astype(np.float32),
                          state=np.concatenate([t, t], 1) + 0.1 * e,
                          images={"cam0": rng.integers(0, 256, (LEN, 16, 16, 3), dtype=np.uint8)},
                          subtasks=["go"] * 6 + ["stop"] * 6, instruction="do reach", task="reach", seed=e)
    return path


def _damage(path: Path, episode: int = BAD) -> None:
    group, _ = open_group(path, read_only=True)
    f = chunk_file(path, group["data/images/cam0"], episode)
    data = bytearray(f.read_bytes())
    data[10:210] = np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8).tobytes()
    f.write_bytes(bytes(data))


@pytest.fixture
def bad_store(tmp_path):
    p = _store(tmp_path / "bad.zarr")
    _damage(p)
    return p


COMMON = ["trainer.steps=8", "trainer.batch_size=4", "trainer.ckpt_every=1", "trainer.keep_last=0",
          "trainer.log_every=1"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_guarded_batch_replaces_the_unreadable_episode_and_reports_it(bad_store):
    ds = WindowDataset(EpisodeStore(bad_store), n_obs_steps=1, horizon=4)
    g = guard.GuardedWindows(ds, "skip")
    idx = [0, BAD * LEN + 2, BAD * LEN + 5, 20]  # two windows of the damaged episode
    batch = g.__getitems__(idx)
    assert len(batch) == 4 and BAD not in batch.arrays["episode"].tolist()
    assert batch.arrays["episode"][0] == 0 and batch.arrays["episode"][3] == 1  # the readable ones stay
    [(ep, why)] = batch.arrays["corrupt"]
    assert ep == BAD and "data/images/cam0 chunk 3" in why and "episodes 3" in why
    again = g.__getitems__(idx)  # known now: refilled the same way, not reported twice
    assert again.arrays["episode"].tolist() == batch.arrays["episode"].tolist() and again.arrays["corrupt"] == []
    with pytest.raises(guard.CorruptDataError, match=r"batch of episodes 0-1, 3 cannot be read: .*chunk 3"):
        guard.GuardedWindows(ds, "stop").__getitems__(idx)
    with pytest.raises(ValueError, match=r"dataset.on_corrupt must be one of \['skip', 'stop'\], got 'maybe'"):
        guard.GuardedWindows(ds, "maybe")


def test_corrupt_chunk_skip_trains_on_and_counts_the_skipped_episode(bad_store, tmp_path):
    run = tmp_path / "run"
    # in_memory=true meets the damage at open; skip falls back to reading images from disk.
    train(train_cfg(bad_store, run, *COMMON, "dataset.on_corrupt=skip", "dataset.in_memory=true"))
    assert ckpt.resolve_checkpoint(run).name == "step_0000008"
    log = (run / "train.log").read_text()
    assert "on_corrupt=skip" in log and "images read from disk" in log
    assert f"skip episode={BAD} " in log and "data/images/cam0 chunk 3" in log
    skipped = [m["skipped_episodes"] for m in _metrics(run) if m["split"] == "train"]
    assert skipped[-1] == 1 and skipped == sorted(skipped)  # counted once, never forgotten


def test_corrupt_chunk_stop_leaves_a_checkpoint_and_names_the_episode(bad_store, tmp_path):
    run = tmp_path / "run"
    args = [*COMMON, "dataset.in_memory=false", "seed=7"]  # seed 7: the damaged episode first comes in step 3
    with pytest.raises(guard.CorruptDataError) as ei:
        train(train_cfg(bad_store, run, *args))
    msg = str(ei.value)
    assert msg.startswith("step 3: corrupt training data: a batch of episodes ")
    assert "data/images/cam0 chunk 3 (rows 36-47, episodes 3) is corrupt" in msg and "dataset.on_corrupt=skip" in msg
    assert f"checkpoint of step 2 in {run / 'checkpoints'}" in msg
    d = ckpt.resolve_checkpoint(run)
    assert d.name == "step_0000002" and ckpt.load_trainer_state(d)["step"] == 2
    assert "stop step 3: corrupt training data" in (run / "train.log").read_text()
    # ... and the run resumes past the damage with skip.
    train(train_cfg(bad_store, run, *args, "dataset.on_corrupt=skip", f"resume={run}"))
    assert ckpt.resolve_checkpoint(run).name == "step_0000008"
    assert _metrics(run)[-1]["skipped_episodes"] == 1


def test_corrupt_chunk_in_memory_stop_fails_at_open_naming_the_episodes(bad_store, tmp_path):
    with pytest.raises(ValueError, match=r"data/images/cam0 chunk 3 \(rows 36-47, episodes 3\) is corrupt"):
        train(train_cfg(bad_store, tmp_path / "run", *COMMON))


def _run_with_fault(store: Path, run: Path, fault):
    """Train with ``fault(trainer, batch, step)`` applied to each prepared batch; return the exception."""
    info = dist_utils.init("cpu")
    trainer = Trainer(train_cfg(store, run, *COMMON), info)
    prepare = trainer._prepare

    def faulty(raw, step):
        batch = prepare(raw, step)
        fault(trainer, batch, step)
        return batch

    trainer._prepare = faulty
    with pytest.raises(guard.NonFiniteError) as ei:
        trainer.run(run)
    return trainer, str(ei.value)


def _finite_checkpoint(run: Path, step: int) -> None:
    d = ckpt.resolve_checkpoint(run)
    assert d.name == ckpt.step_dirname(step)
    assert not (run / "checkpoints" / ckpt.step_dirname(step + 1)).exists()
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(t).all() for t in ckpt.load_tensors(d / name).values())


@pytest.fixture
def store(tmp_path):
    return _store(tmp_path / "ok.zarr")


def test_nan_loss_stops_naming_step_and_episodes_after_the_last_good_checkpoint(store, tmp_path):
    def nan_state(trainer, batch, step):
        if step == 3:
            batch["state"] = torch.full_like(batch["state"], float("nan"))

    run = tmp_path / "run"
    trainer, msg = _run_with_fault(store, run, nan_state)
    assert msg.startswith("step 3: the loss is nan") and "batch episodes " in msg
    eps = msg.split("batch episodes ")[1].split(";")[0]
    assert eps and eps[0].isdigit()
    _finite_checkpoint(run, 3)
    assert trainer.step == 3 and all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_nan_gradient_stops_before_the_optimizer_step(store, tmp_path):
    def nan_grad(trainer, batch, step):
        if step == 2:
            p = next(trainer.raw_model.parameters())
            p.register_hook(lambda g: torch.full_like(g, float("inf")))

    run = tmp_path / "run"
    trainer, msg = _run_with_fault(store, run, nan_grad)
    assert msg.startswith("step 2: the gradient norm is ") and "optimizer step was not taken" in msg
    _finite_checkpoint(run, 2)
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_non_finite_weights_are_never_checkpointed(store, tmp_path):
    info = dist_utils.init("cpu")
    trainer = Trainer(train_cfg(store, tmp_path / "run", *COMMON), info)
    trainer.save(tmp_path / "run")
    with torch.no_grad():
        next(trainer.raw_model.parameters())[0] = float("nan")
    trainer.step = 1
    with pytest.raises(guard.NonFiniteError, match=r"step 1: the live weights hold non-finite values in \['"):
        trainer.save(tmp_path / "run")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_0000000"]


def test_stale_temp_folders_of_a_killed_writer_are_removed_at_the_next_write(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = root / f".tmp_step_0000004_{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (root / f".last_{dead_pid}").write_text("step_0000004\n")
    (root / f".prune_step_0000001_{dead_pid}").mkdir()  # killed while pruning step 1
    live = root / ".tmp_step_0000009_1"  # pid 1 is alive: a writer still at work keeps its folder
    live.mkdir()
    t = {"w": torch.ones(2)}
    ckpt.save_checkpoint(root, 5, model_state=t, ema_state=None, config={"model": {}}, normalizer={},
                         tokenizer={}, trainer_state={"step": 5})
    names = sorted(p.name for p in root.iterdir())
    assert names == [".tmp_step_0000009_1", "last", "step_0000005"]


# -- the disk path (issue 16 item 3): chunk-local order through a cache of decoded chunks ---------


def test_choose_source_says_why():
    from vla.training.chunk_loader import choose_source

    assert choose_source("auto", 10 << 30, 64 << 30) == (True, "auto: images 10.00 GiB, memory available 64.00 GiB: "
                                                          "the images fit in 50% of it")
    mem, why = choose_source("auto", 40 << 30, 64 << 30)
    assert not mem and "more than 50% of it, so images are read from disk chunk by chunk" in why
    assert choose_source(False, 1, 1 << 40)[0] is False and choose_source("true", 1 << 40, 1)[0] is True
    with pytest.raises(ValueError, match="dataset.in_memory must be true, false or auto, got 'maybe'"):
        choose_source("maybe", 1, 1)


def test_chunk_local_order_is_a_seeded_permutation_that_resumes(store):
    from vla.training.chunk_loader import ChunkLocalBatchSampler
    from vla.training.data_order import DataPosition

    ds = WindowDataset(EpisodeStore(store), n_obs_steps=1, horizon=4)
    s = ChunkLocalBatchSampler(ds._row, 4, batch_size=4, world_size=1, rank=0, seed=5, span_chunks=2, buffer_spans=2)
    p0, p1 = s.permutation(0), s.permutation(1)
    assert sorted(p0.tolist()) == list(range(len(ds))) and not torch.equal(p0, p1)
    assert torch.equal(p0, ChunkLocalBatchSampler(ds._row, 4, 4, 1, 0, 5, 2, 2).permutation(0))
    # Each shuffle buffer (2 spans of 2 chunks of 4 rows) holds windows of at most 2 spans.
    spans = ds._row[p0.numpy()] // 8
    first = set(spans[: 16].tolist())
    assert len(first) <= 2
    it = iter(s)
    batches = [next(it) for _ in range(20)]  # crosses into epoch 2
    s.start = DataPosition(1, 3)
    it = iter(s)
    assert [next(it) for _ in range(20 - 3 - s.batches_per_epoch)] == batches[s.batches_per_epoch + 3:]


def test_chunk_cache_reads_what_the_store_reads_decoding_each_chunk_once(store):
    from vla.training.chunk_loader import cached_windows

    st = EpisodeStore(store)
    ds = WindowDataset(st, n_obs_steps=2, horizon=4)
    cds = cached_windows(ds, capacity_chunks=100)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, len(ds), 9).tolist()
        a, b = ds.__getitems__(idx).arrays, cds.__getitems__(idx).arrays
        assert np.array_equal(a["images"]["cam0"], b["images"]["cam0"])
        assert np.array_equal(a["future_image"], b["future_image"])
    assert cds.store.decoded == N_EP  # one chunk per episode here, each decoded once
    tiny = cached_windows(ds, capacity_chunks=1)  # a batch needing more chunks than the cache holds
    idx = list(range(0, len(ds), 5))
    got, want = tiny.__getitems__(idx).arrays, ds.__getitems__(idx).arrays
    assert np.array_equal(got["images"]["cam0"], want["images"]["cam0"])
    assert len(tiny.store._cache) == 1
    with pytest.raises(ValueError, match="unknown camera 'nope'"):
        cds.store.read_frames("nope", [0])


def test_disk_training_says_so_and_resumes_exactly(store, tmp_path):
    common = [*COMMON, "dataset.in_memory=false", "trainer.ckpt_every=0", "trainer.steps=7"]
    full, split = tmp_path / "full", tmp_path / "split"
    train(train_cfg(store, full, *common))
    assert "data: disk (chunk-local order, a shuffle buffer of chunks); dataset.in_memory=false" in (
        full / "train.log").read_text()
    train(train_cfg(store, split, *common, "trainer.stop_at=3"))
    train(train_cfg(store, split, *common, f"resume={split}"))
    assert ckpt.load_trainer_state(ckpt.resolve_checkpoint(split))["data"]["order"] == "chunked"
    a = ckpt.load_tensors(full / "checkpoints" / "step_0000007" / "model.safetensors")
    b = ckpt.load_tensors(split / "checkpoints" / "step_0000007" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    auto = tmp_path / "auto"
    train(train_cfg(store, auto, *COMMON, "trainer.steps=1"))
    assert "data: memory; auto: images 0.00 GiB" in (auto / "train.log").read_text()


def test_corrupt_validation_episode_is_skipped_or_stops(bad_store, tmp_path):
    # The damaged episode 3 is held out with 4 and 5 (val_episodes=3): validation meets it.
    args = [*COMMON, "dataset.in_memory=false", "dataset.val_episodes=3", "trainer.val_every=2", "trainer.steps=4"]
    train(train_cfg(bad_store, tmp_path / "skip", *args, "dataset.on_corrupt=skip"))
    assert ckpt.resolve_checkpoint(tmp_path / "skip").name == "step_0000004"
    assert any(m["split"] == "val" for m in _metrics(tmp_path / "skip"))
    with pytest.raises(guard.CorruptDataError, match=r"data/images/cam0 chunk 3 .*checkpoint of step 2 in"):
        train(train_cfg(bad_store, tmp_path / "stop", *args))
    assert ckpt.resolve_checkpoint(tmp_path / "stop").name == "step_0000002"
