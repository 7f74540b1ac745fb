"""Closed-loop evaluation of one training checkpoint, as the training loop runs it every
``eval.every`` steps (the ``eval`` section of ``configs/train.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def evaluate_checkpoint(step_dir: Path, cfg: DictConfig, tasks: list[str], out_dir: Path,
                        device: Any) -> dict[str, float]:
    """Roll out checkpoint ``step_dir`` per the ``eval`` section; write eval_info.json; return success rates."""
    from vla import evaluation  # through the package, so a test can stand in for run_evaluation
    from vla.policies import VLAPolicy

    e = OmegaConf.to_container(cfg.eval, resolve=True)
    policy = VLAPolicy.from_checkpoint(str(step_dir), device=str(device), num_flow_steps=int(e["num_flow_steps"]),
                                       n_action_steps=min(int(e["n_action_steps"]), int(cfg.model.horizon)))
    env_kwargs = dict(policy.env_kwargs())
    for k in ("cameras", "image_size"):
        if e.get(k) is not None:
            env_kwargs[k] = e[k]
    videos = int(e.get("videos") or 0)
    result = evaluation.run_evaluation(policy, e["env"], tasks, int(e["episodes"]), n_envs=int(e["n_envs"]),
                            instruction_split=str(e["instruction_split"]), seed_start=e.get("seed_start"),
                                       max_steps=e.get("max_episode_steps"), video_dir=out_dir if videos else None,
                            videos_per_task=videos, env_kwargs=env_kwargs, progress=False)
    evaluation.write_outputs(result, out_dir, chart_title=f"{step_dir.parent.parent.name} {step_dir.name}")
    out = {"success_rate": float(result["overall"]["success_rate"])}
    for task, st in result["per_task"].items():
        out[f"success_rate/{task}"] = float(st["success_rate"])
    return out


def eval_schedule(cfg: DictConfig, store: Any) -> tuple[int, list[str]]:
    """(every, tasks) of the periodic closed-loop evaluation, checked before training starts:
    ``eval.every`` steps (0 = never) over ``eval.tasks``, else the dataset's tasks, else the store's."""
    e = cfg.get("eval")
    every = int(e.get("every") or 0) if e is not None else 0
    if every <= 0:
        return 0, []
    if not e.get("env"):
        raise ValueError(f"eval.every={every} needs eval.env (the env family to roll out in, e.g. metaworld)")
    tasks = list(e.get("tasks") or cfg.dataset.get("tasks") or dict.fromkeys(store.episode_tasks))
    return every, tasks
