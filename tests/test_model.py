import json

import pytest
import torch
from model_helpers import B, model_batch, tiny_config

from vla.model import VLA, VLAConfig


def _grads(model: VLA, loss: torch.Tensor, group: str) -> list[torch.Tensor]:
    named = model.parameter_groups()[group]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]


@pytest.mark.parametrize("frame", ["aux", "condition"])
def test_knowledge_insulation_blocks_action_and_frame_gradients_into_the_vlm(frame):
    torch.manual_seed(0)
    on = VLA(tiny_config(knowledge_insulation=True, frame=frame))
    off = VLA(tiny_config(knowledge_insulation=False, frame=frame))
    off.load_state_dict(on.state_dict())
    batch = model_batch(on.cfg)
    lo, lf = on.compute_loss(batch), off.compute_loss(batch)
    assert torch.allclose(lo["loss"], lf["loss"])  # insulation changes gradients, not the forward pass
    for name in ("action_loss", "frame_loss"):
        assert all(torch.count_nonzero(g) == 0 for g in _grads(on, lo[name], "vlm")), name
        assert sum(g.abs().sum() for g in _grads(off, lf[name], "vlm")) > 0, name
    assert sum(g.abs().sum() for g in _grads(on, lo["action_loss"], "action")) > 0
    assert sum(g.abs().sum() for g in _grads(on, lo["plan_loss"], "vlm")) > 0  # the plan still trains the vlm


def _segments(model: VLA, batch: dict, frame: bool = True) -> list:
    from vla.model import patchify

    t = batch["time"]
    segs = [model.embed_prefix(batch), model.embed_plan(batch["plan_tokens"], batch["plan_mask"]),
            model.embed_state(batch["state"]), model.embed_actions(batch["noise"], t)]
    if frame:
        segs.append(model.embed_frame(patchify(batch["frame_noise"], model.cfg.patch_size), t))
    return segs


def _outs(model: VLA, segs: list, valid_only: bool = True) -> list[torch.Tensor]:
    outs = model._run(segs)[0]
    return [o[s.valid] if valid_only else o for o, s in zip(outs, segs)]


@pytest.mark.parametrize("frame", ["aux", "condition"])
def test_no_token_sees_blocks_to_its_right(frame):
    torch.manual_seed(0)
    model = VLA(tiny_config(frame=frame)).eval()
    batch = model_batch(model.cfg)
    with torch.no_grad():
        segs = _segments(model, batch)
        base = _outs(model, segs)
        names = ["prefix", "plan", "state", "action", "frame"]
        for changed in range(1, 5):  # perturb one block at a time
            segs2 = list(segs)
            segs2[changed] = type(segs[changed])(**{**segs[changed].__dict__, "x": segs[changed].x + 1.0})
            new = _outs(model, segs2)
            for i, name in enumerate(names):
                may_change = i == changed or (i > changed and not (names[changed] == "action" and name == "frame"))
                may_change |= frame == "condition" and name == "action" and names[changed] == "frame"
                same = torch.allclose(new[i], base[i], atol=1e-6)
                assert same != may_change, f"perturbing {names[changed]} {'changed' if not same else 'kept'} {name}"


def test_plan_is_causal_and_padding_is_invisible():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval()
    batch = model_batch(model.cfg)
    with torch.no_grad():
        base = model._run(_segments(model, batch, frame=False))[0]
        b2 = dict(batch, plan_tokens=batch["plan_tokens"].clone())
        b2["plan_tokens"][0, 5] = 65  # change plan token 5 of sample 0
        new = model._run(_segments(model, b2, frame=False))[0]
        assert torch.allclose(new[1][0, :5], base[1][0, :5], atol=1e-6)
        assert not torch.allclose(new[1][0, 5:], base[1][0, 5:], atol=1e-6)
        assert torch.allclose(new[1][1:], base[1][1:], atol=1e-6)  # other samples untouched
        b3 = dict(batch, instruction_tokens=batch["instruction_tokens"].clone(),
                  plan_tokens=batch["plan_tokens"].clone())
        b3["instruction_tokens"][~batch["instruction_mask"]] = 66  # padding content must not matter
        b3["plan_tokens"][~batch["plan_mask"]] = 67
        segs3 = _segments(model, b3, frame=False)
        for o_new, o_base, s in zip(model._run(segs3)[0], base, segs3):
            assert torch.allclose(o_new[s.valid], o_base[s.valid], atol=1e-6)


