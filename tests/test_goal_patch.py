"""The dense goal target (model.goal_patch_loss_weight): a camera projection that lands on the objects
it names, the patch index it gives, the cross-entropy that teaches the point head's patch scores, and
the training loop's wiring (projection from the store's env, the goal pixel moved with the random shift)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_camera_projection_lands_on_each_object_in_its_colour():
    from vla.envs import make_env
    from vla.envs.rendering import camera_projection, project_points
    from vla.envs.tabletop import scene as S
    from vla.envs.tabletop import tasks as T

    env = make_env("tabletop", "pick-place", cameras=("front",), image_size=96, layout="slots")
    try:
        for seed in (0, 1):
            obs, info = env.reset(seed=seed)
            e = env.unwrapped
            p = camera_projection(e.model, e.data, "front", 96)
            img = obs["images"]["front"].astype(np.float32) / 255.0
            palette = {c: np.array(rgb) for c, rgb in S.COLOR_RGBA.items()}
            objects = [o for o in T.decode_privileged(info["privileged"])["objects"] if o["present"]]
            assert len(objects) >= 2
            for obj in objects:
                col, row = project_points(p, np.asarray(obj["pos"]))
                px = img[int(row), int(col)]  # the pixel the projection names
                nearest = min(palette, key=lambda c: np.abs(palette[c] - px).sum())
                assert nearest == obj["color"], (seed, obj, px)
    finally:
        env.close()
    turned = camera_projection(e.model, e.data, "front", 96, rotated=True)
    pt = np.array([0.1, 0.05, 0.02])
    np.testing.assert_allclose(project_points(turned, pt), 96 - project_points(p, pt), atol=1e-4)
    with pytest.raises(ValueError, match="no camera 'top'"):
        camera_projection(e.model, e.data, "top", 96)


def test_goal_patch_target_and_loss_teach_the_patch_scores():
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    torch.manual_seed(0)
    cfg = tiny_config(goal_loss_weight=1.0, goal_head="point", vision="conv", goal_patch_loss_weight=1.0)
    model = VLA(cfg)
    p, (h, w) = cfg.patch_size, cfg.image_hw
    gw = w // p
    pix = torch.tensor([[0.0, 0.0], [w - 0.5, h - 0.5], [p + 1.0, 2 * p + 1.0], [-1.0, 3.0], [float("nan"), 1.0],
                        [w + 0.0, 1.0]])
    assert model.goal_patch_target(pix).tolist() == [0, (h // p) * gw - 1, 2 * gw + 1, -100, -100, -100]

    batch = model_batch(cfg)
    b = batch["state"].shape[0]
    for k, v in batch.items():  # one instruction, state and plan for all: only the image tells the patches apart
        if torch.is_tensor(v) and v.ndim and v.shape[0] == b:
            batch[k] = v[:1].expand_as(v).clone()
    cells = torch.tensor([0, gw * (h // p) - 1, gw - 1][:b])
    images = torch.full_like(batch["images"], -1.0)
    for i, c in enumerate(cells.tolist()):
        r, q = divmod(c, gw)
        images[i, 0, :, r * p:(r + 1) * p, q * p:(q + 1) * p] = 1.0
    batch["images"] = images
    batch["goal_state"] = torch.zeros(b, cfg.state_dim)
    centres = torch.stack([(cells % gw).float() * p + p / 2, (cells // gw).float() * p + p / 2], -1)  # (B, 2)
    batch["goal_pixel"] = centres
    losses = model.compute_loss(batch)
    total = losses["plan_loss"] + losses["action_loss"] + losses["goal_loss"] + losses["goal_patch_loss"]
    assert torch.allclose(losses["loss"], total)

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        model.compute_loss(batch)["goal_patch_loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        prefix = model._run([model.embed_prefix(batch)])[0][0]
        assert torch.equal(model.goal_scores(prefix).argmax(-1), cells)  # each sample's top patch is its goal
    with pytest.raises(ValueError, match="needs batch\\['goal_pixel'\\]"):
        model.compute_loss({k: v for k, v in batch.items() if k != "goal_pixel"})
    with pytest.raises(ValueError, match="goal_patch_loss_weight=1.0 needs the point goal head"):
        tiny_config(goal_loss_weight=1.0, goal_patch_loss_weight=1.0)
    with pytest.raises(ValueError, match="goal_patch_loss_weight must be a number >= 0"):
        tiny_config(goal_loss_weight=1.0, goal_head="point", goal_patch_loss_weight=-0.5)


def test_trainer_projects_goals_and_moves_them_with_the_shift(tmp_path):
    from train_utils import train_cfg
    from vla.envs.rendering import project_points

    from vla.cli import main as cli_main
    from vla.training import Trainer
    from vla.training import distributed as dist_utils

    store = tmp_path / "tt.zarr"
    assert cli_main(["collect", "env=tabletop", "env.layout=slots", "tasks=[pick-place]", "episodes=2", "workers=0",
                     "image_size=32", "cameras=[front]", f"out={store}"]) == 0
    over = ["model.goal_loss_weight=1.0", "model.goal_head=point", "model.vision=conv", "model.patch_size=8",
            "model.goal_patch_loss_weight=1.0", "model.cameras=[front]", "trainer.augment.shift=3",
            "trainer.augment.brightness=0", "trainer.augment.contrast=0", "trainer.augment.saturation=0"]
    t = Trainer(train_cfg(store, tmp_path / "run", *over), dist_utils.init("cpu"))
    assert t.processor.goal_camera.shape == (3, 4)
    raw = next(iter(t.loader()))
    want = project_points(t.processor.goal_camera, raw["goal_state"][:, :3].numpy())
    batch = t.processor.training_batch(raw, "cpu")
    np.testing.assert_allclose(batch["goal_pixel"].numpy(), want, atol=1e-4)

    # A bright dot at each goal pixel stays under the goal pixel after the random shift.
    img = torch.full_like(batch["images"], -1.0)
    hw = img.shape[-1]
    inside = []
    for i, (c, r) in enumerate(batch["goal_pixel"].round().long().tolist()):
        if 4 <= c < hw - 4 and 4 <= r < hw - 4:
            img[i, 0, :, r, c] = 1.0
            inside.append(i)
    assert inside
    for step in (0, 1, 2):
        shifted, pix = t._augment(img, step, batch["goal_pixel"].round())
        for i in inside:
            c, r = pix[i].long().tolist()
            assert shifted[i, 0, 0, r, c] == 1.0 and shifted[i, 0, 0].sum() == 1.0 - (hw * hw - 1)
    loss = t.train_step(raw)
    assert np.isfinite(loss["goal_patch_loss"]) and loss["goal_patch_loss"] > 0
    with pytest.raises(ValueError, match="fixed in the world"):
        from vla.training.data import store_camera_projection

        store_camera_projection(t.store, "wrist", (32, 32))


def test_goal_offset_learns_where_inside_its_patch_the_goal_lies():
    from model_helpers import model_batch, tiny_config

    from vla.model import VLA

    with pytest.raises(ValueError, match="goal_offset=true needs the patch target"):
        tiny_config(goal_loss_weight=1.0, goal_head="point", goal_offset=True)
    with pytest.raises(ValueError, match="goal_offset must be true or false"):
        tiny_config(goal_loss_weight=1.0, goal_head="point", goal_patch_loss_weight=1.0, goal_offset="yes")
    torch.manual_seed(0)
    cfg = tiny_config(goal_loss_weight=1.0, goal_head="point", vision="conv", goal_patch_loss_weight=1.0,
                      goal_offset=True, image_size=16, patch_size=8)  # a 2 x 2 grid of 8 px patches
    model = VLA(cfg)
    # where a pixel lies in its patch, in patch widths from the centre; unknown rows are 0
    pix = torch.tensor([[2.0, 2.0], [12.0, 9.0], [-1.0, 3.0]])
    patch = model.goal_patch_target(pix)
    assert patch.tolist() == [0, 3, -100]
    expected = torch.tensor([[-0.25, -0.25], [0.0, -0.375], [0.0, 0.0]])
    assert torch.allclose(model.goal_offset_target(pix, patch), expected)

    batch = model_batch(cfg)
    b = batch["state"].shape[0]
    for k, v in batch.items():  # same instruction, state and plan: only the image says where the goal is
        if torch.is_tensor(v) and v.ndim and v.shape[0] == b:
            batch[k] = v[:1].expand_as(v).clone()
    corners = [(1, 1), (5, 1), (3, 5)]  # a 2 x 2 px square at three places inside the top-left patch
    images = torch.full_like(batch["images"], -1.0)
    for i, (c, r) in enumerate(corners[:b]):
        images[i, 0, :, r:r + 2, c:c + 2] = 1.0
    batch["images"] = images
    batch["goal_pixel"] = torch.tensor([[c + 1.0, r + 1.0] for c, r in corners[:b]])  # the square's centre
    batch["goal_state"] = torch.zeros(b, cfg.state_dim)
    target = model.goal_offset_target(batch["goal_pixel"], model.goal_patch_target(batch["goal_pixel"]))
    losses = model.compute_loss(batch)
    total = (losses["plan_loss"] + losses["action_loss"] + losses["goal_loss"] + losses["goal_patch_loss"]
             + losses["goal_offset_loss"])
    assert torch.allclose(losses["loss"], total)
    first = float(losses["goal_offset_loss"])

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        out = model.compute_loss(batch)
        (out["goal_offset_loss"] + out["goal_patch_loss"]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert float(model.compute_loss(batch)["goal_offset_loss"]) < 0.2 * first
        prefix = model._run([model.embed_prefix(batch)])[0][0]
        off = model.goal_offsets(prefix)[:, 0]  # (B, 2): the top-left patch's offsets
    assert (off - target).abs().max() < 0.08, (off, target)  # finer than the patch: each square where it is
