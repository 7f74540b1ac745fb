"""Metric logging for training: ``train.log`` lines, ``metrics.jsonl``, TensorBoard (always) and
wandb (optional), written by rank 0 only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def fmt_losses(losses: dict[str, Any]) -> str:
    """"loss=0.5, action_loss=0.4": the scalar losses of a batch, for error messages."""
    import torch

    return ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items() if torch.is_tensor(v) and v.ndim == 0)


def jsonable(d: Any) -> Any:
    """Tuples to lists, recursively (checkpoint config.json)."""
    if isinstance(d, dict):
        return {k: jsonable(v) for k, v in d.items()}
    if isinstance(d, tuple | list):
        return [jsonable(v) for v in d]
    return d


def write_run_info(run_dir: Path, **facts) -> None:
    """``run_info.json``: what `vla report` needs of a finished run (params, steps, flops_per_chunk,
    wall_s: training time without the closed-loop evaluations run inside it, eval_s: those)."""
    path = Path(run_dir) / "run_info.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(facts, indent=1))
    tmp.replace(path)


class MeanAccumulator:
    """Running means between two log lines; each key counts only the steps that reported it
    (a per-task loss is missing from steps whose batch held no sample of that task)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}


def per_task_means(tasks: list[str], values, prefix: str = "action_loss/") -> dict[str, float]:
    """{prefix + task: mean of values over the batch's samples of that task} (values: one per sample)."""
    out: dict[str, list[float]] = {}
    for t, v in zip(tasks, values.tolist()):
        out.setdefault(t, []).append(v)
    return {f"{prefix}{t}": sum(v) / len(v) for t, v in out.items()}


class MetricLog:
    """train.log lines, metrics.jsonl, TensorBoard (always) and wandb (optional), rank 0 only."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.echo: Callable[[str], None] | None = None  # also show lines on the console (set by the loop)
        if not enabled:
            return
        self.text = open(run_dir / "train.log", "a")
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        w = cfg.get("wandb") or {}
        if w.get("enabled"):
            try:
                import wandb
            except ImportError:
                raise ValueError("wandb.enabled=true but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=w.get("project", "vla"), entity=w.get("entity"), mode=w.get("mode"),
                                    dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                                    name=run_dir.name)

    def line(self, msg: str) -> None:
        if self.enabled:
            self.text.write(msg + "\n")
            self.text.flush()
            if self.echo is not None:
                self.echo(msg)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        body = " ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        self.line(f"{prefix} step={step} {body}")
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.text.close()
        self.jsonl.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
