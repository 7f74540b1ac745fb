"""Every model switch trains and samples; representative combinations overfit one fixed batch."""

import itertools

import pytest
import torch
from model_helpers import B, model_batch, tiny_config

from vla.model import VLA

ALL = [
    dict(experts=e, action_head=h, planner=p, frame=f, knowledge_insulation=k)
    for e, h, p, f, k in itertools.product(["mot", "dense"], ["flow", "discrete"], [True, False],
                                           ["off", "aux", "condition"], [False, True])
    if not (h == "discrete" and f == "condition") and not (e == "dense" and k)
]


def _name(kw: dict) -> str:
    return "-".join(f"{k[:2]}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", ALL, ids=[_name(kw) for kw in ALL])
def test_every_variant_takes_a_step_and_samples(kw):
    torch.manual_seed(0)
    model = VLA(tiny_config(**kw))
    batch = model_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model.compute_loss(batch)
    assert set(losses) == {"loss", "plan_loss", "action_loss", "frame_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert (losses["plan_loss"] > 0) == kw["planner"] and (losses["frame_loss"] > 0) == (kw["frame"] != "off")
    opt.zero_grad()
    losses["loss"].backward()
    opt.step()
    model.eval()
    out = model.sample({k: v for k, v in batch.items() if not k.startswith("plan")})
    assert out["actions"].shape == (B, model.cfg.horizon, model.cfg.action_dim)
    assert torch.isfinite(out["actions"]).all()
    assert (out["frame"] is None) == (kw["frame"] == "off")
    assert (out["plan_tokens"] is None) == (not kw["planner"])


OVERFIT = [
    dict(experts="mot", action_head="flow", planner=True, frame="aux", knowledge_insulation=True),
    dict(experts="dense", action_head="discrete", planner=True, frame="aux"),
    dict(experts="mot", action_head="flow", planner=False, frame="condition"),
    dict(experts="dense", action_head="flow", planner=True, frame="off"),
]


@pytest.mark.parametrize("kw", OVERFIT, ids=[_name(kw) for kw in OVERFIT])
def test_overfits_one_fixed_batch(kw):
    """Each active loss term falls at least 10x on a fixed batch (fixed flow noise and time)."""
    torch.manual_seed(0)
    model = VLA(tiny_config(**kw))
    batch = model_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    with torch.no_grad():
        first = {k: v.item() for k, v in model.compute_loss(batch).items()}
    for _ in range(150):
        loss = model.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = {k: v.item() for k, v in model.compute_loss(batch).items()}
    for k in ("plan_loss", "action_loss", "frame_loss"):
        if first[k] > 0:
            assert last[k] < first[k] / 10, f"{k}: {first[k]:.4f} -> {last[k]:.4f}"
    if kw["action_head"] == "discrete":  # greedy decoding reproduces the memorized bins
        model.eval()
        out = model.sample({k: v for k, v in batch.items() if not k.startswith("plan")})
        ok = ~batch["action_is_pad"]
        assert (out["actions"] - batch["actions"]).abs()[ok].max() <= 2 / model.cfg.action_bins + 1e-5
        assert out["plan_text"] == ["reach; pull", "push", "grasp; lift; p"]
        # plans of different lengths: finished rows are padded while the others decode, cached or not
        uncached = model.sample({k: v for k, v in batch.items() if not k.startswith("plan")}, use_cache=False)
        assert torch.equal(uncached["plan_tokens"], out["plan_tokens"])
        assert out["plan_tokens"].shape[1] == model.cfg.max_plan_tokens
        assert (out["plan_tokens"][1, 6:] == model.tok.pad_id).all()  # <plan> p u s h <eos> then padding
        assert torch.allclose(uncached["actions"], out["actions"])


@pytest.mark.parametrize("experts", ["mot", "dense"])
def test_flow_sampling_recovers_memorized_actions(experts):
    """Trained with random noise and time, 10 Euler steps from fresh noise land near the memorized chunk
    (checks the time/velocity conventions and the time conditioning end to end, not just the loss)."""
    torch.manual_seed(0)
    model = VLA(tiny_config(experts=experts, planner=False, d_model=64, action_width=32))
    batch = model_batch(model.cfg, fixed_noise=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        loss = model.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ok = ~batch["action_is_pad"]  # padded steps are not trained
    mse = (model.sample(batch)["actions"] - batch["actions"]).pow(2)[ok].mean()
    assert mse < 0.25 * batch["actions"].var(), f"sample mse {mse:.4f} vs data variance {batch['actions'].var():.4f}"


def test_end_to_end_two_cameras_with_history():
    """Window batch -> Processor -> compute_loss -> sample -> raw actions, with 2 cameras x 2 history steps."""
    from model_helpers import normalizer, window_batch

    from vla.processor import Processor

    torch.manual_seed(0)
    cfg = tiny_config(cameras=["front", "wrist"], n_obs_steps=2, frame="aux", frame_camera="wrist")
    model, proc = VLA(cfg), Processor(cfg, normalizer())
    win = window_batch(cfg)
    losses = model.compute_loss(proc.training_batch(win))
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    obs = [{"images": {c: win["images"][c][i] for c in cfg.cameras}, "state": win["state"][i]} for i in range(B)]
    out = model.eval().sample(proc.observation_batch(obs, win["instruction"]))
    raw = proc.unnormalize_actions(out["actions"])
    assert raw.shape == (B, cfg.horizon, cfg.action_dim) and out["frame"].shape == (B, 3, 8, 8)


def test_inference_benchmark_prints_json(capsys):
    import json

    from vla.bench import inference

    assert inference.main(["presets=[tiny]", "repeats=1", "peak_sizes=[64]", "image_size=32"]) == 0
    report = json.loads(capsys.readouterr().out)
    tiny = report["presets"]["tiny"]
    assert tiny["flops_per_chunk"]["uncached"] > tiny["flops_per_chunk"]["cached"] > 0
    assert set(tiny["chunk_latency_s"]) == {"cached", "uncached"} and tiny["plan_decode"]["plan_tokens"] > 1
    with pytest.raises(ValueError, match="unknown key 'preset'"):
        inference.main(["preset=tiny"])


def test_inference_benchmark_grid_rows_and_graph_variant(capsys):
    import json

    from vla.bench import inference

    argv = ["presets=[tiny]", "repeats=1", "peak_sizes=[64]", "image_size=32", "batch=[1,2]", "graphs=true"]
    assert inference.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["presets"]
    assert set(rows) == {"tiny batch=1 cameras=1", "tiny batch=2 cameras=1"}
    for key, row in rows.items():
        assert row["batch"] == int(key.split("batch=")[1][0]) and "graphs_error" not in row
        assert row["chunk_latency_s"]["cached_graphs"] > 0 and row["graphs_rel_action_diff"] == 0.0  # CPU: no capture
    with pytest.raises(ValueError, match="positive ints"):
        inference.main(["batch=[0]"])


def test_inference_benchmark_times_a_baseline_model_file_alongside(capsys):
    import json
    from pathlib import Path

    from vla.bench import inference

    here = str(Path(inference.__file__).resolve().parents[1] / "model.py")  # the current code as its own baseline
    argv = ["presets=[tiny]", "repeats=1", "peak_sizes=[64]", "image_size=32", f"baseline={here}", "baseline_repeats=2"]
    assert inference.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    vs = report["presets"]["tiny"]["vs_baseline"]
    for case in ("cached_given_plan", "cached_plan_decoded"):
        assert vs[case]["max_abs_action_diff"] == 0 and vs[case]["same_plan"] and vs[case]["speedup"] > 0
    assert vs["flops_per_chunk"]["new"] == vs["flops_per_chunk"]["baseline"] > 0
    assert report["load_avg_1min_at_start"] is None or report["load_avg_1min_at_start"] >= 0
    with pytest.raises(ValueError, match="neither a file nor a git ref"):
        inference.load_baseline_model("no-such-ref-xyz")


def test_train_benchmark_interleaves_bf16_variants_and_reports_ratios(capsys):
    import json

    from vla.bench import train

    assert train.main(["presets=[tiny]", "steps=2", "warmup=1", "episodes=2", "episode_len=20", "image_size=16",
                       "bf16=[false,true]", "rounds=2", "overrides=[model.patch_size=4]", "planner=off"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["round"], r["bf16_setting"], r["bf16"]) for r in rows] == [
        (0, "false", False), (0, "true", True), (1, "false", False), (1, "true", True)]
    ratio = report["ratios"]["bf16=true / bf16=false"]
    assert len(ratio["per_round"]) == 2 and ratio["median"] > 0
    assert ratio["per_round"][0] == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])
    assert report["overrides"] == ["model.patch_size=4"]
    with pytest.raises(FileNotFoundError, match="store=/no/such.zarr does not exist"):
        train.main(["store=/no/such.zarr"])


