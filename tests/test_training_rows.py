"""Two training-only switches that change what one step computes, not what the model is:
``plan_rows`` (only the first N rows run the side plan) and ``flow_samples`` (K noisy copies of each
action chunk against one prefix)."""

import pytest
import torch
from model_helpers import B, model_batch, tiny_config

from vla.flow import sample_time
from vla.model import VLA


def _side(**kw):
    return tiny_config(planner=True, actions_read_plan=False, **kw)


def _grads(model: VLA, loss: torch.Tensor, group: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in getattr(model, group).named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frame", ["off", "aux"])
def test_plan_rows_changes_only_which_rows_train_the_plan(frame):
    """Every output but the plan is what one joint run gives; the plan loss is the first rows' plan loss."""
    torch.manual_seed(0)
    full = VLA(_side(frame=frame))
    part = VLA(_side(frame=frame, plan_rows=2))
    part.load_state_dict(full.state_dict())
    batch = model_batch(full.cfg)
    a, b = full.compute_loss(batch), part.compute_loss(batch)
    for key in ("action_loss", "frame_loss"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    first_two = {k: v[:2] for k, v in batch.items()}
    torch.testing.assert_close(b["plan_loss"], full.compute_loss(first_two)["plan_loss"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(b["plan_loss"], a["plan_loss"])  # the third row's plan is left out
    ga, gb = _grads(full, a["action_loss"], "action"), _grads(part, b["action_loss"], "action")
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_plan_rows_at_or_above_the_batch_is_the_joint_run():
    torch.manual_seed(0)
    full, part = VLA(_side()), VLA(_side(plan_rows=B))
    part.load_state_dict(full.state_dict())
    batch = model_batch(full.cfg)
    a, b = full.compute_loss(batch), part.compute_loss(batch)
    for key in ("loss", "plan_loss", "action_loss"):
        torch.testing.assert_close(b[key], a[key])


def test_plan_rows_needs_the_plan_as_a_side_output():
    with pytest.raises(ValueError, match=r"plan_rows=4 needs the plan as a side output.*actions_read_plan=True"):
        tiny_config(planner=True, actions_read_plan=True, plan_rows=4)
    with pytest.raises(ValueError, match=r"plan_rows must be an int >= 0, got -1"):
        _side(plan_rows=-1)


def test_flow_samples_loss_is_the_mean_of_independent_single_copy_losses():
    """Copy k sees the prefix and the state as the first copy does and no other copy: its loss equals a
    one-copy run with copy k's noise and time (drawn from the global generator, time first)."""
    torch.manual_seed(0)
    one = VLA(tiny_config(frame="aux"))
    three = VLA(tiny_config(frame="aux", flow_samples=3))
    three.load_state_dict(one.state_dict())
    batch = model_batch(one.cfg)
    torch.manual_seed(7)
    got = three.compute_loss(batch)
    torch.manual_seed(7)
    draws = []
    for _ in range(2):
        t = sample_time(B)
        draws.append((t, torch.randn_like(batch["actions"])))
    singles = [one.compute_loss(batch)["action_loss"]]
    singles += [one.compute_loss({**batch, "time": t, "noise": n})["action_loss"] for t, n in draws]
    torch.testing.assert_close(got["action_loss"], torch.stack(singles).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["frame_loss"], one.compute_loss(batch)["frame_loss"], rtol=1e-5, atol=1e-6)
    assert len({round(float(s), 6) for s in singles}) == 3  # three different draws, not one copy thrice


def test_flow_samples_with_plan_rows_trains_and_samples():
    torch.manual_seed(0)
    model = VLA(_side(flow_samples=2, plan_rows=1, frame="aux"))
    batch = model_batch(model.cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model.compute_loss(batch)["action_loss"].item()
    for _ in range(60):
        loss = model.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.compute_loss(batch)["action_loss"].item() < 0.5 * first
    model.eval()
    out = model.sample({k: v for k, v in batch.items() if not k.startswith("plan")})
    assert out["actions"].shape == (B, model.cfg.horizon, model.cfg.action_dim)


def test_flow_samples_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match=r"flow_samples=2 needs action_head='flow'.*action_head='discrete'"):
        tiny_config(action_head="discrete", flow_samples=2)
    with pytest.raises(ValueError, match=r"flow_samples=2 needs .*frame='condition'"):
        tiny_config(frame="condition", flow_samples=2)
    with pytest.raises(ValueError, match=r"flow_samples must be an int >= 1, got 0"):
        tiny_config(flow_samples=0)
