"""`vla train [hydra overrides ...]`: train a policy from a Zarr episode store.

    vla train dataset.path=data/drawer.zarr                      # tiny preset, CPU or GPU
    vla train dataset.path=... model=small trainer.steps=20000 trainer.batch_size=64
    vla train dataset.path=... trainer=debug                     # 2 steps + checkpoint (smoke test)
    vla train resume=outputs/2026-01-01/12-00-00_train           # continue exactly, from the run's own config
    vla train resume=RUN_DIR trainer.ckpt_every=500             # bookkeeping keys may change; a changed
                                                                 # model, data or schedule key is refused
    torchrun --nproc_per_node=2 -m vla train dataset.path=...    # DDP (gloo on CPU, nccl on GPU)
    vla train -m planner=on,off seed=0,1 dataset.path=...        # Hydra multirun: one run per combination

``-m`` / ``--multirun`` expands sweeps with Hydra's own override grammar (``a=1,2``, ``seed=range(0,3)``,
``choice(...)``) into the cartesian product and trains each job in its own process, one after the
other, under ``outputs/multirun/<date>/<time>_<name>/<job>/``; a failed job is reported and the
sweep goes on. With ``eval.every`` set, each job evaluates itself and the sweep ends with
`vla report` over all jobs (``report.md``, ``report.png`` in the sweep folder).

The loop is ``vla.training.train``; the config is ``configs/train.yaml``.
"""

from __future__ import annotations

HELP = __doc__ + """
Config groups: model (tiny|small|base...), experts (mot|dense), action_head (flow|discrete),
planner (on|off), frame (off|aux|condition), knowledge_insulation (on|off), trainer (default|debug).
Key options: dataset.path, dataset.tasks, dataset.normalization, trainer.steps, trainer.batch_size,
trainer.lr, trainer.strategy, seed, device, resume, init_from, run_dir, eval.every, eval.env, wandb.enabled.
Print the composed config with `vla train --cfg [overrides]`.
"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    from omegaconf import OmegaConf

    from vla.config import compose

    if any(a in ("-m", "--multirun") for a in argv):
        return multirun([a for a in argv if a not in ("-m", "--multirun")])
    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    resume = [o.partition("=")[2] for o in overrides if o.startswith("resume=") and o != "resume=null"]
    if resume:
        from vla.training.resume import resume_config

        cfg = resume_config(resume[-1], overrides)
    else:
        cfg = compose("train", overrides)
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from vla.training import train

    run_dir = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run dir: {run_dir}")
    return 0


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Hydra's expansion of sweep overrides into one override list per job (cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ValueError(f"vla train -m: cannot parse overrides {overrides}: {e}") from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def job_names(overrides: list[str], jobs: list[list[str]]) -> list[str]:
    """Folder names of a sweep's jobs: index + the swept keys' values ('00_seed-0_d_model-16').

    Only keys with more than one value name a job: a fixed override that Hydra re-spells while expanding
    (``true`` -> ``True``) would otherwise look swept."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}
    return [f"{i:02d}_" + "_".join(_short(o) for o in job if o.partition("=")[0] in swept)
            for i, job in enumerate(jobs)]


def multirun(overrides: list[str]) -> int:
    """Train every job of the sweep in its own process; write multirun.yaml and the report."""
    import datetime as dt
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from vla.config import compose

    if any(o.startswith(("run_dir=", "resume=")) for o in overrides):
        raise ValueError("vla train -m: run_dir and resume cannot be given to a sweep (each job gets its own folder)")
    jobs = sweep_jobs(overrides)
    for job in jobs:  # every job's config must compose before any training starts
        compose("train", job)
    base = compose("train", jobs[0])
    now = dt.datetime.now()
    sweep_dir = Path(base.get("output_root") or "outputs") / "multirun" / now.strftime("%Y-%m-%d") / (
        now.strftime("%H-%M-%S") + f"_{base.get('name') or 'train'}")
    sweep_dir.mkdir(parents=True, exist_ok=False)
    names = job_names(overrides, jobs)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"overrides": overrides, "jobs": [{"dir": n, "overrides": j} for n, j in zip(names, jobs)]}, sort_keys=False))
    print(f"vla train -m: {len(jobs)} jobs under {sweep_dir}", flush=True)
    failed = []
    for i, (name, job) in enumerate(zip(names, jobs)):
        print(f"[{i + 1}/{len(jobs)}] {' '.join(job)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "vla", "train", *job, f"run_dir={sweep_dir / name}"])
        if rc != 0:
            failed.append((name, rc))
            print(f"[{i + 1}/{len(jobs)}] failed with exit code {rc}", file=sys.stderr, flush=True)
    done = [sweep_dir / n for n in names if (sweep_dir / n / "eval").is_dir()]
    if done and base.eval.get("every"):
        from vla.commands.report import main as report

        report([*map(str, done), "--out", str(sweep_dir)])
    print(f"vla train -m: {len(jobs) - len(failed)}/{len(jobs)} jobs finished; sweep folder {sweep_dir}")
    for name, rc in failed:
        print(f"  failed: {name} (exit {rc})", file=sys.stderr)
    return 1 if failed else 0


def _short(override: str) -> str:
    """A folder-safe piece of a job name: 'model.d_model=64' -> 'd_model-64' (Hydra reads '=' in a value)."""
    key, _, value = override.partition("=")
    return (key.rsplit(".", 1)[-1] + "-" + value).replace("/", "-").replace(",", "-").replace("=", "-")[:40]