@pytest.mark.parametrize("kw", [dict(frame="condition", knowledge_insulation=True), dict(frame="aux", experts="dense"),
                                dict(action_head="discrete", frame="aux"), dict(planner=False),
                                dict(vision="conv", goal_loss_weight=1.0, goal_head="point", goal_condition=True),
                                dict(vision="conv", goal_loss_weight=1.0, goal_head="point", goal_condition=True,
                                     action_head="discrete", frame="aux"),
                                dict(actions_read_plan=False, frame="condition"),
                                dict(actions_read_plan=False, action_head="discrete", vision="conv",
                                     goal_loss_weight=1.0, goal_head="point", goal_condition=True)])
def test_cached_sampling_equals_uncached(kw):
    torch.manual_seed(0)
    model = VLA(tiny_config(**kw)).eval()
    batch = {k: v for k, v in model_batch(model.cfg).items() if not k.startswith("plan")}
    noise, fnoise = torch.randn(B, model.cfg.horizon, model.cfg.action_dim), torch.randn(B, 3, 8, 8)
    a = model.sample(batch, noise=noise, frame_noise=fnoise, use_cache=True)
    b = model.sample(batch, noise=noise, frame_noise=fnoise, use_cache=False)
    assert a["actions"].shape == (B, model.cfg.horizon, model.cfg.action_dim)
    assert torch.allclose(a["actions"], b["actions"], atol=1e-5)
    assert a["plan_text"] == b["plan_text"] and len(a["plan_text"]) == B
    if model.cfg.planner:
        assert torch.equal(a["plan_tokens"], b["plan_tokens"])
        assert a["plan_tokens"].shape[1] <= model.cfg.max_plan_tokens
    if model.cfg.frame == "off":
        assert a["frame"] is None
    else:
        assert a["frame"].shape == (B, 3, 8, 8) and a["frame"].abs().max() <= 1
        assert torch.allclose(a["frame"], b["frame"], atol=1e-5)
    if model.cfg.goal_condition:  # the goal the state token read, from both paths
        assert a["goal"].shape == (B, model.cfg.state_dim) and torch.allclose(a["goal"], b["goal"], atol=1e-5)


@pytest.mark.parametrize("head", ["flow", "discrete"])
def test_side_planner_decodes_a_plan_the_actions_never_read(head):
    torch.manual_seed(0)
    model = VLA(tiny_config(actions_read_plan=False, action_head=head, frame="aux")).eval()
    batch = model_batch(model.cfg)
    other = dict(batch, plan_tokens=batch["plan_tokens"].roll(1, 0), plan_mask=batch["plan_mask"].roll(1, 0))
    noise = torch.randn(B, model.cfg.horizon, model.cfg.action_dim)
    fnoise = torch.randn(B, 3, 8, 8)
    a, b = (model.sample(x, noise=noise, frame_noise=fnoise) for x in (batch, other))
    assert torch.equal(b["plan_tokens"], other["plan_tokens"])  # the given plan is there ...
    assert torch.allclose(a["actions"], b["actions"], atol=1e-6)  # ... and changes no action
    assert torch.allclose(a["frame"], b["frame"], atol=1e-6)
    fixed = {"time": torch.rand(B), "frame_time": torch.rand(B)} | ({"noise": noise} if head == "flow" else {})
    la, lb = (model.compute_loss(dict(x, **fixed)) for x in (batch, other))
    assert torch.allclose(la["action_loss"], lb["action_loss"], atol=1e-6)  # in training neither
    assert not torch.allclose(la["plan_loss"], lb["plan_loss"])  # while the plan is still trained
    unplanned = {k: v for k, v in batch.items() if not k.startswith("plan")}
    decoded = model.sample(unplanned, noise=noise, frame_noise=fnoise)
    assert decoded["plan_tokens"] is not None and len(decoded["plan_text"]) == B
    assert torch.allclose(decoded["actions"], a["actions"], atol=1e-5)  # a decoded plan changes nothing either
    reading = VLA(tiny_config(action_head=head, frame="aux")).eval()
    reading.load_state_dict(model.state_dict())  # same weights, plan visible: the actions move with the plan
    assert not torch.allclose(reading.sample(batch, noise=noise, frame_noise=fnoise)["actions"],
                              reading.sample(other, noise=noise, frame_noise=fnoise)["actions"])


