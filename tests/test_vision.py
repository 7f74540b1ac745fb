"""The `vision` switch: a linear map of raw patches (ViT) or a strided conv stem."""

from __future__ import annotations

import pytest
import torch
from model_helpers import model_batch, tiny_config

from vla.model import VLA, ConvStem, SpatialSoftmax
from vla.model_config import conv_strides


def test_conv_strides_factor_the_patch_size():
    assert conv_strides(8) == [2, 2, 2]
    assert conv_strides(12) == [2, 2, 3]
    assert conv_strides(16) == [2, 2, 2, 2]
    assert conv_strides(5) == [] and conv_strides(1) == []


@pytest.mark.parametrize("patch", [4, 8, 12])
def test_conv_stem_gives_one_token_per_patch_in_patchify_order(patch):
    stem = ConvStem(conv_strides(patch), width=24)
    img = torch.zeros(2, 3, 2 * patch, 3 * patch)
    img[0, :, patch:, 2 * patch:] = 1.0  # only the bottom-right patch of image 0 differs from zero
    out = stem(img)  # (2, 6, 24)
    assert out.shape == (2, 6, 24)
    changed = (out[0] - out[1]).abs().sum(-1) > 1e-6  # (6,)
    # Row-major: patch (1, 2) is token 5; the receptive field reaches a few pixels into its neighbours
    # (tokens 2 and 4), never into patch (0, 0).
    assert changed[5] and not changed[0] and not changed[3]


def test_conv_vision_trains_and_samples():
    cfg = tiny_config(vision="conv", image_size=16, patch_size=4)
    torch.manual_seed(0)
    model = VLA(cfg)
    batch = model_batch(cfg)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(40):
        loss = model.compute_loss(batch)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vlm["patch"].parameters())
    out = model.sample({k: v for k, v in batch.items() if k not in ("actions", "plan_tokens", "plan_mask")})
    assert out["actions"].shape == (3, cfg.horizon, cfg.action_dim)


def test_conv_vision_refuses_patch_sizes_it_cannot_reach():
    with pytest.raises(ValueError, match=r"vision='conv' needs patch_size = a product of 2s and 3s .* got 5"):
        tiny_config(vision="conv", image_size=20, patch_size=5)
    with pytest.raises(ValueError, match="VLAConfig.vision must be one of"):
        tiny_config(vision="resnet")


def test_film_starts_as_the_plain_stem_and_makes_tokens_depend_on_the_instruction():
    cfg = tiny_config(vision="conv", vision_film=True, image_size=16, patch_size=4)
    torch.manual_seed(0)
    film = VLA(cfg)
    plain = VLA(tiny_config(vision="conv", image_size=16, patch_size=4))
    plain.load_state_dict({k: v for k, v in film.state_dict().items() if "films" not in k})
    batch = model_batch(cfg)
    assert torch.equal(film.embed_prefix(batch).x, plain.embed_prefix(batch).x)  # zero-init FiLM = identity
    with torch.no_grad():
        for f in film.vlm["patch"].films:
            f.weight.normal_(0, 0.5)
    other = dict(batch, instruction_tokens=batch["instruction_tokens"].flip(0), instruction_mask=batch[
        "instruction_mask"].flip(0))
    n_img = 16 // 4 * (16 // 4)
    a, b = film.embed_prefix(batch).x[:, :n_img], film.embed_prefix(other).x[:, :n_img]
    assert not torch.allclose(a, b)  # same pixels, other instruction: other image tokens
    with pytest.raises(ValueError, match="vision_film=true needs vision='conv'"):
        tiny_config(vision_film=True)


def test_coord_channels_tell_identical_patches_apart_by_position():
    torch.manual_seed(0)
    plain, coords = ConvStem(conv_strides(4), width=8), ConvStem(conv_strides(4), width=8, coords=True)
    assert coords.convs[0].in_channels == 5 and plain.convs[0].in_channels == 3
    img = torch.zeros(1, 3, 32, 32)  # 8 x 8 identical (empty) patches
    p, c = plain(img)[0], coords(img)[0]  # (64, 8)
    # Two interior patches (row 3, columns 3 and 4), away from the zero padding at the border:
    assert torch.allclose(p[27], p[28], atol=1e-6)  # a plain stem is translation-equivariant
    assert not torch.allclose(c[27], c[28], atol=1e-4)  # with x/y channels the token also says where it is
    cfg = tiny_config(vision="conv", vision_coords=True, image_size=16, patch_size=4)
    obs = {k: v for k, v in model_batch(cfg).items() if k not in ("actions", "plan_tokens", "plan_mask")}
    out = VLA(cfg).sample(obs)
    assert out["actions"].shape[0] == 3
    with pytest.raises(ValueError, match=r"vision_coords=true needs vision='conv' \(coordinate channels"):
        tiny_config(vision_coords=True)


def test_spatial_softmax_finds_where_a_detector_fires():
    kp = SpatialSoftmax(channels=1, keypoints=1, width=8)
    with torch.no_grad():
        kp.score.weight.fill_(1.0)
        kp.score.bias.zero_()
        kp.log_temperature.fill_(-3.0)  # sharp: the mean sits on the peak
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 2, 5] = 10.0  # row 2, column 5
    x[1, 0, 7, 0] = 10.0  # bottom-left corner
    grid = torch.linspace(-1, 1, 8)
    pts = kp.points(x)  # (2, 1, 2)
    assert torch.allclose(pts[0, 0], torch.stack([grid[5], grid[2]]), atol=1e-3)
    assert torch.allclose(pts[1, 0], torch.tensor([-1.0, 1.0]), atol=1e-3)
    assert kp(x).shape == (2, 1, 8)


def test_keypoints_add_one_token_per_view_that_follows_the_object():
    cfg = tiny_config(vision="conv", vision_keypoints=4, image_size=16, patch_size=4)
    assert cfg.tokens_per_view == 4 * 4 + 1 and cfg.num_image_tokens == cfg.num_views * 17
    torch.manual_seed(0)
    model = VLA(cfg)
    stem = model.vlm["patch"]
    assert stem.keypoint_stage == 1  # the map at 1/4 resolution
    img = torch.zeros(2, 3, 16, 16)
    img[0, :, 2:4, 2:4] = 1.0  # the same square, top-left in image 0, bottom-right in image 1
    img[1, :, 12:14, 12:14] = 1.0
    out = stem(img)  # (2, 17, D)
    assert out.shape == (2, 17, cfg.d_model)
    assert not torch.allclose(out[0, -1], out[1, -1], atol=1e-5)  # the keypoint token moved with the square
    batch = model_batch(cfg)
    assert model.embed_prefix(batch).x.shape[1] == cfg.num_image_tokens + batch["instruction_tokens"].shape[1]
    loss = model.compute_loss(batch)["loss"]
    loss.backward()
    assert stem.keypoints.score.weight.grad.abs().sum() > 0  # the detectors learn from the action loss
    obs = {k: v for k, v in batch.items() if k not in ("actions", "plan_tokens", "plan_mask")}
    assert model.eval().sample(obs)["actions"].shape[0] == batch["actions"].shape[0]
    with pytest.raises(ValueError, match=r"vision_keypoints=4 needs vision='conv'"):
        tiny_config(vision_keypoints=4)
    with pytest.raises(ValueError, match=r"vision_keypoints must be an int >= 0"):
        tiny_config(vision="conv", vision_keypoints=-1, image_size=16, patch_size=4)
