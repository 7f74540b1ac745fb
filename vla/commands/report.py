"""`vla report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT]`: one table from many runs.

Gathers the closed-loop evaluations of training runs (a Hydra multirun sweep, or any run folders)
into a Markdown table and a PNG chart: one row per variant (runs whose configs differ only by
``seed`` are one variant), success per task family pooled over the variant's seeds with a Wilson
95% interval, the per-seed rates, steps, training wall time (without the evaluations a sweep runs inside
training), parameters and FLOPs per action chunk.

    vla train -m planner=on,off seed=0,1 dataset.path=data/tt.zarr eval.every=3000 eval.env=tabletop ...
    vla report outputs/multirun/2026-11-23/12-00-00_train/*  --out docs/ablations/planner

A RUN_DIR is a training run folder (``config.yaml`` + ``eval/step_*/eval_info.json``; the evaluation
of the last step is used) or an evaluation folder (``eval_info.json`` whose ``checkpoint`` points at
its training run). A variant's label is made of the config keys whose values differ between the
runs given (seed, paths and names left out) and of the conditions their evaluations ran under
(``eval.instruction_split``, ``eval.seed_start``, ...: from eval_info.json, not from the training
config), so the table says what was varied and nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HELP = __doc__

# Keys that never define a variant: where things are written, which seed, how often to log.
IGNORED_PREFIXES = ("seed", "run_dir", "name", "output_root", "resume", "init_from", "wandb.", "trainer.progress",
                    "trainer.log_every", "trainer.ckpt_every", "trainer.keep_last", "trainer.num_workers",
                    "trainer.num_threads", "dataset.path", "hydra.")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so they can be compared and hashed."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(d) if isinstance(d, list) else d}


def load_run(path: str | Path) -> dict[str, Any]:
    """One run's config, training facts and latest evaluation. Raises ValueError naming what is missing."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"vla report: {path} is not a folder (expected a training run or an evaluation folder)")
    eval_info_path: Path | None = None
    if (path / "eval_info.json").is_file():  # an evaluation folder: find its training run
        eval_info_path = path / "eval_info.json"
        info = json.loads(eval_info_path.read_text())
        ckpt = info.get("checkpoint")
        run = _run_dir_of(Path(ckpt)) if ckpt else None
        if run is None:
            raise ValueError(f"vla report: {eval_info_path} does not name the checkpoint it evaluated")
    else:
        run = path
        evals = sorted(run.glob("eval/*/eval_info.json"))
        if not evals:
            raise ValueError(f"vla report: {run} has no evaluation (expected eval/step_*/eval_info.json; train with "
                             f"eval.every=STEPS eval.env=FAMILY, or pass the folder `vla eval` wrote)")
        eval_info_path = evals[-1]
        info = json.loads(eval_info_path.read_text())
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"vla report: {run} has no config.yaml (is it a `vla train` run folder?)")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    facts = _train_facts(run)
    return {"path": str(path), "run": str(run), "config": cfg, "eval": info, "eval_path": str(eval_info_path),
            **facts}


def _run_dir_of(ckpt: Path) -> Path | None:
    for p in (ckpt, *ckpt.parents):
        if (p / "config.yaml").is_file():
            return p
    return None


def _train_facts(run: Path) -> dict[str, Any]:
    """Steps, wall time, parameters and FLOPs per chunk from the run's own records (None when absent)."""
    facts: dict[str, Any] = {"steps": None, "wall_s": None, "params": None, "flops_per_chunk": None}
    info = run / "run_info.json"
    eval_excluded = False  # runs since 2026-12-04 record wall_s without their in-run evaluations (and eval_s)
    if info.is_file():
        recorded = json.loads(info.read_text())
        facts.update({k: v for k, v in recorded.items() if k in facts})
        eval_excluded = "eval_s" in recorded
    log = run / "train.log"
    if log.is_file():
        for line in log.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if line.startswith("start ") and facts["params"] is None and "params" in fields:
                facts["params"] = int(fields["params"])
            if line.startswith("end ") and "step" in fields:
                facts["steps"] = int(fields["step"])
                if "wall_s" in fields and facts["wall_s"] is None:
                    facts["wall_s"] = float(fields["wall_s"])
                    eval_excluded = "eval_s" in fields
    if facts["wall_s"] is not None and not eval_excluded:  # older runs: take the rollouts' own time out
        facts["wall_s"] -= sum(float((json.loads(p.read_text()).get("aggregated") or {}).get("eval_s") or 0.0)
                               for p in run.glob("eval/*/eval_info.json"))
    return facts


# What an evaluation was run on (from its eval_info.json): runs evaluated differently are different rows.
EVAL_CONDITIONS = ("instruction_split", "instruction", "seed_start", "episodes_per_task", "max_steps")


def variant_keys(run: dict[str, Any]) -> dict[str, Any]:
    """The flat keys that define a run's variant: its training config, except the ``eval.*`` section
    (which only schedules evaluations inside training), plus the conditions its evaluation actually ran
    under as ``eval.<key>``. So a sweep's in-run evaluation and a separate `vla eval` of the same
    checkpoint on the same split and seeds land in one row."""
    flat = {k: v for k, v in flatten(run["config"]).items() if not k.startswith("eval.")}
    flat.update({f"eval.{k}": run["eval"].get(k) for k in EVAL_CONDITIONS})
    return flat


