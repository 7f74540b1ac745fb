"""Tiny VLA models for the policy / plan / serve tests: built, overfit and checkpointed in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

PLAN = "reach the drawer handle; pull the drawer open"
INSTRUCTION = "open the drawer"


def make_tiny(frame: str = "off", n_obs_steps: int = 1, image_size: int = 32, horizon: int = 8, seed: int = 0,
              **cfg_kw):
    """(model, processor): one 'corner' camera, state 4, action 4, ~70k parameters; ``cfg_kw`` overrides VLAConfig."""
    from vla.model import VLA, VLAConfig
    from vla.normalize import Normalizer
    from vla.processor import Processor

    cfg = VLAConfig(**{**dict(cameras=["corner"], image_size=image_size, state_dim=4, action_dim=4, patch_size=8,
                              n_obs_steps=n_obs_steps, horizon=horizon, d_model=32, n_layers=2, n_heads=2,
                              head_dim=16, action_width=32, frame_width=32, max_instruction_tokens=32,
                              max_plan_tokens=56, frame=frame, frame_size=16), **cfg_kw})

    def stats(d: int, lo: float, hi: float) -> dict:
        return {"mean": np.zeros(d), "std": np.ones(d), "min": np.full(d, lo), "max": np.full(d, hi),
                "q01": np.full(d, lo), "q99": np.full(d, hi)}

    proc = Processor(cfg, Normalizer({"action": stats(4, -1.0, 1.0), "state": stats(4, -0.5, 0.5)}))
    torch.manual_seed(seed)
    return VLA(cfg), proc


def overfit_plan(model, proc, steps: int = 150, batch: int = 4, extra_images: list[np.ndarray] | None = None) -> list:
    """Train on random scenes that all carry PLAN for INSTRUCTION; returns the plan losses."""
    cfg = model.cfg
    rng = np.random.default_rng(0)
    h, w = cfg.image_hw
    imgs = rng.integers(0, 255, (batch, cfg.n_obs_steps, h, w, 3), dtype=np.uint8)
    for k, img in enumerate(extra_images or []):
        imgs[k, :] = img
    raw = {"images": {"corner": imgs}, "state": rng.uniform(-0.5, 0.5, (batch, cfg.n_obs_steps, 4)).astype(np.float32),
           "action": rng.uniform(-1, 1, (batch, cfg.horizon, 4)).astype(np.float32),
           "action_is_pad": np.zeros((batch, cfg.horizon), bool), "instruction": [INSTRUCTION] * batch,
           "plan": [PLAN] * batch, "future_image": imgs[:, -1], "future_is_pad": np.zeros(batch, bool)}
    data = proc.training_batch(raw)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        out = model.compute_loss(data)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["plan_loss"].detach()))
    model.eval()
    return losses


def save_tiny(root: Path, model, proc, train: dict | None = None, step: int = 1) -> Path:
    """Write a real checkpoint with ``vla.checkpoint.save_checkpoint``; returns the run dir."""
    from vla.checkpoint import save_checkpoint

    state = model.state_dict()
    save_checkpoint(Path(root) / "checkpoints", step, model_state=state, ema_state=state,
                    config={"model": model.cfg.to_dict(), "train": train or {}},
                    normalizer=proc.normalizer.to_dict(), tokenizer=proc.tokenizer.to_dict(), trainer_state={})
    return Path(root)


def obs(rng: np.random.Generator | None = None, size: int = 32, state_dim: int = 4) -> dict:
    rng = rng or np.random.default_rng(1)
    return {"images": {"corner": rng.integers(0, 255, (size, size, 3), dtype=np.uint8)},
            "state": rng.uniform(-0.5, 0.5, state_dim).astype(np.float32)}