def test_given_plan_is_used_and_missing_plan_is_an_error():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval()
    batch = model_batch(model.cfg)
    noise = torch.randn(B, model.cfg.horizon, model.cfg.action_dim)
    a = model.sample(batch, noise=noise)
    b = model.sample(batch, noise=noise, use_cache=False)
    assert torch.equal(a["plan_tokens"], batch["plan_tokens"]) and a["plan_text"][1] == "push"
    assert torch.allclose(a["actions"], b["actions"], atol=1e-5)
    other = dict(batch, plan_tokens=batch["plan_tokens"].roll(1, 0), plan_mask=batch["plan_mask"].roll(1, 0))
    assert not torch.allclose(model.sample(other, noise=noise)["actions"], a["actions"])  # actions read the plan
    no_plan = {k: v for k, v in batch.items() if not k.startswith("plan")}
    with pytest.raises(ValueError, match="no 'plan_tokens' and decode_plan=False"):
        model.sample(no_plan, decode_plan=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        model.sample(batch, noise=torch.randn(1, 2, 3))
    framed = VLA(tiny_config(frame="aux"))
    with pytest.raises(ValueError, match=r"frame_noise must have shape \(3, 3, 8, 8\), got \(3, 3, 4, 4\)"):
        framed.sample(batch, frame_noise=torch.randn(3, 3, 4, 4))


def _layer(w: int, cfg: VLAConfig, adaptive: bool) -> int:
    norms = 2 * (w * 3 * w + 3 * w) if adaptive else 2 * w
    inner = cfg.n_heads * cfg.head_dim
    return norms + w * 3 * inner + inner * w + 2 * w * int(cfg.mlp_ratio * w)


def _expert(w: int, cfg: VLAConfig, adaptive: bool) -> int:
    return cfg.n_layers * _layer(w, cfg, adaptive) + w


def _expected(cfg: VLAConfig) -> int:
    d, p, (h, w) = cfg.d_model, cfg.patch_size, cfg.image_hw
    dense = cfg.experts == "dense"
    vocab = 256 + 5 + cfg.action_bins
    n = 3 * p * p * d + d + (h // p) * (w // p) * d + cfg.num_views * d + vocab * d + _expert(d, cfg, False)
    s_in = cfg.state_dim * cfg.n_obs_steps
    if cfg.action_head == "discrete":
        n += s_in * d + d
    else:
        wa = d if dense else cfg.action_width
        n += s_in * wa + wa + cfg.action_dim * wa + wa + 2 * (wa * wa + wa) + wa * cfg.action_dim + cfg.action_dim
        n += 0 if dense else _expert(wa, cfg, True)
    if cfg.frame != "off":
        wf, pp = (d if dense else cfg.frame_width), 3 * p * p
        n += pp * wf + wf + (cfg.frame_size // p) ** 2 * wf + 2 * (wf * wf + wf) + wf * pp + pp
        n += 0 if dense else _expert(wf, cfg, True)
    return n


@pytest.mark.parametrize("kw", [dict(), dict(experts="dense"), dict(frame="aux"), dict(experts="dense", frame="aux"),
                                dict(action_head="discrete", frame="aux")])
def test_parameter_counts(kw):
    cfg = tiny_config(**kw)
    assert sum(p.numel() for p in VLA(cfg).parameters()) == _expected(cfg)


def test_dense_is_mot_minus_the_expert_copies():
    kw = dict(d_model=32, action_width=32, frame_width=32, frame="aux")
    mot, dense = VLA(tiny_config(**kw)), VLA(tiny_config(experts="dense", **kw))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    copies = count(mot.action["expert"]) + count(mot.frame["expert"])
    assert count(dense) == count(mot) - copies
    assert copies > count(mot.vlm["expert"])  # two time-conditioned experts as wide as the trunk


def test_tiny_preset_is_about_one_million_parameters():
    from omegaconf import OmegaConf

    from vla.config import compose

    model_cfg = OmegaConf.to_container(compose("train", ["dataset.path=x"]).model)
    cfg = VLAConfig.from_dict(model_cfg, cameras=["corner"], image_size=64, state_dim=39, action_dim=4)
    n = sum(p.numel() for p in VLA(cfg).parameters())
    assert 0.6e6 < n < 1.5e6


@pytest.mark.parametrize("overrides, expect", [
    ([], dict(experts="mot", action_head="flow", planner=True, actions_read_plan=True, frame="off",
              knowledge_insulation=False)),
    (["planner=side"], dict(planner=True, actions_read_plan=False)),
    (["experts=dense", "planner=off", "frame=aux", "action_head=discrete"],
     dict(experts="dense", planner=False, frame="aux", action_head="discrete")),
    (["knowledge_insulation=on", "frame=condition", "model=small"],
     dict(knowledge_insulation=True, frame="condition", d_model=384)),
])
def test_switches_compose_from_hydra(overrides, expect):
    from omegaconf import OmegaConf

    from vla.config import compose

    model_cfg = OmegaConf.to_container(compose("train", ["dataset.path=x", *overrides]).model)
    cfg = VLAConfig.from_dict(model_cfg, cameras=["c"], image_size=32, state_dim=3, action_dim=2)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k


def test_config_round_trip_and_validation():
    cfg = tiny_config(frame="aux")
    assert VLAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert tiny_config(planner="off").planner is False
    bad = [
        (dict(experts="moe"), r"experts must be one of \('mot', 'dense'\), got 'moe'"),
        (dict(image_size=30), r"image_size \[30, 30\] is not divisible by patch_size 4"),
        (dict(state_dim=None), "state_dim must be a positive int, got None"),
        (dict(cameras=[]), "cameras must be a non-empty list"),
        (dict(frame_camera="wrist"), "frame_camera 'wrist' is not one of cameras"),
        (dict(action_head="discrete", frame="condition"), "frame='condition' needs action_head='flow'"),
        (dict(experts="dense", knowledge_insulation=True), "knowledge_insulation needs experts='mot'"),
        (dict(planner="maybe"), "planner must be a bool"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            tiny_config(**kw)
    with pytest.raises(ValueError, match=r"unknown keys \['d_modle'\]"):
        VLAConfig.from_dict({**cfg.to_dict(), "d_modle": 3})


def test_from_store_fills_data_fields():
    class FakeStore:
        cameras = {"corner": (32, 32), "wrist": (32, 32)}
        state_dim, action_dim = 7, 2

    cfg = VLAConfig.from_store({"patch_size": 8}, FakeStore())
    assert cfg.cameras == ["corner", "wrist"] and cfg.image_hw == (32, 32) and cfg.state_dim == 7
    with pytest.raises(ValueError, match=r"cameras \['top'\] are not in the store"):
        VLAConfig.from_store({"cameras": ["top"]}, FakeStore())


@pytest.mark.parametrize("key, edit, match", [
    ("images", lambda x: x[:, :, :, :8], r"'images' expected shape \[B, 1, 3, 16, 16\], got \[3, 1, 3, 8, 16\]"),
    ("state", lambda x: x[:, :2], r"'state' expected shape \[B, 5\], got \[3, 2\]"),
    ("actions", lambda x: None, r"'actions' must be a tensor of shape \[B, 6, 3\], got NoneType"),
    ("plan_mask", lambda x: x[:, :3], r"'plan_tokens' \[3, 16\] and 'plan_mask' \[3, 3\] differ"),
    ("future_frame", lambda x: x[:, :, :4], r"'future_frame' expected shape \[B, 3, 8, 8\]"),
])
def test_bad_model_batches_get_clear_errors(key, edit, match):
    model = VLA(tiny_config(frame="aux"))
    batch = model_batch(model.cfg)
    with pytest.raises(ValueError, match=match):
        model.compute_loss({**batch, key: edit(batch[key])})
    if key in ("images", "state"):
        with pytest.raises(ValueError, match=match):
            model.sample({**batch, key: edit(batch[key])})


@pytest.mark.parametrize("gelu,approximate", [("tanh", "tanh"), ("erf", "none")])
def test_conv_stem_in_channels_last_equals_the_plain_layout(gelu, approximate):
    """The stem runs channels-last (faster on the CPU); its tokens must be those of the same convolutions in
    the plain NCHW layout, row-major per view, with FiLM and CoordConv on, and the GELU the config names."""
    import torch.nn.functional as F

    from vla.model import ConvStem, conv_strides

    torch.manual_seed(0)
    stem = ConvStem(conv_strides(16), 32, film=True, coords=True, gelu=gelu)
    for film in stem.films:
        torch.nn.init.normal_(film.weight, std=0.1)  # zero-initialised: make FiLM matter
    img, cond = torch.randn(3, 3, 32, 32), torch.randn(3, 32)
    out = stem(img, cond)
    n, _, h, w = img.shape
    ys = torch.linspace(-1, 1, h)[:, None].expand(h, w)
    xs = torch.linspace(-1, 1, w)[None, :].expand(h, w)
    x = torch.cat([img, torch.stack([xs, ys]).expand(n, 2, h, w)], 1).contiguous()
    for conv, film in zip(stem.convs, stem.films):
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding).contiguous()
        scale, shift = film(cond).chunk(2, dim=-1)
        x = F.gelu(x * (1 + scale[:, :, None, None]) + shift[:, :, None, None], approximate=approximate)
    ref = F.conv2d(x, stem.out.weight, stem.out.bias).flatten(2).transpose(1, 2)  # (N, h*w, D)
    assert out.shape == ref.shape == (3, 4, 32)
    assert torch.allclose(out, ref, atol=1e-5)
    assert out.is_contiguous()


def test_gelu_is_erf_in_the_presets_tanh_for_configs_without_the_key_and_checked():
    """New runs use the exact (erf) GELU, ~5x faster than the tanh form in bf16 on the CPU; a checkpoint saved
    before the key existed has no ``gelu`` and must rebuild the tanh model it was trained as."""
    import torch.nn.functional as F

    from vla.config import compose
    from vla.model import mlp_fn

    for preset in ("tiny", "small", "base"):
        assert compose("train", [f"model={preset}", "dataset.path=unused"]).model.gelu == "erf"
    old = tiny_config()
    assert old.gelu == "tanh"
    new = tiny_config(gelu="erf")
    for cfg, approximate in ((old, "tanh"), (new, "none")):
        torch.manual_seed(0)
        model = VLA(cfg)
        layer = model.vlm["expert"].layers[0]
        assert layer.mlp[1].approximate == approximate
        h = torch.randn(2, 5, cfg.d_model)
        ref = layer.mlp[2](F.gelu(layer.mlp[0](h), approximate=approximate))
        assert torch.allclose(mlp_fn(layer, h), ref, atol=1e-6)  # the functional path the model runs
    with pytest.raises(ValueError, match=r"VLAConfig.gelu must be 'tanh' or 'erf', got 'relu'"):
        tiny_config(gelu="relu")
