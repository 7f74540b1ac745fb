"""Evaluation: Wilson intervals, aggregation, video frames/mp4, chart, and expert rollouts in MetaWorld."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vla.evaluation import (
    format_table,
    plot_success_chart,
    render_frame,
    summarize,
    wilson_interval,
    write_outputs,
    write_video,
)


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (8, 10, 0.4902, 0.9433),
        (45, 50, 0.7864, 0.9565),
        (1, 1, 0.2065, 1.0),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_summarize_and_table():
    eps = [{"task": "a", "success": s, "length": l} for s, l in [(True, 10), (False, 50), (True, 20)]]
    eps += [{"task": "b", "success": False, "length": 50}]
    r = summarize(eps, ["a", "b"])
    assert r["per_task"]["a"]["successes"] == 2 and r["per_task"]["a"]["episodes"] == 3
    assert r["per_task"]["a"]["success_rate"] == pytest.approx(2 / 3)
    assert r["per_task"]["a"]["mean_length"] == pytest.approx(80 / 3)
    assert r["per_task"]["a"]["mean_length_success"] == pytest.approx(15)
    assert r["per_task"]["b"]["mean_length_success"] is None
    assert r["overall"]["successes"] == 2 and r["overall"]["episodes"] == 4
    assert r["per_task"]["a"]["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    table = format_table(r)
    assert "2/3" in table and "0/1" in table and "overall" in table


def test_render_frame_upscales_and_writes_text(tmp_path):
    img = np.full((32, 32, 3), 50, np.uint8)
    f = render_frame({"corner": img}, "open the drawer", "reach the handle", step=3)
    assert f.dtype == np.uint8 and f.shape[1] == 256 and f.shape[0] % 16 == 0 and f.shape[0] > 256
    band = f[: f.shape[0] - 256]
    assert band.max() > 100  # text pixels drawn
    assert (f[-256:] == 50).all()  # nearest upscale keeps the pixels
    two = render_frame({"a": img, "b": img}, "x", None, success=True)
    assert two.shape[1] == 512 and (two[0, 0] == (0, 200, 0)).all()
    path = write_video([f] * 5, tmp_path / "v" / "ep.mp4", fps=10)
    assert path.is_file() and path.stat().st_size > 500
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="ffmpeg")
    frames = [fr for fr in reader]  # list(reader) fails: the ffmpeg reader reports len() = inf
    reader.close()
    assert len(frames) == 5 and frames[0].shape == f.shape


def test_chart_and_outputs(tmp_path):
    eps = [{"task": t, "success": i % 2 == 0, "length": 5, "seed": i} for t in ("a-v3", "b-v3") for i in range(4)]
    result = {"family": "x", **summarize(eps), "episodes": eps, "throughput": {"env_steps_per_s": np.float64(3.0)}}
    png = plot_success_chart(result, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = write_outputs(result, tmp_path / "out")
    info = json.loads(open(paths["eval_info"]).read())
    assert info["per_task"]["a-v3"]["successes"] == 2 and info["throughput"]["env_steps_per_s"] == 3.0
    assert info["chart"].endswith("success.png")


# ---- closed-loop rollouts in MetaWorld --------------------------------------------------------------
TASK = "drawer-open-v3"


def test_vla_eval_expert_command_writes_everything(tmp_path, capsys):
    from vla.commands import eval as eval_cmd

    argv = ["policy=expert", "env=metaworld", f"tasks=[{TASK}]", "episodes=3", "n_envs=1", "videos=1",
            "env.cameras=[corner]", "env.image_size=32", "progress=false", f"run_dir={tmp_path}"]
    assert eval_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert TASK in out and "eval_info:" in out
    info = json.loads((tmp_path / "eval_info.json").read_text())
    stats = info["per_task"][TASK]
    assert stats["episodes"] == 3 and stats["successes"] >= 2  # the scripted expert is the ceiling
    assert stats["ci95"][0] <= stats["success_rate"] <= stats["ci95"][1]
    assert [e["seed"] for e in info["episodes"]] == [1_000_000, 1_000_001, 1_000_002]  # EVAL_SEED_START + i
    assert all(e["instruction"] and e["length"] > 0 for e in info["episodes"])
    assert all(e["length"] < 200 for e in info["episodes"] if e["success"])  # stopped at success
    assert len(info["videos"]) == 1 and (tmp_path / "videos").is_dir()
    assert (tmp_path / "success.png").is_file() and (tmp_path / "config.yaml").is_file()
    assert info["throughput"]["env_steps"] == sum(e["length"] for e in info["episodes"])


def test_async_rollouts_match_in_process_rollouts():
    from vla.policies import ExpertPolicy

    from vla.evaluation import run_evaluation

    # short episodes (max_steps) keep it fast: the point is the same seeds give the same rollouts
    kw = {"env_kwargs": {"cameras": ("corner",), "image_size": 32}, "progress": False, "seed_start": 500,
          "max_steps": 25}
    sync = run_evaluation(ExpertPolicy("metaworld"), "metaworld", [TASK], 3, n_envs=1, **kw)
    par = run_evaluation(ExpertPolicy("metaworld"), "metaworld", [TASK], 3, n_envs=2, **kw)
    key = [(e["seed"], e["success"], e["length"], e["instruction"]) for e in sync["episodes"]]
    assert key == [(e["seed"], e["success"], e["length"], e["instruction"]) for e in par["episodes"]]
    assert [e["seed"] for e in par["episodes"]] == [500, 501, 502] and par["n_envs"] == 2
    assert all(e["length"] == 25 for e in par["episodes"])


def test_a_killed_eval_worker_has_its_episode_rerun():
    import multiprocessing
    import os
    import signal

    from vla.policies import ExpertPolicy

    from vla.evaluation import run_evaluation

    class KillsAWorker(ExpertPolicy):
        """Kills one env worker from outside (SIGKILL) on the 10th step, mid-episode."""

        calls = 0

        def act_batch(self, *args, **kwargs):
            KillsAWorker.calls += 1
            if KillsAWorker.calls == 10:
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
            return super().act_batch(*args, **kwargs)

    kw = {"env_kwargs": {"cameras": ("corner",), "image_size": 32}, "progress": False, "seed_start": 500,
          "max_steps": 25}
    sync = run_evaluation(ExpertPolicy("metaworld"), "metaworld", [TASK], 3, n_envs=1, **kw)
    par = run_evaluation(KillsAWorker("metaworld"), "metaworld", [TASK], 3, n_envs=2, **kw)
    assert len(par["rerun_episodes"]) == 1 and par["unfinished_episodes"] == []
    key = [(e["seed"], e["success"], e["length"], e["instruction"]) for e in sync["episodes"]]
    assert key == [(e["seed"], e["success"], e["length"], e["instruction"]) for e in par["episodes"]]


def test_vla_eval_tiny_checkpoint(tmp_path, capsys):
    from _tiny_vla import make_tiny, save_tiny

    from vla.commands import eval as eval_cmd

    model, proc = make_tiny()
    run = save_tiny(tmp_path / "run", model, proc, train={"eval": {"env": "metaworld", "tasks": [TASK]}})
    out_dir = tmp_path / "eval"
    argv = [f"checkpoint={run}", "episodes=2", "n_envs=1", "max_steps=12", "videos=1", "n_action_steps=4",
            "progress=false", f"run_dir={out_dir}"]  # env and tasks come from the checkpoint
    assert eval_cmd.main(argv) == 0
    info = json.loads((out_dir / "eval_info.json").read_text())
    assert info["tasks"] == [TASK] and info["family"] == "metaworld"
    assert info["env_kwargs"]["cameras"] == ["corner"] and info["env_kwargs"]["image_size"] == 32
    assert [e["length"] for e in info["episodes"]] == [12, 12]
    assert all(isinstance(e["final_plan"], list) for e in info["episodes"])
    assert len(info["videos"]) == 1
    with pytest.raises(ValueError, match="policy=vla needs checkpoint"):
        eval_cmd.main(["progress=false"])
    with pytest.raises(ValueError, match="policy=expert needs env"):
        eval_cmd.main(["policy=expert"])


def test_a_seed_replays_the_same_vla_episode_alone_or_beside_others():
    from _tiny_vla import make_tiny
    from vla.policies import VLAPolicy

    from vla.evaluation import run_evaluation

    model, proc = make_tiny()  # random weights: the actions are the flow noise pushed through the model
    kw = {"env_kwargs": {"cameras": ("corner",), "image_size": 32}, "progress": False, "max_steps": 16}

    def run(seed_start: int, episodes: int, n_envs: int) -> dict[int, float]:
        policy = VLAPolicy(model, proc, n_action_steps=4, seed=3)
        out = run_evaluation(policy, "metaworld", [TASK], episodes, n_envs=n_envs, seed_start=seed_start,
                             sync_chunks=False, **kw)
        return {e["seed"]: e["sum_reward"] for e in out["episodes"]}

    three = run(500, 3, n_envs=1)
    pair = run(500, 3, n_envs=2)
    alone = run(501, 1, n_envs=1)  # the second episode, replayed on its own
    assert sorted(three) == sorted(pair) == [500, 501, 502]
    for seed, ret in three.items():
        assert pair[seed] == pytest.approx(ret, rel=1e-4, abs=1e-4)
    assert alone[501] == pytest.approx(three[501], rel=1e-4, abs=1e-4)
    assert len(set(np.round(list(three.values()), 3))) == 3  # three scenes, three different returns


def test_bench_eval_prints_one_json_object(capsys):
    from vla.bench import eval as bench_eval

    with pytest.raises(ValueError, match="unknown key 'nope'"):
        bench_eval.parse_args(["nope=1"])
    with pytest.raises(ValueError, match="expert and/or vla"):
        bench_eval.parse_args(["policies=[robot]"])
    argv = ["policies=[expert]", "n_envs=[1]", "episodes=1", "max_steps=5", "image_size=32"]
    assert bench_eval.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    (entry,) = report["results"]
    assert report["benchmark"] == "eval" and entry["env_steps"] == 5 and entry["env_steps_per_s"] > 0
    assert entry["policy_ms_per_env_step"] > 0 and entry["env_ms_per_step"] > 0


def test_bench_eval_runs_a_baseline_model_file_alternately(capsys):
    from pathlib import Path

    from vla.bench import eval as bench_eval

    here = str(Path(bench_eval.__file__).resolve().parents[1] / "model.py")  # the current code as its own baseline
    argv = ["policies=[vla]", "n_envs=[1]", "episodes=1", "max_steps=4", "image_size=32", f"baseline={here}",
            "rounds=2", "torch_threads=1", "replan_every=100"]
    assert bench_eval.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in report["results"]] == ["new", "baseline"] * 2
    assert all(r["replan_every"] == 100 and r["torch_threads"] == 1 for r in report["results"])
    (vs,) = report["vs_baseline"]
    assert vs["new"]["policy_ms_per_env_step"] > 0 and vs["speedup_env_steps_per_s"] > 0


def test_bench_eval_times_lazy_against_full_rendering_on_the_same_episodes(capsys):
    from vla.bench import eval as bench_eval

    with pytest.raises(ValueError, match="lazy_images must be a list of true/false"):
        bench_eval.parse_args(["lazy_images=[maybe]"])
    argv = ["policies=[vla]", "n_envs=[1]", "episodes=1", "max_steps=10", "image_size=32", "rounds=2",
            "torch_threads=1", "replan_every=100", "lazy_images=[true,false]"]
    assert bench_eval.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["lazy_images"] for r in report["results"]] == [True, False] * 2
    assert len({r["env_steps"] for r in report["results"]}) == 1  # the same episode either way
    (vs,) = report["vs_full_render"]
    assert vs["lazy"]["env_ms_per_step"] > 0 and vs["full_render"]["env_ms_per_step"] > 0
    assert vs["speedup_env_steps_per_s"] > 0


def test_videos_without_ffmpeg_fail_before_any_episode(tmp_path, monkeypatch):
    """A missing video backend is reported up front (naming the pip command and videos=0), not after
    the rollouts, when it would lose the evaluation's results."""
    import sys

    from vla.evaluation.evaluate import VideoRecorder

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install imageio-ffmpeg.*videos=0"):
        VideoRecorder(policy=None, video_dir=tmp_path / "videos", first_seed=0, per_task=1)
    assert not (tmp_path / "videos").exists()
