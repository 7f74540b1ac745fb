"""Metric logging for training: ``train.log`` lines, ``metrics.jsonl``, TensorBoard (always) and
wandb (optional), written by rank 0 only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


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