def group_variants(runs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Runs grouped by the config values that differ between them (seed and bookkeeping keys ignored)."""
    flat = [variant_keys(r) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varied = [k for k in keys if not k.startswith(IGNORED_PREFIXES)
              and len({repr(f.get(k)) for f in flat}) > 1]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run, f in zip(runs, flat):
        label = ", ".join(f"{k}={_fmt_value(f.get(k))}" for k in varied) or "all runs"
        groups.setdefault(label, []).append(run)
    return list(groups.items())


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _episodes_by_task(info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    per_task = info.get("per_task") or {}
    return {t: (int(s["successes"]), int(s["episodes"])) for t, s in per_task.items()}


def build_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and task: pooled successes/episodes, Wilson interval, per-seed rates; plus run facts."""
    from vla.evaluation import wilson_interval as wilson

    variants = []
    tasks: list[str] = []
    for label, group in group_variants(runs):
        per_task: dict[str, dict[str, Any]] = {}
        for run in group:
            for task, (k, n) in _episodes_by_task(run["eval"]).items():
                if task not in tasks:
                    tasks.append(task)
                row = per_task.setdefault(task, {"successes": 0, "episodes": 0, "per_seed": []})
                row["successes"] += k
                row["episodes"] += n
                row["per_seed"].append(k / n if n else 0.0)
        for row in per_task.values():
            row["rate"] = row["successes"] / row["episodes"] if row["episodes"] else 0.0
            row["ci95"] = list(wilson(row["successes"], row["episodes"]))
        k = sum(r["successes"] for r in per_task.values())
        n = sum(r["episodes"] for r in per_task.values())
        rates = [r["rate"] for r in per_task.values()]
        variants.append({
            "variant": label,
            "seeds": sorted({_seed(r) for r in group}, key=str),
            "runs": [r["path"] for r in group],
            "per_task": per_task,
            "pooled": {"successes": k, "episodes": n, "rate": k / n if n else 0.0, "ci95": list(wilson(k, n))},
            "mean_over_tasks": sum(rates) / len(rates) if rates else 0.0,
            "steps": _same_or_list([r["steps"] for r in group]),
            "wall_s_mean": _mean([r["wall_s"] for r in group]),
            "params": _same_or_list([r["params"] for r in group]),
            # Counted on each run's first training sample, whose decoded plan length varies: the seeds' mean.
            "flops_per_chunk": _mean([r["flops_per_chunk"] for r in group]),
        })
    return {"tasks": tasks, "variants": variants}


def _seed(run: dict[str, Any]) -> Any:
    return run["config"].get("seed")


def _same_or_list(values: list[Any]) -> Any:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return vals[0] if len(set(vals)) == 1 else vals


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def format_markdown(table: dict[str, Any], title: str | None = None) -> str:
    """The Markdown table: one row per variant; a cell is ``rate [lo, hi] (k/n)`` pooled over seeds."""
    tasks = table["tasks"]
    head = ["variant", "seeds", *tasks, "pooled", "mean over tasks", "steps", "wall (min)", "params", "GFLOP/chunk"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in table["variants"]:
        cells = [v["variant"], ",".join(map(str, v["seeds"]))]
        for t in tasks:
            r = v["per_task"].get(t)
            cells.append(_cell(r["successes"], r["episodes"], r["ci95"]) if r else "—")
        p = v["pooled"]
        cells.append(_cell(p["successes"], p["episodes"], p["ci95"]))
        cells.append(f"{v['mean_over_tasks']:.0%}")
        cells.append(str(v["steps"]) if v["steps"] is not None else "—")
        cells.append(f"{v['wall_s_mean'] / 60:.1f}" if v["wall_s_mean"] is not None else "—")
        cells.append(f"{v['params'] / 1e6:.2f}M" if isinstance(v["params"], int) else "—")
        f = v["flops_per_chunk"]
        cells.append(f"{f / 1e9:.2f}" if f is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Cells: success rate [Wilson 95% interval] (successes/episodes), pooled over the variant's "
              "training seeds; `mean over tasks` averages the per-task rates."]
    return "\n".join(lines) + "\n"


def _cell(k: int, n: int, ci: list[float]) -> str:
    return f"{k / n:.0%} [{ci[0]:.2f}, {ci[1]:.2f}] ({k}/{n})" if n else "—"


def plot_chart(table: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Grouped bars: success per task for each variant, with the Wilson intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, variants = table["tasks"], table["variants"]
    x = np.arange(len(tasks))
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(tasks) * max(1, len(variants)) ** 0.5), 4))
    for i, v in enumerate(variants):
        rates = [v["per_task"].get(t, {}).get("rate", 0.0) for t in tasks]
        # clipped: at 0/N (or N/N) the interval's edge equals the rate up to rounding, a tiny negative error bar
        lo = [max(0.0, r - v["per_task"].get(t, {}).get("ci95", [r, r])[0]) for t, r in zip(tasks, rates)]
        hi = [max(0.0, v["per_task"].get(t, {}).get("ci95", [r, r])[1] - r) for t, r in zip(tasks, rates)]
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, rates, width, yerr=[lo, hi], capsize=2, label=v["variant"])
    ax.set_xticks(x, tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    out: Path | None = None
    title: str | None = None
    paths: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--out":
            out = Path(next(it, ""))
        elif a == "--title":
            title = next(it, None)
        elif a.startswith("--"):
            raise ValueError(f"unknown option {a!r}; expected RUN_DIR ... [--out DIR] [--title TEXT]")
        else:
            paths.append(a)
    if not paths:
        raise ValueError("no RUN_DIR given; expected one or more training run or evaluation folders")
    runs = [load_run(p) for p in paths]
    table = build_table(runs)
    md = format_markdown(table, title)
    sys.stdout.write(md)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md)
        (out / "report.json").write_text(json.dumps(table, indent=1))
        chart = plot_chart(table, out / "report.png", title)
        print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {chart}")
    return 0
