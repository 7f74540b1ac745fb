"""scripts/grasp_probe.py's summary: medians over successes and failures, rows without a close or a goal skipped."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("grasp_probe", ROOT / "scripts" / "grasp_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_splits_successes_from_failures_and_skips_missing_values():
    probe = load()
    rows = [
        {"success": True, "goal_err_cm": 1.0, "close_offset_cm": [0.3, 0.4, 0.0]},
        {"success": True, "goal_err_cm": 3.0, "close_offset_cm": [0.6, 0.8, 1.0]},
        {"success": False, "goal_err_cm": 4.0, "close_offset_cm": [3.0, 4.0, 0.0]},
        {"success": False, "goal_err_cm": None, "close_offset_cm": None},  # never closed, no goal head
    ]
    out = probe.summarize(rows)
    assert out["success"] == {"episodes": 2, "goal_err_cm": 2.0, "close_xy_offset_cm": 0.75}  # hypot 0.5 and 1.0
    assert out["failure"] == {"episodes": 2, "goal_err_cm": 4.0, "close_xy_offset_cm": 5.0}
    only_failures = probe.summarize([{"success": False, "goal_err_cm": None, "close_offset_cm": None}])
    assert set(only_failures) == {"failure"} and math.isnan(only_failures["failure"]["goal_err_cm"])
