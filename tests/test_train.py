"""`vla train`: the debug config end to end, checkpoints, load_policy_bundle, clear errors, overfitting."""

from __future__ import annotations

import json

import pytest
import torch
from train_utils import make_store, train_cfg

from vla import checkpoint as ckpt
from vla.cli import main as cli_main
from vla.training import Trainer, train


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "store.zarr")


def _metrics(run_dir, split="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_debug_trains_two_steps_checkpoints_and_resumes(store, tmp_path, capsys):
    run = tmp_path / "run"
    args = [f"dataset.path={store}", f"run_dir={run}", "trainer=debug", "device=cpu", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "model.head_dim=16", "model.horizon=4",
            "model.max_instruction_tokens=12", "model.max_plan_tokens=12"]
    assert cli_main(["train", *args]) == 0
    assert f"run dir: {run}" in capsys.readouterr().out
    step_dir = run / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(ckpt.FILES)
    assert (run / "checkpoints" / "last").read_text().strip() == "step_0000002"
    assert (run / "config.yaml").is_file() and list((run / "tb").glob("events.out.tfevents.*"))
    log = (run / "train.log").read_text()
    for key in ("loss=", "plan_loss=", "action_loss=", "lr=", "grad_norm=", "samples_per_s=", "data_wait_frac="):
        assert key in log
    cfg = ckpt.read_config(step_dir)
    assert cfg["step"] == 2 and cfg["model"]["action_dim"] == 3 and cfg["model"]["state_dim"] == 2
    assert cfg["model"]["cameras"] == ["cam0"] and cfg["train"]["trainer"]["steps"] == 2
    st = ckpt.load_trainer_state(step_dir)
    assert st["step"] == 2 and st["data"]["position"] == 2 and set(st["rng"][0]) >= {"python", "numpy", "torch"}
    assert len(st["optimizer"]["param_groups"]) == 2  # decay / no decay

    # Resume: continue the same run to step 4 (logs append, checkpoints continue).
    assert cli_main(["train", *[a for a in args if not a.startswith("run_dir")], f"resume={run}",
                     "trainer.steps=4"]) == 0
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert ckpt.resolve_checkpoint(run).name == "step_0000004"
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_0000002", "step_0000004"]


def test_load_policy_bundle_matches_the_trained_model(store, tmp_path):
    from vla.datasets import collate_windows

    cfg = train_cfg(store, tmp_path / "run", "trainer.steps=3", "trainer.ckpt_every=3", "trainer.ema_decay=0.5",
                    "dataset.val_episodes=1")
    from vla.training import distributed as dist_utils

    trainer = Trainer(cfg, dist_utils.init("cpu"))
    trainer.run(tmp_path / "run")
    raw = collate_windows(trainer.dataset.__getitems__([0, 5, 9]))
    batch = trainer.processor.training_batch(raw, "cpu")
    noise = torch.randn(3, 4, 3)
    live = trainer.raw_model.eval()
    for path, use_ema in ((tmp_path / "run", False), (tmp_path / "run" / "checkpoints", True),
                          (tmp_path / "run" / "checkpoints" / "step_0000003", True)):
        model, proc, conf = ckpt.load_policy_bundle(path, device="cpu", use_ema=use_ema)
        assert conf["step"] == 3 and not model.training
        b2 = proc.training_batch(raw, "cpu")
        assert all(torch.equal(batch[k], b2[k]) for k in batch)  # same normalizer and tokenizer
        with trainer.ema.swapped_into(trainer.model) if use_ema else torch.no_grad():
            want = live.sample(batch, noise=noise, decode_plan=True)
        got = model.sample(b2, noise=noise, decode_plan=True)
        assert torch.allclose(want["actions"], got["actions"], atol=1e-6)
        assert want["plan_text"] == got["plan_text"]
    assert len(trainer.dataset) == 24 and len(trainer.val_dataset) == 12  # the last episode is held out
    val = _metrics(tmp_path / "run", "val")
    assert [r["step"] for r in val] == [3] and val[0]["loss"] > 0
    # EMA and live weights differ after training with a decaying EMA.
    ema_w = ckpt.load_tensors(tmp_path / "run" / "checkpoints" / "step_0000003" / "ema.safetensors")
    live_w = ckpt.load_tensors(tmp_path / "run" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert any(not torch.equal(ema_w[k], live_w[k]) for k in live_w)


def test_checkpoint_carries_the_store_env_options_to_eval(tmp_path):
    """A store collected with layout=slots gives checkpoints whose policy rebuilds that layout in
    `vla eval`, unless the command line names another."""
    from vla.policies import VLAPolicy

    from vla.commands.eval import build_policy
    from vla.config import compose

    store = make_store(tmp_path / "slots.zarr", episodes=2, env_options={"layout": "slots"})
    train(train_cfg(store, tmp_path / "run", "trainer.steps=2"))
    assert ckpt.read_config(ckpt.resolve_checkpoint(tmp_path / "run"))["env_options"] == {"layout": "slots"}
    policy = VLAPolicy.from_checkpoint(tmp_path / "run", n_action_steps=4)
    assert policy.env_kwargs() == {"layout": "slots", "cameras": ("cam0",), "image_size": 16}
    assert policy.metadata()["env_options"] == {"layout": "slots"}
    base = [f"policy.checkpoint={tmp_path / 'run'}", "policy.n_action_steps=4", "env=tabletop", "tasks=[pick-place]"]
    _, env, tasks, kwargs = build_policy(compose("eval", base))
    assert (env, tasks, kwargs["layout"]) == ("tabletop", ["pick-place"], "slots")
    _, _, _, kwargs = build_policy(compose("eval", [*base, "env.layout=random"]))
    assert kwargs["layout"] == "random"


def test_a_checkpoint_copied_without_its_store_and_optimizer_state_still_evaluates(tmp_path):
    """The checkpoint records its store's env family and tasks, so `vla eval` needs neither the store
    nor env=/tasks= once the run dir is copied elsewhere; a step folder without trainer_state.pt loads
    as a policy (e.g. copied off a GPU machine without it) but cannot be resumed."""
    import shutil

    from vla.commands.eval import build_policy
    from vla.config import compose

    store = make_store(tmp_path / "s.zarr", episodes=2, tasks=("reach", "push"))
    train(train_cfg(store, tmp_path / "run", "trainer.steps=2"))
    step_dir = ckpt.resolve_checkpoint(tmp_path / "run")
    assert ckpt.read_config(step_dir)["store"] == {"env": "synthetic", "tasks": ["reach", "push"]}
    shutil.rmtree(store)
    (step_dir / "trainer_state.pt").unlink()
    args = [f"policy.checkpoint={tmp_path / 'run'}", "policy.n_action_steps=4"]
    _, env, tasks, _ = build_policy(compose("eval", args))
    assert (env, tasks) == ("synthetic", ["reach", "push"])
    with pytest.raises(ValueError, match=r"incomplete: missing \['trainer_state.pt'\]"):
        ckpt.resolve_checkpoint(tmp_path / "run")  # what resuming asks for


def test_training_loss_drops_on_a_tiny_store(store, tmp_path):
    run = tmp_path / "run"
    train(train_cfg(store, run, "trainer.steps=80", "trainer.batch_size=12", "trainer.lr=3e-3",
                    "trainer.warmup_steps=5", "trainer.min_lr=3e-4", "trainer.log_every=1", "trainer.ckpt_every=0",
                    "trainer.augment.enabled=false"))
    m = _metrics(run)
    assert len(m) == 80

    def avg(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = m[:5], m[-5:]
    assert avg("loss", last) < 0.5 * avg("loss", first)
    assert avg("action_loss", last) < 0.75 * avg("action_loss", first)  # flow loss keeps the noise variance
    assert avg("plan_loss", last) < 0.5 * avg("plan_loss", first)


# ------------------------------------------------------------------------------ errors before step 1


def _error(cfg) -> str:
    with pytest.raises(ValueError) as e:
        train(cfg)
    return str(e.value)


def test_missing_store_is_named(tmp_path):
    msg = _error(train_cfg(tmp_path / "nope.zarr", tmp_path / "run"))
    assert "store not found" in msg and "nope.zarr" in msg
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "junk.txt").write_text("x")
    msg = _error(train_cfg(bad, tmp_path / "run"))
    assert "bad.zarr" in msg
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


def test_missing_dataset_path_is_clear(tmp_path, capsys):
    assert cli_main(["train", "trainer=debug", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "dataset.path is required" in capsys.readouterr().err


def test_empty_selection_and_big_batch_are_refused(store, tmp_path):
    msg = _error(train_cfg(store, tmp_path / "run", "dataset.tasks=[fly]"))
    assert "dataset.tasks=['fly']" in msg and "reach" in msg and "push" in msg
    msg = _error(train_cfg(store, tmp_path / "run", "trainer.batch_size=1000"))
    assert "batch_size=1000" in msg and "36 windows" in msg


def test_dimension_and_config_mismatch_name_both_sides(store, tmp_path):
    run = tmp_path / "run"
    train(train_cfg(store, run))
    other = make_store(tmp_path / "other.zarr", action_dim=5)
    msg = _error(train_cfg(other, tmp_path / "run2", f"init_from={run}"))
    assert "action_dim: store/config 5 vs checkpoint 3" in msg
    msg = _error(train_cfg(other, tmp_path / "run3", f"resume={run}", "trainer.steps=4"))
    assert "different model config" in msg and "action_dim: config 5 vs checkpoint 3" in msg
    msg = _error(train_cfg(store, tmp_path / "run4", f"resume={run}", "trainer.steps=4", "model.d_model=64"))
    assert "d_model: config 64 vs checkpoint 32" in msg
    msg = _error(train_cfg(store, tmp_path / "run5", f"resume={run}", "trainer.steps=4", "trainer.lr=1.0"))
    assert "different training config" in msg and "trainer.lr" in msg
    msg = _error(train_cfg(store, tmp_path / "run6", f"resume={run}"))
    assert "at step 2" in msg and "raise trainer.steps" in msg


def test_init_from_loads_weights(store, tmp_path):
    run = tmp_path / "run"
    train(train_cfg(store, run, "trainer.steps=1", "trainer.ckpt_every=1"))
    from vla.training import distributed as dist_utils

    t = Trainer(train_cfg(store, tmp_path / "run2", f"init_from={run}"), dist_utils.init("cpu"))
    ema = ckpt.load_tensors(run / "checkpoints" / "step_0000001" / "ema.safetensors")
    sd = t.raw_model.state_dict()
    assert all(torch.equal(sd[k], ema[k]) for k in ema) and t.step == 0


def test_periodic_closed_loop_eval_is_wired(store, tmp_path, monkeypatch):
    from vla.policies import VLAPolicy

    import vla.evaluation

    calls = []

    def fake_run_evaluation(policy, family, tasks, episodes_per_task, **kw):
        calls.append((type(policy), family, list(tasks), episodes_per_task, kw["env_kwargs"]))
        return {"overall": {"success_rate": 0.25}, "per_task": {t: {"success_rate": 0.25} for t in tasks}}

    monkeypatch.setattr(vla.evaluation, "run_evaluation", fake_run_evaluation)
    monkeypatch.setattr(vla.evaluation, "write_outputs", lambda result, out_dir, chart_title=None: {})
    run = tmp_path / "run"
    train(train_cfg(store, run, "trainer.steps=4", "trainer.ckpt_every=0", "eval.every=2", "eval.env=metaworld",
                    "eval.episodes=3"))
    assert calls == [(VLAPolicy, "metaworld", ["reach", "push"], 3, {"cameras": ("cam0",), "image_size": 16})] * 2
    evals = _metrics(run, "eval")
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["success_rate"] == 0.25
    assert evals[0]["success_rate/push"] == 0.25
    msg = _error(train_cfg(store, tmp_path / "run2", "eval.every=2"))
    assert "eval.every=2 needs eval.env" in msg


def test_time_budget_plans_from_a_probe_then_from_a_longer_window_and_refuses_resume(store, tmp_path, monkeypatch):
    from vla.training import budget as budget_mod

    clock = {"t": 0.0}
    monkeypatch.setattr(budget_mod.time, "perf_counter", lambda: clock["t"])
    b = budget_mod.TimeBudget(100.0, start_step=0, warm=2, probe=4, margin=1.0)

    class One:
        distributed = False

    seen = []
    for step in range(1, 9):
        clock["t"] += 1.0 if step > 2 else 10.0  # two slow warm-up steps, then 1 s per step
        seen.append(b.after_step(step, One(), total_steps=1000))
    # probe: steps 3..6 took 4 s -> 1 step/s; 100 s budget, 24 s used at step 6 -> 6 + 76 = 82 steps
    assert seen == [None, None, None, None, None, 82, None, None] and b.rate == pytest.approx(1.0)
    # planned again a tenth of the plan (8 steps) after the probe: the 8 steps after step 6 took 10 s (t = 34 s at
    # step 14) -> 0.8 steps/s, 66 s left -> 14 + 52 = 66 steps
    for step in range(9, 14):
        assert b.after_step(step, One(), total_steps=82) is None
    clock["t"] = 34.0
    assert b.after_step(14, One(), total_steps=82) == 66 and (b.first_rate, b.rate) == (1.0, pytest.approx(0.8))
    # after that the budget is a deadline, checked every check_every (25) steps: at step 50 (t = 74 s) there
    # is time left; had the steps slowed to 3 s from step 15 on, the run would be at 128 s > 100 s by step 25: stop
    clock["t"] = 74.0
    assert b.after_step(50, One(), total_steps=66) is None and not b.spent
    clock["t"] = 128.0
    assert b.after_step(24, One(), total_steps=66) is None  # only on check steps
    assert b.after_step(25, One(), total_steps=66) == 25 and b.spent
    assert b.after_step(50, One(), total_steps=25) is None  # once
    # a pessimistic probe (2 s per step) is corrected upwards, but never past trainer.steps (the first total, 60)
    clock["t"] = 0.0
    b3 = budget_mod.TimeBudget(100.0, start_step=0, warm=0, probe=2, margin=1.0)
    assert b3.after_step(0, One(), 60) is None
    clock["t"] = 4.0
    assert b3.after_step(2, One(), 60) == 50 and b3.refine_at == 7  # 0.5 steps/s: 2 + 48
    clock["t"] = 9.0
    assert b3.after_step(7, One(), 50) == 60  # 1 step/s over steps 2..7: 7 + 91, capped at 60
    b2 = budget_mod.TimeBudget(1000.0, start_step=0, warm=0, probe=1)
    assert b2.after_step(0, One(), 50) is None and b2.after_step(1, One(), 50) is None  # budget allows more: keep 50
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        budget_mod.TimeBudget(0, 0)
    long_warmup = budget_mod.TimeBudget.from_config({"time_budget_s": 60, "warmup_steps": 300}, None)
    assert (long_warmup.probe_from, long_warmup.probe_to) == (75, 225)  # mid warm-up, past the slow first steps
    short_warmup = budget_mod.TimeBudget.from_config({"time_budget_s": 60, "warmup_steps": 5}, None)
    assert (short_warmup.probe_from, short_warmup.probe_to) == (10, 30)
    monkeypatch.undo()  # the real clock again (perf_counter was patched on the shared time module)

    run = tmp_path / "run"
    cfg = train_cfg(store, run, "trainer.steps=400", "trainer.time_budget_s=0.001", "trainer.log_every=1")
    train(cfg)
    log = (run / "train.log").read_text()
    assert "time budget 0 s:" in log and "-> steps=31" in log  # warm 10 + probe 20, then 1 more step at most
    assert [m["step"] for m in _metrics(run)][-1] == 31
    with pytest.raises(ValueError, match="cannot be combined with resume"):
        train(train_cfg(store, tmp_path / "r2", f"resume={run}", "trainer.steps=400", "trainer.time_budget_s=0.001"))
