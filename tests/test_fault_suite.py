"""The fault suite (issue 18 item 4): kill -9 at a random point of `vla collect`, of `vla train`
(the resumed run must reach the uninterrupted run's final weights), and during checkpoint writes,
and random corruption of 50 chunks across the arrays of a store. The server fuzzer is
tests/test_server_fuzz.py. Each trial checks its bound: nothing committed is lost, every damaged
chunk is reported, repair removes exactly the episodes the damage covers.

The tests run one or two trials each; the figures in docs/reliability.md come from running
this file as a script, which runs many and prints the counts:

    MUJOCO_GL=egl .venv/bin/python tests/test_fault_suite.py --trials 10
    .venv/bin/python tests/test_fault_suite.py --trials 10 --only corruption --store-episodes 150
    .venv/bin/python tests/test_fault_suite.py --trials 10 --only train --out train_kill.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from store_helpers import make_episode, open_writer  # noqa: E402
from vla.datasets import EpisodeStore, verify_store  # noqa: E402
from vla.datasets.layout import chunk_file, data_arrays, iter_chunk_slices, meta_arrays, open_group  # noqa: E402


def _committed(path: Path) -> int:
    """Episodes committed so far, read from outside while a writer may be running."""
    try:
        return EpisodeStore(path).num_episodes
    except Exception:  # not created yet, or caught between two atomic file writes
        return -1


def _collect_cmd(out: Path, episodes: int) -> list[str]:
    return [sys.executable, "-m", "vla", "collect", "env=metaworld", "tasks=[reach-v3]", f"episodes={episodes}",
            "workers=0", "image_size=16", "cameras=[topview]", f"out={out}", "progress=false"]


def collect_kill_trial(tmp: Path, rng: np.random.Generator) -> dict:
    """Start `vla collect`, wait until it has committed at least one episode, SIGKILL it after a
    random further delay, then check the store and that the next collect appends cleanly."""
    out = tmp / "c.zarr"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.Popen(_collect_cmd(out, 30), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = -1
    try:
        deadline = time.monotonic() + 120
        while seen < 1:
            if proc.poll() is not None:
                raise AssertionError(f"collect exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("collect committed no episode in 120 s")
            time.sleep(0.05)
            seen = _committed(out)
        time.sleep(float(rng.uniform(0.0, 3.0)))
        seen = max(seen, _committed(out))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = EpisodeStore(out)
    kept = s.num_episodes
    for i in range(kept):  # every committed episode reads back whole
        ep = s.get_episode(i)
        assert len(ep["action"]) == len(ep["images"]["topview"]) == len(ep["subtasks"])
    rep = verify_store(out)
    assert rep["damaged_chunks"] == [], rep["problems"]
    leftovers = not rep["ok"]  # orphans / torn entry of the killed episode: crash leftovers only
    r = subprocess.run(_collect_cmd(out, 1), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = EpisodeStore(out)
    seeds = after.episode_seeds.tolist()
    appended_ok = after.num_episodes == kept + 1 and len(set(seeds)) == len(seeds) and verify_store(out)["ok"]
    return {"seen_before_kill": seen, "kept": kept, "lost_committed": max(0, seen - kept),
            "crash_leftovers": leftovers, "appended_ok": appended_ok}


CKPT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from vla.checkpoint import save_checkpoint
    root = sys.argv[1]
    for step in range(1, 10_000):
        w = torch.full((512, 1024), float(step))  # 2 MiB per tensor: writes take a while
        save_checkpoint(root, step, model_state={"w": w}, ema_state={"w": w * 0.5}, config={"model": {}},
                        normalizer={}, tokenizer={}, trainer_state={"step": step}, keep_last=2)
        print(step, flush=True)
    """
)


