"""Multi-task training and evaluation: task-balanced draws, per-task metrics, eval_info keys, the
instruction override and splits, and the main job's script in a smoke configuration."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vla.training.data_order import ResumableBatchSampler, task_balance_weights
from vla.training.metrics import MeanAccumulator, per_task_means

ROOT = Path(__file__).resolve().parents[1]


def _draws(tasks: list[str], weights, batches: int = 400) -> Counter:
    sampler = ResumableBatchSampler(len(tasks), 50, 1, 0, seed=3, weights=weights)
    it = iter(sampler)
    return Counter(tasks[i] for _ in range(batches) for i in next(it))


def test_task_balanced_draws_give_every_task_the_same_share():
    tasks = ["a"] * 100 + ["b"] * 300 + ["c"] * 600  # 10% / 30% / 60% of the windows
    w = task_balance_weights(tasks)
    assert w.shape == (1000,) and torch.isclose(w[:100].sum(), w[100:400].sum())
    balanced = _draws(tasks, w)
    n = sum(balanced.values())
    for t in "abc":
        assert abs(balanced[t] / n - 1 / 3) < 0.02, balanced
    plain = _draws(tasks, None)  # uniform over windows: the store's proportions
    assert abs(plain["a"] / n - 0.1) < 0.02 and abs(plain["c"] / n - 0.6) < 0.02


def test_subtask_balanced_draws_give_every_stage_of_every_task_the_same_share(tmp_path):
    from vla.datasets import EpisodeStore, EpisodeWriter, WindowDataset

    from vla.training.data_order import sample_weights

    w = EpisodeWriter(tmp_path / "s.zarr", env="synthetic", fps=10, cameras={"c": (8, 8)}, action_dim=2, state_dim=1)
    # short: stages of 6 and 2 rows; long: 4 stages (a label may come back: a, b, a is three stages)
    episodes = {"short": ["a"] * 6 + ["b"] * 2, "long": ["a"] * 2 + ["b"] * 3 + ["a"] * 4 + ["c"]}
    for e, (task, subtasks) in enumerate(list(episodes.items()) * 2):
        n = len(subtasks)
        w.add_episode(action=np.zeros((n, 2), np.float32), state=np.zeros((n, 1), np.float32),
                      images={"c": np.zeros((n, 8, 8, 3), np.uint8)}, subtasks=subtasks, instruction=task,
                      task=task, seed=e)
    w.close()
    ds = WindowDataset(EpisodeStore(tmp_path / "s.zarr"))
    assert ds.sample_stages.tolist() == ([0] * 6 + [1] * 2 + [0] * 2 + [1] * 3 + [2] * 4 + [3]) * 2
    weights = sample_weights({"balance": "subtask"}, ds)
    groups = list(zip(ds.sample_tasks, ds.sample_stages.tolist(), strict=True))
    draws = Counter(groups[i] for i in torch.multinomial(weights, 60000, replacement=True).tolist())
    assert len(draws) == 6  # (short, 0..1) and (long, 0..3): each a sixth of the draws
    for g, n in draws.items():
        assert abs(n / 60000 - 1 / 6) < 0.01, (g, n)
    task_only = sample_weights({"balance": "task"}, ds)  # by task alone the 1-row last stage is rare
    share = task_only[groups.index(("long", 3))] / task_only.sum()
    assert abs(float(share) - 0.5 / 20) < 1e-12
    assert sample_weights({"balance": "none"}, ds) is None
    with pytest.raises(ValueError, match=r"balance: expected one of \['none', 'task', 'subtask'\], got 'stage'"):
        sample_weights({"balance": "stage"}, ds)


def test_balanced_sampler_is_resumable_and_checks_weights():
    from vla.training.data_order import DataPosition

    tasks = ["a"] * 10 + ["b"] * 30
    w = task_balance_weights(tasks)
    full = ResumableBatchSampler(40, 4, 1, 0, seed=1, weights=w)
    it = iter(full)
    batches = [next(it) for _ in range(15)]  # crosses an epoch (10 batches per epoch)
    resumed = iter(ResumableBatchSampler(40, 4, 1, 0, seed=1, weights=w, start=DataPosition(epoch=1, position=2)))
    assert [next(resumed) for _ in range(3)] == batches[12:15]
    with pytest.raises(ValueError, match=r"sampler weights: expected 40 non-negative values .* got shape \(3,\)"):
        ResumableBatchSampler(40, 4, 1, 0, seed=1, weights=torch.ones(3))


def test_per_task_means_and_accumulator_count_each_key_separately():
    m = per_task_means(["a", "b", "a"], torch.tensor([1.0, 4.0, 3.0]))
    assert m == {"action_loss/a": 2.0, "action_loss/b": 4.0}
    acc = MeanAccumulator()
    acc.add({"loss": 1.0, "action_loss/a": 2.0})
    acc.add({"loss": 3.0})  # no sample of task a in this batch
    assert acc.means() == {"loss": 2.0, "action_loss/a": 2.0}


def test_training_logs_per_task_losses_with_balance(tmp_path):
    from train_utils import make_store, train_cfg

    from vla.training.loop import train

    store = make_store(tmp_path / "s.zarr", episodes=4, length=10)
    run = train(train_cfg(store, tmp_path / "run", "dataset.balance=subtask", "trainer.steps=3", "trainer.log_every=1"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert any("action_loss/reach" in r and "action_loss/push" in r for r in train_rows)
    info = json.loads((run / "run_info.json").read_text())
    assert info["steps"] == 3 and info["params"] > 0 and info["flops_per_chunk"] > 0 and info["wall_s"] > 0
    assert info["eval_s"] == 0.0  # no closed-loop evaluation inside this run (wall_s is training only)
    from vla.config import compose

    with pytest.raises(ValueError, match=r"dataset.balance: expected one of \[.*\], got 'families'"):
        train(compose("train", [f"dataset.path={store}", f"run_dir={tmp_path / 'bad'}", "trainer=debug",
                                "dataset.balance=families"]))


def test_eval_info_has_lerobot_keys_both_overall_rates_and_the_instruction():
    from vla.policies import ExpertPolicy

    from vla.evaluation import format_table, run_evaluation

    res = run_evaluation(ExpertPolicy("tabletop"), "tabletop", ["drawer-open", "drawer-close"], 2, n_envs=1,
                         env_kwargs={"cameras": ()}, progress=False, instruction="please open it up")
    assert [e["instruction"] for e in res["episodes"]] == ["please open it up"] * 4
    assert res["instruction"] == "please open it up"
    pe = res["per_episode"]
    assert [p["episode_ix"] for p in pe] == [0, 1, 2, 3]
    assert [p["seed"] for p in pe] == [e["seed"] for e in res["episodes"]]
    assert all(set(p) >= {"episode_ix", "success", "seed", "sum_reward"} for p in pe)
    assert all(p["sum_reward"] >= 1.0 for p in pe if p["success"])  # reward 1 on success steps
    for e in res["episodes"]:  # the expert finishes its one-step plan: progress 1/1
        assert (e["subtasks_done"], e["num_subtasks"]) == ((1, 1) if e["success"] else (e["subtasks_done"], 1))
    assert res["per_task"]["drawer-open"]["mean_subtask_progress"] == pytest.approx(
        np.mean([e["subtasks_done"] for e in res["episodes"] if e["task"] == "drawer-open"]))
    agg = res["aggregated"]
    assert agg["pc_success"] == pytest.approx(100 * res["overall"]["success_rate"])
    assert agg["eval_s"] > 0 and agg["eval_ep_s"] == pytest.approx(agg["eval_s"] / 4)
    rates = [res["per_task"][t]["success_rate"] for t in ("drawer-open", "drawer-close")]
    assert res["mean_over_tasks"] == pytest.approx(np.mean(rates))
    table = format_table(res)
    assert "overall (pooled)" in table and "mean over tasks" in table
    with pytest.raises(ValueError, match="instruction_split: expected one of"):
        run_evaluation(ExpertPolicy("tabletop"), "tabletop", ["drawer-open"], 1, instruction_split="heldout")


def test_all_split_mixes_templates_over_training_objects():
    from vla.envs.tabletop import tasks as T

    seen = set()
    for seed in range(40):
        ep = T.sample_episode("pick-place", np.random.default_rng(seed), "all")
        assert not any((c, s) in T.HELD_OUT for c, s in zip(ep.colors, ep.shapes))
        seen.add(ep.instruction.split()[0])
    assert {"could", "the"} & seen and {"put", "place", "pick", "move"} & seen  # eval and train templates


def test_main_job_script_in_a_smoke_configuration(tmp_path):
    # drawer-open has no goal frames (its plan starts by closing the gripper): the script leaves it out of them
    env = dict(os.environ, SKIP_SETUP="1", FAMILIES="pick-place,pick-place-two,drawer-open", EPISODES="1", IMAGE="32",
               STEPS="2", EVAL_EPISODES="1", OUT=str(tmp_path / "demo"), GOAL_FRAMES="8",
               TRAIN_ARGS="model.d_model=32 model.n_layers=1 model.action_width=16 trainer.ckpt_every=0",
               PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if not (ROOT / ".venv" / "bin" / "vla").exists():
        pytest.skip("the scripts run from .venv (made by scripts/setup.sh)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    info = json.loads((tmp_path / "demo" / "eval" / "eval_info.json").read_text())
    assert sorted(info["tasks"]) == ["drawer-open", "pick-place", "pick-place-two"]
    assert info["instruction_split"] == "paraphrase"
    assert len(info["per_episode"]) == 3 and len(info["videos"]) == 3
    assert "overall (pooled)" in proc.stdout and "mean over tasks" in proc.stdout
    from vla.datasets.goal_frames import GoalFrames

    goal_frames = GoalFrames(tmp_path / "demo" / "goal_frames.zarr")  # the goal frames joined training
    assert sorted(set(goal_frames.tasks)) == ["pick-place", "pick-place-two"] and len(goal_frames) == 16
    train_cfg = (tmp_path / "demo" / "train" / "config.yaml").read_text()
    assert "goal_frames.zarr" in train_cfg and "goal_patch_loss_weight: 0.3" in train_cfg
    assert "actions_read_plan: false" in train_cfg and "planner: true" in train_cfg  # planner=side
    assert "  lr: 0.001\n" in train_cfg and "balance: subtask" in train_cfg  # the recipe's schedule and draws
    assert "  plan_rows: 8\n" in train_cfg and "  flow_samples: 2\n" in train_cfg  # and its step
    from vla.training.distributed import cpu_has_native_bf16

    # SMALL_BATCH=auto: half batches where training runs fp32 (no native bf16), the recipe's 32 + 16 elsewhere
    small = not cpu_has_native_bf16()
    assert f"  batch_size: {16 if small else 32}\n" in train_cfg
    assert f"  goal_frames_batch: {8 if small else 16}\n" in train_cfg
    assert ("batches of 16 (no native bf16" in proc.stdout) == small
    budget = [ln for ln in train_cfg.splitlines() if ln.strip().startswith("time_budget_s:")]
    assert len(budget) == 1 and 60 <= int(budget[0].split(":")[1]) <= 870  # what is left of the 870 s
