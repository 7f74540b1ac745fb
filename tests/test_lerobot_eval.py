"""scripts/lerobot_eval.py: our observations become LeRobot batches (keys, shapes, ranges), a camera the
policy reads but the env does not render is a clear error, and the script says how to get LeRobot when
it is missing. The closed-loop ACT baseline itself needs the LeRobot venv (docs/RESULTS.md)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lerobot_eval.py"


def load_module():
    spec = importlib.util.spec_from_file_location("lerobot_eval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def obs(seed):
    rng = np.random.default_rng(seed)
    return {"images": {"front": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
                       "wrist": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)},
            "state": rng.normal(size=4).astype(np.float32)}


def test_lerobot_batch_keys_shapes_and_pixels():
    mod = load_module()
    o = [obs(0), obs(1)]
    b = mod.lerobot_batch(o, ["pick up the red cube", "open the drawer"], ["front", "wrist"])
    assert set(b) == {"observation.state", "task", "observation.images.front", "observation.images.wrist"}
    assert b["observation.images.front"].shape == (2, 3, 8, 6) and b["observation.images.front"].dtype == torch.float32
    # channel-first, scaled to [0, 1], pixel for pixel
    np.testing.assert_allclose(b["observation.images.wrist"][1].permute(1, 2, 0).numpy() * 255.0,
                               o[1]["images"]["wrist"].astype(np.float32), atol=1e-4)
    np.testing.assert_array_equal(b["observation.state"].numpy(), np.stack([x["state"] for x in o]))
    assert b["task"] == ["pick up the red cube", "open the drawer"]


def test_lerobot_batch_names_a_missing_camera():
    mod = load_module()
    with pytest.raises(KeyError, match=r"reads cameras \['top'\].*renders \['front', 'wrist'\].*\['top'\] missing"):
        mod.lerobot_batch([obs(0)], ["x"], ["top"])


def test_script_without_lerobot_names_the_setup_command():
    try:
        import lerobot  # noqa: F401
        pytest.skip("LeRobot is installed here; the missing-package path cannot be reached")
    except ImportError:
        pass
    r = subprocess.run([sys.executable, str(SCRIPT), "ckpt", "--tasks", "pick-place", "--out", "x"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "bash scripts/lerobot_venv.sh" in r.stderr