def test_train_benchmark_times_recipe_variants_side_by_side(capsys):
    import json

    from vla.bench import train

    assert train.main(["presets=[tiny]", "steps=1", "warmup=1", "episodes=2", "episode_len=20", "image_size=16",
                       "bf16=[false]", "planner=side", "overrides=[model.patch_size=4]",
                       "variants=[none, model.plan_rows=1 model.flow_samples=2]"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [r["variant"] for r in rows] == ["none", "model.plan_rows=1 model.flow_samples=2"]
    ratio = report["ratios"]["variant=model.plan_rows=1 model.flow_samples=2 / variant=none"]
    assert ratio["per_round"] == [pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"])]
    with pytest.raises(ValueError, match=r"variants item 'flow_samples': expected .*key=value.*\['flow_samples'\]"):
        train.main(["presets=[tiny]", "variants=[flow_samples]"])


def test_state_dropout_hides_the_state_in_training_and_one_means_no_state():
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    torch.manual_seed(0)
    model = VLA(tiny_config(state_dropout=0.5))
    state = torch.randn(64, model.cfg.state_dim)
    model.train()
    seen = model.state_input(state)
    zeroed = (seen == 0).all(1)
    assert 10 < int(zeroed.sum()) < 54  # about half, per sample
    assert torch.equal(seen[~zeroed], state[~zeroed])
    model.eval()
    assert torch.equal(model.state_input(state), state)  # inference reads the state

    none = VLA(tiny_config(state_dropout=1.0)).eval()
    batch = model_batch(none.cfg)
    noise = torch.randn(batch["state"].shape[0], none.cfg.horizon, none.cfg.action_dim)
    a = none.sample(batch, noise=noise, decode_plan=False)["actions"].clone()
    b = none.sample(dict(batch, state=batch["state"] + 5), noise=noise, decode_plan=False)["actions"]
    assert torch.equal(a, b)  # 1.0: the state never reaches the model
    with_state = VLA(tiny_config()).eval()
    with_state.load_state_dict(none.state_dict())
    c = with_state.sample(dict(batch, state=batch["state"] + 5), noise=noise, decode_plan=False)["actions"]
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="state_dropout must be in"):
        tiny_config(state_dropout=1.5)


def fit_goal(model, batch, steps: int) -> tuple[float, float]:
    """Adam on the goal loss alone; returns (first, last) loss."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model.compute_loss(batch)["goal_loss"]
        losses.append(float(loss))
        loss.backward()
        opt.step()
    return losses[0], losses[-1]


def test_goal_head_learns_the_goal_state_and_its_gradient_reaches_the_images():
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    torch.manual_seed(0)
    model = VLA(tiny_config(goal_loss_weight=0.5, vision="conv"))
    batch = model_batch(model.cfg)
    batch["goal_state"] = torch.randn(batch["state"].shape[0], model.cfg.state_dim)
    losses = model.compute_loss(batch)
    plain = {k: v for k, v in losses.items() if k != "goal_loss"}
    total = plain["plan_loss"] + plain["action_loss"] + 0.5 * losses["goal_loss"]
    assert torch.allclose(losses["loss"], total)
    losses["goal_loss"].backward()
    stem = [p.grad for n, p in model.named_parameters() if n.startswith("vlm.patch.")]
    assert stem and any(g is not None and g.abs().sum() > 0 for g in stem)  # it trains the vision side
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters()
               if n.startswith("action.out") or n.startswith("action.inp"))  # not the action read-out

    first, last = fit_goal(model, batch, steps=60)
    assert last < 0.1 * first  # the head fits three goals

    model.eval()
    with torch.no_grad():  # the readout equals the head's output inside the loss (the state token ignores actions)
        want = model.compute_loss(batch)["goal_loss"]
        got = (model.predict_goal(batch) - batch["goal_state"]).pow(2).mean()
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="no goal head"):
        VLA(tiny_config()).predict_goal(batch)
    with pytest.raises(ValueError, match="needs batch\\['goal_state'\\]"):
        model.compute_loss({k: v for k, v in batch.items() if k != "goal_state"})
    assert "goal" not in VLA(tiny_config()).action  # off by default: no head, no loss key
    assert "goal_loss" not in VLA(tiny_config()).compute_loss(model_batch(tiny_config()))
    with pytest.raises(ValueError, match="goal_loss_weight must be a number >= 0"):
        tiny_config(goal_loss_weight=-1.0)
    with pytest.raises(ValueError, match="with goal_head='token' needs action_head='flow'.*use goal_head='point'"):
        tiny_config(goal_loss_weight=1.0, action_head="discrete")


def test_point_goal_head_reads_where_the_bright_patch_is():
    """goal_head=point: the goal comes from which patch of the first camera scores highest. On images that
    are black but for one bright patch, with the goal set by that patch's place, it fits the goals; and
    moving the bright patch moves the prediction. Instruction, state and plan are the same for every sample,
    so the goals can only be fit by reading the image."""
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    torch.manual_seed(0)
    cfg = tiny_config(goal_loss_weight=1.0, goal_head="point", vision="conv")
    model = VLA(cfg)
    assert isinstance(model.action["goal"], torch.nn.Sequential) and model.goal_grid.shape[1] == 2
    batch = model_batch(cfg)
    b, p = batch["state"].shape[0], cfg.patch_size
    for k, v in batch.items():  # one instruction, state and plan for all: only the image tells the goals apart
        if torch.is_tensor(v) and v.ndim and v.shape[0] == b:
            batch[k] = v[:1].expand_as(v).clone()
    h, w = cfg.image_hw
    gh, gw = h // p, w // p
    cells = torch.tensor([0, gw * gh - 1, gw - 1][:b])  # a corner patch per sample
    images = torch.full_like(batch["images"], -1.0)
    for i, c in enumerate(cells.tolist()):
        r, q = divmod(c, gw)
        images[i, 0, :, r * p:(r + 1) * p, q * p:(q + 1) * p] = 1.0
    batch["images"] = images
    grid = model.goal_grid[cells]  # (B, 2) the bright patch's centre in [-1, 1]
    batch["goal_state"] = torch.cat([grid, torch.zeros(b, cfg.state_dim - 2)], 1)[:, :cfg.state_dim]
    first, last = fit_goal(model, batch, steps=150)
    assert last < 0.1 * first
    model.eval()
    with torch.no_grad():
        pred = model.predict_goal(batch)
        swapped = model.predict_goal(dict(batch, images=batch["images"].flip(0)))  # each sample: another's image
    assert torch.allclose(swapped, pred.flip(0), atol=1e-5)  # the goal follows the image
    with pytest.raises(ValueError, match="goal_head must be 'token' or 'point'"):
        tiny_config(goal_head="center")


@pytest.mark.parametrize("head", ["flow", "discrete"])
def test_goal_condition_steers_the_actions_with_the_goal(head):
    """goal_condition: in training the state token (discrete head: the goal token) reads the true goal
    (noise 0 here), so the action loss depends on it; at inference it reads the point head's prediction,
    returned as out["goal"] and equal to `predict_goal`; a different goal gives different actions. Without
    the point head it is a config error."""
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    torch.manual_seed(0)
    cfg = tiny_config(goal_loss_weight=1.0, goal_head="point", vision="conv", goal_condition=True,
                      goal_condition_noise=0.0, action_head=head, goal_patch_loss_weight=0.3)  # the recipe's losses
    model = VLA(cfg).eval()
    batch = model_batch(cfg)
    b = batch["state"].shape[0]
    batch["goal_state"] = torch.randn(b, cfg.state_dim)
    batch["goal_pixel"] = torch.tensor([[1.0, 2.0], [9.0, 3.0], [float("nan")] * 2])[:b]
    batch["time"] = torch.full((b,), 0.5)
    with torch.no_grad():
        loss = model.compute_loss(batch)["action_loss"]
        assert torch.equal(model.compute_loss(batch)["action_loss"], loss)  # no noise: deterministic
        moved = model.compute_loss(dict(batch, goal_state=batch["goal_state"] + 1.0))["action_loss"]
    assert not torch.allclose(moved, loss)  # the actions read the given goal
    noise = torch.randn(b, cfg.horizon, cfg.action_dim)
    if head == "discrete":  # one vlm goal token between the plan and the bins; the goal head lives in `action`
        assert set(model.action) == {"goal_score", "goal", "goal_in"}
        assert model.action["goal_in"].out_features == cfg.d_model
        read, embed_goal = [], model.embed_goal  # random weights decode the same bins whatever the goal, so
        model.embed_goal = lambda g: read.append(g.clone()) or embed_goal(g)  # check what enters the sequence
        for use_cache in (True, False):
            out = model.sample(batch, use_cache=use_cache)
            assert torch.allclose(read.pop(), out["goal"]) and not read
            with torch.no_grad():
                assert torch.allclose(out["goal"], model.predict_goal(batch), atol=1e-5)
        return
    out = model.sample(batch, noise=noise)
    with torch.no_grad():
        assert torch.allclose(out["goal"], model.predict_goal(batch), atol=1e-5)
        model.action["goal_in"].bias.add_(1.0)  # the same prediction, read differently: other actions
    assert not torch.allclose(model.sample(batch, noise=noise)["actions"], out["actions"])
    with pytest.raises(ValueError, match="goal_condition=true needs the goal"):
        model.embed_state(batch["state"])
    with pytest.raises(ValueError, match="goal_condition=true needs the point goal head"):
        tiny_config(goal_loss_weight=1.0, goal_condition=True)
    with pytest.raises(ValueError, match="goal_condition_noise must be >= 0"):
        tiny_config(goal_loss_weight=1.0, goal_head="point", goal_condition=True, goal_condition_noise=-1.0)
    assert "goal_in" not in VLA(tiny_config(goal_loss_weight=1.0, goal_head="point", vision="conv")).action
