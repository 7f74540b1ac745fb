import json

import numpy as np
import pytest
import torch
from model_helpers import B, normalizer, store_stats, tiny_config, window_batch

from vla.normalize import Normalizer
from vla.processor import Processor
from vla.tokenizer import ByteTokenizer


def test_normalizer_quantile_maps_q01_q99_and_inverts():
    stats = {"action": {"q01": [0.0, -4.0, 1.0], "q99": [2.0, 4.0, 1.0]}}
    n = Normalizer(stats, mode="quantile", clip=None)
    x = np.array([[0.0, -4.0, 1.0], [2.0, 4.0, 1.0], [1.0, 0.0, 1.0]], np.float32)
    y = n.normalize("action", x)
    assert np.allclose(y[0, :2], -1) and np.allclose(y[1, :2], 1) and np.allclose(y[2, :2], 0)
    assert np.allclose(y[:, 2], 0)  # constant dimension: guarded, maps to 0, no division by ~0
    assert np.allclose(n.unnormalize("action", y), x)
    t = torch.tensor(x)
    assert torch.allclose(n.unnormalize("action", n.normalize("action", t)), t)


def test_normalizer_meanstd_clip_and_json():
    stats = {"state": {"mean": [1.0, 0.0], "std": [2.0, 0.0], "q01": [0.0, 0.0], "q99": [1.0, 1.0]}}
    n = Normalizer(stats, mode="meanstd")
    assert np.allclose(n.normalize("state", np.array([3.0, 5.0])), [1.0, 5.0])
    q = Normalizer(stats, mode="quantile", clip=1.5)
    assert np.allclose(q.normalize("state", np.array([100.0, -100.0])), [1.5, -1.5])
    again = Normalizer.from_dict(json.loads(json.dumps(n.to_dict())))
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    assert np.allclose(again.normalize("state", x), n.normalize("state", x))


def test_normalizer_errors_name_the_key():
    with pytest.raises(ValueError, match=r"stats\['action'\] lacks \['q99'\]"):
        Normalizer({"action": {"q01": [0.0]}})
    with pytest.raises(ValueError, match="NaN"):
        Normalizer({"action": {"q01": [np.nan], "q99": [1.0]}})
    n = Normalizer({"action": {"q01": [0.0, 0.0], "q99": [1.0, 1.0]}})
    with pytest.raises(ValueError, match="'action' expects last dim 2, got shape \\(3,\\)"):
        n.normalize("action", np.zeros(3))
    with pytest.raises(ValueError, match="no statistics for key 'state'"):
        n.normalize("state", np.zeros(2))


def test_training_batch_shapes_ranges_and_order():
    cfg = tiny_config(cameras=["a", "b"], n_obs_steps=2, frame="aux")
    proc = Processor(cfg, normalizer(), ByteTokenizer())
    win = window_batch(cfg)
    out = proc.training_batch(win, "cpu")
    h, w = cfg.image_hw
    assert out["images"].shape == (B, 4, 3, h, w) and out["images"].dtype == torch.float32
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    # camera-major view order: view 1 is camera "a" at the latest history step
    expect = torch.tensor(win["images"]["a"][:, 1]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(out["images"][:, 1], expect)
    assert out["state"].shape == (B, 2 * cfg.state_dim)
    assert torch.allclose(out["state"][:, cfg.state_dim:], torch.tensor(win["state"][:, 1]) / 2)  # q01=-2, q99=2
    assert out["actions"].shape == (B, cfg.horizon, cfg.action_dim)
    assert out["instruction_tokens"].dtype == torch.long and out["instruction_mask"].dtype == torch.bool
    tok = proc.tokenizer
    assert tok.decode(out["instruction_tokens"][0]) == win["instruction"][0]
    assert out["plan_tokens"][0, 0] == tok.plan_id and tok.decode(out["plan_tokens"][0, 1:]) == win["plan"][0]
    assert out["future_frame"].shape == (B, 3, cfg.frame_size, cfg.frame_size)
    assert out["future_is_pad"].tolist() == [False, True, False]


def test_long_text_is_truncated_to_the_limits():
    cfg = tiny_config(max_instruction_tokens=10, max_plan_tokens=8)
    proc = Processor(cfg, normalizer())
    win = window_batch(cfg)
    win["instruction"][0] = "x" * 500
    win["plan"][1] = "y" * 500
    out = proc.training_batch(win)
    assert out["instruction_tokens"].shape[1] == 10 and out["plan_tokens"].shape[1] == 8
    assert out["plan_tokens"][1, -1] == proc.tokenizer.eos_id


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda w: w["images"].pop("front"), "missing camera 'front'"),
        (lambda w: w["images"].update(front=w["images"]["front"][:, :, :8]),
         r"images\['front'\]: expected uint8 .*H=16, W=16, got shape \(3, 1, 8, 16, 3\)"),
        (lambda w: w["images"].update(front=w["images"]["front"].astype(np.float32)), "expected dtype uint8"),
        (lambda w: w.update(state=w["state"][..., :2]), r"state: expected float \[B, n_obs=1, S=5\]"),
        (lambda w: w.update(action=w["action"][..., :2]), r"action: expected float \[B=3, horizon=6, A=3\]"),
        (lambda w: w["action"].__setitem__((0, 0, 0), np.nan), "action: contains NaN"),
        (lambda w: w.pop("plan"), r"missing keys \['plan'\]"),
        (lambda w: w.update(instruction="one string"), "instruction: expected a list of 3 strings"),
    ],
)
def test_bad_inputs_get_clear_errors(edit, match):
    cfg = tiny_config()
    proc = Processor(cfg, normalizer())
    win = window_batch(cfg)
    edit(win)
    with pytest.raises(ValueError, match=match):
        proc.training_batch(win)


def test_observation_batch_matches_training_batch_and_unnormalize():
    cfg = tiny_config(planner=True)
    proc = Processor(cfg, normalizer())
    win = window_batch(cfg)
    train = proc.training_batch(win)
    obs = [{"images": {"front": win["images"]["front"][i, 0]}, "state": win["state"][i, 0]} for i in range(B)]
    inf = proc.observation_batch(obs, win["instruction"], "cpu", plans=win["plan"])
    for k in ("images", "state", "instruction_tokens", "instruction_mask", "plan_tokens", "plan_mask"):
        assert torch.equal(inf[k], train[k]), k
    assert "plan_tokens" not in proc.observation_batch(obs, win["instruction"])
    raw = proc.unnormalize_actions(train["actions"])
    assert torch.allclose(raw, torch.tensor(win["action"]), atol=1e-6)
    assert isinstance(proc.unnormalize_actions(train["actions"].numpy()), np.ndarray)
    with pytest.raises(ValueError, match="observation 1: missing camera 'front'"):
        proc.observation_batch([obs[0], {"images": {}, "state": obs[1]["state"]}], ["a", "b"])


def test_processor_json_round_trip_gives_the_same_batch():
    cfg = tiny_config(frame="aux")
    proc = Processor(cfg, normalizer(), ByteTokenizer())
    again = Processor.from_dict(json.loads(json.dumps(proc.to_dict())))
    assert again.config == cfg
    a, b = proc.training_batch(window_batch(cfg)), again.training_batch(window_batch(cfg))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_refuses_mismatched_statistics():
    with pytest.raises(ValueError, match="normalizer 'action' statistics have dim 7, config.action_dim is 3"):
        Processor(tiny_config(), Normalizer(store_stats(action_dim=7)))