def checkpoint_kill_trial(tmp: Path, rng: np.random.Generator) -> dict:
    """SIGKILL a process that writes checkpoints back to back at a random time; the checkpoint
    that ``last`` names (or the newest complete one) must load, with the weights of its step, and
    the next write must clean the killed writer's temp folder."""
    import torch

    from vla import checkpoint as ckpt

    root = tmp / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", CKPT_SCRIPT, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.strip() == "1", proc.stderr.read()[-2000:]
        time.sleep(float(rng.uniform(0.0, 1.5)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step_dir = ckpt.resolve_checkpoint(root)
    step = int(step_dir.name[5:])
    w = ckpt.load_tensors(step_dir / "model.safetensors")["w"]
    ema = ckpt.load_tensors(step_dir / "ema.safetensors")["w"]
    assert float(w.min()) == float(w.max()) == step and float(ema.max()) == step * 0.5
    assert ckpt.load_trainer_state(step_dir)["step"] == step
    incomplete = [p.name for p in ckpt.list_checkpoints(root)
                  if any(not (p / f).is_file() for f in ckpt.FILES)]
    temp = [p.name for p in root.iterdir() if p.name.startswith(".")]
    # The run's next write removes the killed writer's temp folder (its pid is gone).
    w = torch.zeros(1)
    ckpt.save_checkpoint(root, step + 1, model_state={"w": w}, ema_state=None, config={"model": {}}, normalizer={},
                         tokenizer={}, trainer_state={"step": step + 1}, keep_last=2)
    after = [p.name for p in root.iterdir() if p.name.startswith(".")]
    return {"loaded_step": step, "incomplete_step_dirs": incomplete, "temp_leftovers": temp,
            "temp_after_next_write": after}


TRAIN_STEPS = 60
TRAIN_ARGS = ["trainer=debug", "device=cpu", f"trainer.steps={TRAIN_STEPS}", "trainer.batch_size=8",
              "trainer.warmup_steps=2", "trainer.ckpt_every=1", "trainer.keep_last=2", "trainer.log_every=1",
              "trainer.ema_decay=0.9", "trainer.num_threads=1"]


def _train_cmd(store: Path, run: Path, *extra: str) -> list[str]:
    from train_utils import TINY

    return [sys.executable, "-m", "vla", "train", f"dataset.path={store}", f"run_dir={run}", *TRAIN_ARGS, *TINY,
            *extra]


def _train_reference(tmp: Path) -> tuple[Path, dict]:
    """The store and the final weights of an uninterrupted run (the same command, never killed)."""
    from train_utils import make_store

    from vla import checkpoint as ckpt

    store = make_store(tmp / "store.zarr", episodes=3, length=12)
    ref = tmp / "reference"
    r = subprocess.run(_train_cmd(store, ref), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    step_dir = ckpt.resolve_checkpoint(ref)
    return store, {n: ckpt.load_tensors(step_dir / n) for n in ("model.safetensors", "ema.safetensors")}


def _last_logged_step(run: Path) -> int:
    """The last step `vla train` logged to metrics.jsonl (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def train_kill_trial(tmp: Path, rng: np.random.Generator, reference: tuple[Path, dict]) -> dict:
    """SIGKILL `vla train` at a random time after its first checkpoint, resume it to the end, and
    compare the final live and EMA weights with the uninterrupted run's."""
    import torch

    from vla import checkpoint as ckpt

    store, want = reference
    run = tmp / "run"
    proc = subprocess.Popen(_train_cmd(store, run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finished_first = False
    try:
        # Kill at a random step well before the end: a random wall-clock delay let a fast (idle)
        # machine finish all steps before the kill, and then nothing was left to resume.
        target = int(rng.integers(1, TRAIN_STEPS - 15))
        deadline = time.monotonic() + 300
        while _last_logged_step(run) < target:
            if proc.poll() is not None:
                raise AssertionError(f"train exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"train did not reach step {target} in 300 s")
            time.sleep(0.005)
        finished_first = proc.poll() is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = int(ckpt.resolve_checkpoint(run).name[5:])  # the checkpoint the resume starts from
    temp_before = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
    if killed_at < TRAIN_STEPS:  # else the run ended before the kill: nothing to resume
        r = subprocess.run(_train_cmd(store, run, f"resume={run}"), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
    final = ckpt.resolve_checkpoint(run)
    max_diff = 0.0
    for name, ref in want.items():
        got = ckpt.load_tensors(final / name)
        assert got.keys() == ref.keys()
        max_diff = max(max_diff, *(float((got[k] - ref[k]).abs().max()) for k in ref))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    temp_after = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
    return {"resumed_from_step": killed_at, "finished_before_kill": finished_first, "final_step": int(final.name[5:]),
            "same_final_weights": bool(max_diff <= 1e-6), "max_abs_diff": max_diff,
            "steps_logged_twice": len(steps) - len(set(steps)), "temp_left_by_kill": temp_before,
            "temp_after_resume": temp_after, "torch": torch.__version__}


def _corruption_store(path: Path, n: int = 60) -> list[dict]:
    eps = [make_episode(i, 20 + (i * 7) % 21, with_optional=True) for i in range(n)]
    with open_writer(path, image_chunk_frames=8) as w:
        for ep in eps:
            w.add_episode(**ep)
    return eps


def corruption_trial(tmp: Path, rng: np.random.Generator, n_chunks: int = 50, n_episodes: int = 60) -> dict:
    """Damage ``n_chunks`` distinct random chunks (half overwritten with random bytes, half
    deleted) across every array; verify must report each one, and repair must remove exactly
    the episodes the damaged data chunks hold, keeping every other episode identical."""
    path = tmp / "s"
    eps = _corruption_store(path, n_episodes)
    group, attrs = open_group(path, read_only=True)
    arrays = {**data_arrays(group, attrs), **meta_arrays(group), "meta/episode_ends": group["meta/episode_ends"]}
    ends = np.asarray(group["meta/episode_ends"][:])
    candidates = [(name, i, lo, hi) for name, a in arrays.items() for i, lo, hi in iter_chunk_slices(a)]
    picked = [candidates[j] for j in rng.choice(len(candidates), size=n_chunks, replace=False)]
    covered: set[int] = set()
    for k, (name, i, lo, hi) in enumerate(picked):
        f = chunk_file(path, arrays[name], i)
        if k % 2:
            f.unlink()
        else:
            data = bytearray(f.read_bytes())
            at = int(rng.integers(0, max(1, len(data) - 64)))
            data[at:at + 64] = rng.integers(0, 256, size=len(data[at:at + 64]), dtype=np.uint8).tobytes()
            f.write_bytes(bytes(data))
        if name.startswith("data/"):
            covered.update(int(e) for e in range(len(ends)) if (ends[e - 1] if e else 0) < hi and ends[e] > lo)
    rep = verify_store(path)
    found = {(c["array"], c["chunk"]) for c in rep["damaged_chunks"]}
    want = {(name, i) for name, i, _, _ in picked}
    rep2 = verify_store(path, repair=True, force=True)
    s = EpisodeStore(path)
    kept = [i for i in range(len(eps)) if i not in covered]
    identical = s.num_episodes == len(kept)
    for j, i in enumerate(kept if identical else []):
        got = s.get_episode(j)
        identical &= bool(np.array_equal(got["action"], eps[i]["action"]) and got["seed"] == eps[i]["seed"]
                          and all(np.array_equal(got["images"][c], eps[i]["images"][c]) for c in eps[i]["images"]))
    return {"damaged": n_chunks, "reported": len(found & want), "false_reports": len(found - want),
            "episodes_covered": len(covered), "episodes_removed": len(rep2["removed_episodes"]),
            "removed_exactly_covered": sorted(rep2["removed_episodes"]) == sorted(covered),
            "rest_identical": identical, "ok_after_repair": rep2["ok"], "of_episodes": len(eps)}


# -- tests (a few trials; the script below runs many) -----------------------------------------


def test_kill_during_collect_keeps_every_committed_episode(tmp_path):
    r = collect_kill_trial(tmp_path, np.random.default_rng(0))
    assert r["lost_committed"] == 0 and r["kept"] >= r["seen_before_kill"] >= 1
    assert r["appended_ok"]


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    for seed in range(2):
        r = checkpoint_kill_trial(tmp_path / str(seed), np.random.default_rng(seed))
        assert r["loaded_step"] >= 1 and r["incomplete_step_dirs"] == [] and r["temp_after_next_write"] == []


def test_kill_during_training_resumes_to_the_same_final_weights(tmp_path):
    ref = _train_reference(tmp_path)
    for seed in range(2):
        r = train_kill_trial(tmp_path / str(seed), np.random.default_rng(seed), ref)
        assert r["final_step"] == TRAIN_STEPS and r["same_final_weights"], r
        assert 1 <= r["resumed_from_step"] < TRAIN_STEPS, r  # the kill landed mid-run
        assert r["temp_after_resume"] == []


def test_fifty_corrupt_chunks_are_all_reported_and_repair_loses_only_their_episodes(tmp_path):
    r = corruption_trial(tmp_path, np.random.default_rng(0))
    assert r["reported"] == 50 and r["false_reports"] == 0
    assert r["removed_exactly_covered"] and r["rest_identical"] and r["ok_after_repair"]


def summarize(kind: str, rows: list[dict]) -> str:
    """One line of figures per fault kind (what docs/reliability.md quotes)."""
    n = len(rows)
    if kind == "train":
        same = sum(r["same_final_weights"] for r in rows)
        steps = sorted(r["resumed_from_step"] for r in rows)
        left = sum(bool(r["temp_left_by_kill"]) for r in rows)
        return (f"train: {same}/{n} resumed runs reached the uninterrupted run's final weights (max abs diff "
                f"{max(r['max_abs_diff'] for r in rows):.1e}); resumed from steps {steps}; {left}/{n} kills left a "
                f"temp folder, {sum(bool(r['temp_after_resume']) for r in rows)}/{n} still there after the resume")
    if kind == "checkpoint":
        return (f"checkpoint: {n}/{n} loadable at steps {sorted(r['loaded_step'] for r in rows)}; "
                f"{sum(bool(r['incomplete_step_dirs']) for r in rows)} incomplete step folders; "
                f"{sum(bool(r['temp_leftovers']) for r in rows)}/{n} kills left a temp folder, "
                f"{sum(bool(r['temp_after_next_write']) for r in rows)}/{n} still there after the next write")
    return f"{kind}: {n} trials"


def main() -> None:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--only", choices=("collect", "checkpoint", "corruption", "train"), default=None)
    p.add_argument("--store-episodes", type=int, default=60, help="episodes of the store the corruption trials damage")
    p.add_argument("--out", type=Path, default=None, help="write every trial's figures here as JSON")
    args = p.parse_args()
    results: dict[str, list] = {"collect": [], "checkpoint": [], "corruption": [], "train": []}
    def corruption(tmp: Path, rng: np.random.Generator) -> dict:
        return corruption_trial(tmp, rng, n_episodes=args.store_episodes)

    with tempfile.TemporaryDirectory() as ref_dir:
        reference: list = []

        def train(tmp: Path, rng: np.random.Generator) -> dict:
            if not reference:  # one uninterrupted run serves every trial
                reference.append(_train_reference(Path(ref_dir)))
            return train_kill_trial(tmp, rng, reference[0])

        for kind, fn in (("collect", collect_kill_trial), ("checkpoint", checkpoint_kill_trial),
                         ("corruption", corruption), ("train", train)):
            if args.only and kind != args.only:
                continue
            for t in range(args.trials):
                with tempfile.TemporaryDirectory() as d:
                    r = fn(Path(d), np.random.default_rng(1000 + t))
                results[kind].append(r)
                print(kind, t, json.dumps(r), flush=True)
    for kind, rows in results.items():
        if rows:
            print(summarize(kind, rows))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
