"""`vla report` (tables from many runs) and `vla train -m` (Hydra multirun sweeps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_utils import TINY, make_store


def _fake_run(root: Path, name: str, cfg: dict, per_task: dict[str, tuple[int, int]], params: int = 1000,
              flops: int | None = None) -> Path:
    run = root / name
    (run / "eval" / "step_0000100").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if flops is not None:
        (run / "run_info.json").write_text(json.dumps({"flops_per_chunk": flops}))
    (run / "train.log").write_text(f"start step=0 steps=100 params={params}\nend step=100\n")
    info = {"per_task": {t: {"successes": k, "episodes": n, "success_rate": k / n} for t, (k, n) in per_task.items()}}
    (run / "eval" / "step_0000100" / "eval_info.json").write_text(json.dumps(info))
    return run


def test_report_groups_seeds_into_variants_and_pools_with_wilson(tmp_path, capsys):
    from vla.commands.report import build_table, load_run, main
    from vla.evaluation import wilson_interval

    base = {"seed": 0, "planner": True, "model": {"d_model": 64}, "run_dir": "x", "dataset": {"path": "a"}}
    runs = [
        _fake_run(tmp_path, "on0", {**base, "seed": 0, "run_dir": "r0"}, {"stack": (8, 10), "push": (5, 10)},
                  flops=600_000_000),
        _fake_run(tmp_path, "on1", {**base, "seed": 1, "run_dir": "r1"}, {"stack": (6, 10), "push": (5, 10)},
                  flops=640_000_000),
        _fake_run(tmp_path, "off0", {**base, "planner": False, "seed": 0}, {"stack": (2, 10), "push": (4, 10)}),
    ]
    table = build_table([load_run(r) for r in runs])
    assert table["tasks"] == ["stack", "push"]
    labels = [v["variant"] for v in table["variants"]]
    assert labels == ["planner=on", "planner=off"]  # only the key that differs; seeds and paths ignored
    on = table["variants"][0]
    assert on["seeds"] == [0, 1]
    assert on["per_task"]["stack"]["successes"] == 14 and on["per_task"]["stack"]["episodes"] == 20
    assert on["per_task"]["stack"]["per_seed"] == [0.8, 0.6]
    assert on["per_task"]["stack"]["ci95"] == list(wilson_interval(14, 20))
    assert on["pooled"] == {"successes": 24, "episodes": 40, "rate": 0.6, "ci95": list(wilson_interval(24, 40))}
    assert on["mean_over_tasks"] == pytest.approx((0.7 + 0.5) / 2)
    assert on["steps"] == 100 and on["params"] == 1000
    # FLOPs per chunk differ between seeds (the first sample's decoded plan): the table gives their mean.
    assert on["flops_per_chunk"] == pytest.approx(620_000_000)
    assert table["variants"][1]["flops_per_chunk"] is None

    assert main([str(r) for r in runs] + ["--out", str(tmp_path / "rep"), "--title", "planner"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| planner=on | 0,1 | 70% [" in md and "(14/20)" in md and "| planner=off | 0 |" in md
    assert "| 0.62 |" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["tasks"] == ["stack", "push"]
    assert "planner=on" in capsys.readouterr().out


def test_report_errors_name_the_folder(tmp_path):
    from vla.commands.report import load_run

    with pytest.raises(ValueError, match="not a folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ValueError, match=r"run has no evaluation \(expected eval/step_\*/eval_info.json"):
        load_run(tmp_path / "run")


def test_sweep_jobs_is_hydra_cartesian_product():
    from vla.commands.train import sweep_jobs

    jobs = sweep_jobs(["planner=on,off", "seed=range(0,2)", "dataset.path=x"])
    assert jobs == [["planner=on", "seed=0", "dataset.path=x"], ["planner=on", "seed=1", "dataset.path=x"],
                    ["planner=off", "seed=0", "dataset.path=x"], ["planner=off", "seed=1", "dataset.path=x"]]
    with pytest.raises(ValueError, match="cannot parse overrides"):
        sweep_jobs(["planner=on,,"])


def test_multirun_of_two_tiny_variants_trains_evaluates_and_reports(tmp_path):
    store = make_store(tmp_path / "s.zarr", episodes=2, length=8)
    # The synthetic store has no simulator: train two variants, evaluate nothing, and check the jobs ran.
    cmd = [sys.executable, "-m", "vla", "train", "-m", "model.d_model=16,32", f"dataset.path={store}", "trainer=debug",
           "device=cpu", f"output_root={tmp_path / 'out'}", *[o for o in TINY if not o.startswith("model.d_model")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2/2 jobs finished" in proc.stdout
    sweep = next((tmp_path / "out" / "multirun").glob("*/*"))
    jobs = yaml.safe_load((sweep / "multirun.yaml").read_text())["jobs"]
    assert [j["dir"] for j in jobs] == ["00_d_model-16", "01_d_model-32"]
    for j, width in zip(jobs, (16, 32)):
        cfg = yaml.safe_load((sweep / j["dir"] / "config.yaml").read_text())
        assert cfg["model"]["d_model"] == width
        assert (sweep / j["dir"] / "checkpoints" / "last").exists()


def test_multirun_refuses_run_dir(tmp_path):
    from vla.commands.train import main

    with pytest.raises(ValueError, match="run_dir and resume cannot be given to a sweep"):
        main(["-m", "seed=0,1", f"run_dir={tmp_path}"])


def test_sweep_job_names_use_only_the_swept_keys():
    from vla.commands.train import job_names, sweep_jobs

    overrides = ["experts=dense", "seed=0,1", "model.vision_film=true", "model.d_model=16,32"]
    jobs = sweep_jobs(overrides)
    assert len(jobs) == 4 and all("model.vision_film=True" in j for j in jobs)  # Hydra re-spells the fixed bool
    assert job_names(overrides, jobs) == ["00_seed-0_d_model-16", "01_seed-0_d_model-32",
                                          "02_seed-1_d_model-16", "03_seed-1_d_model-32"]


def test_report_rows_follow_the_evaluation_conditions_not_the_training_eval_schedule(tmp_path):
    from vla.commands.report import build_table, load_run

    base = {"seed": 0, "planner": True, "eval": {"every": 0, "episodes": 10}}
    sweep = {**base, "seed": 1, "eval": {"every": 3000, "episodes": 50}}  # a sweep job that evaluated itself
    runs = [_fake_run(tmp_path, "a", base, {"push": (5, 10)}), _fake_run(tmp_path, "b", sweep, {"push": (7, 10)}),
            _fake_run(tmp_path, "c", base, {"push": (9, 10)})]
    for run, split in zip(runs, ("paraphrase", "paraphrase", "train")):
        p = run / "eval" / "step_0000100" / "eval_info.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "instruction_split": split, "seed_start": 3}))
    table = build_table([load_run(r) for r in runs])
    assert [(v["variant"], v["seeds"]) for v in table["variants"]] == [
        ("eval.instruction_split=paraphrase", [0, 1]), ("eval.instruction_split=train", [0])]


def test_report_wall_time_leaves_out_evaluations_run_inside_training(tmp_path):
    from vla.commands.report import load_run

    run = _fake_run(tmp_path, "old", {"seed": 0}, {"push": (1, 2)})
    p = run / "eval" / "step_0000100" / "eval_info.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "aggregated": {"eval_s": 30.0}}))
    (run / "run_info.json").write_text(json.dumps({"wall_s": 100.0}))  # before eval_s was recorded: included
    assert load_run(run)["wall_s"] == pytest.approx(70.0)
    (run / "run_info.json").write_text(json.dumps({"wall_s": 100.0, "eval_s": 31.0}))  # already training only
    assert load_run(run)["wall_s"] == pytest.approx(100.0)


def test_report_chart_takes_rates_at_the_edges(tmp_path):
    """0/N and N/N rows: the interval's edge equals the rate only up to rounding (a tiny negative error
    bar made matplotlib refuse the chart)."""
    from vla.commands.report import main
    runs = [_fake_run(tmp_path, f"r{s}", {"seed": s, "planner": p}, {"stack": (k, 30), "push": (30 - k, 30)})
            for s, (p, k) in enumerate([(True, 0), (False, 30)])]
    assert main([str(r) for r in runs] + ["--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    assert "0% [0.00, 0.11] (0/30)" in (tmp_path / "rep" / "report.md").read_text()
