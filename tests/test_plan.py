"""`vla plan`: a tiny model overfit on one plan string decodes exactly that plan from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_vla import INSTRUCTION, PLAN, make_tiny, overfit_plan, save_tiny

from vla.commands import plan as plan_cmd


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("plan")
    from vla.envs import make_env

    img = np.random.default_rng(5).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "scene.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    env = make_env("metaworld", "drawer-open-v3", cameras=("corner",), image_size=32)
    scene = env.reset(seed=1000003)[0]["images"]["corner"]  # the scene test_plan_from_env_scene asks about
    env.close()
    model, proc = make_tiny(frame="aux")
    losses = overfit_plan(model, proc, steps=150, extra_images=[img, scene])
    assert losses[-1] < 0.2 * losses[0]  # the plan loss really drops
    return save_tiny(root / "run", model, proc), root / "scene.png"


def test_plan_from_image_prints_the_trained_plan_and_frame(trained_run, tmp_path, capsys):
    run, png = trained_run
    argv = [f"checkpoint={run}", f"instruction={INSTRUCTION}", f"image={png}", f"run_dir={tmp_path / 'out'}"]
    assert plan_cmd.main(argv) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    i = lines.index("plan:")
    assert lines[i + 1 : i + 3] == PLAN.split("; ")
    assert (tmp_path / "out" / "plan.png").is_file() and "frame: " in out
    import cv2

    fig = cv2.imread(str(tmp_path / "out" / "plan.png"))
    assert fig.shape == (256, 256 * 2 + 8, 3)


def test_plan_from_env_scene(trained_run, tmp_path, capsys):
    run, _ = trained_run
    argv = [f"checkpoint={run}", "env=metaworld", "task=drawer-open-v3", "seed=1000003",
            f"instruction={INSTRUCTION}", f"run_dir={tmp_path}"]
    assert plan_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert f"instruction: {INSTRUCTION}" in out
    lines = [line.strip() for line in out.splitlines()]
    plan = lines[lines.index("plan:") + 1 : lines.index("plan:") + 3]
    assert plan == PLAN.split("; ")


def test_plan_errors_are_clear(trained_run, tmp_path):
    run, png = trained_run
    with pytest.raises(ValueError, match="needs checkpoint"):
        plan_cmd.main(["instruction=x"])
    with pytest.raises(ValueError, match="needs a scene"):
        plan_cmd.main([f"checkpoint={run}", "instruction=x"])
    with pytest.raises(ValueError, match="file not found"):
        plan_cmd.main([f"checkpoint={run}", "instruction=x", f"image={tmp_path / 'nope.png'}"])
    with pytest.raises(ValueError, match="state: expected 4 numbers"):
        plan_cmd.main([f"checkpoint={run}", "instruction=x", f"image={png}", "state=[1,2]"])


def test_quote_free_text():
    from vla.config import compose

    args = plan_cmd.quote_free_text(["instruction=open it, then close it's lid", "seed=3"])
    cfg = compose("plan", args)
    assert cfg.instruction == "open it, then close it's lid" and cfg.seed == 3
