"""Tiny model configs and synthetic batches shared by the model tests (fast on a 2-core CPU)."""

from __future__ import annotations

import numpy as np
import torch

from vla.model import VLAConfig
from vla.normalize import Normalizer
from vla.tokenizer import ByteTokenizer

B, H, A, S = 3, 6, 3, 5
INSTRUCTIONS = ["open the drawer", "push", "pick up the red cube"]
PLANS = ["reach; pull", "push", "grasp; lift; place"]


def tiny_config(**kw) -> VLAConfig:
    base = dict(cameras=["front"], image_size=16, patch_size=4, state_dim=S, action_dim=A, horizon=H, d_model=32,
                n_layers=2, n_heads=2, head_dim=16, action_width=16, frame_width=24, frame_size=8,
                max_plan_tokens=16, max_instruction_tokens=16)
    base.update(kw)
    return VLAConfig(**base)


def model_batch(cfg: VLAConfig, seed: int = 0, fixed_noise: bool = True) -> dict[str, torch.Tensor]:
    """A normalized model batch (what `Processor.training_batch` returns), plus fixed flow noise/time."""
    g = torch.Generator().manual_seed(seed)
    tok = ByteTokenizer(cfg.action_bins)
    it, im = tok.batch_encode(INSTRUCTIONS[:B], cfg.max_instruction_tokens)
    pt, pm = tok.batch_encode(PLANS[:B], cfg.max_plan_tokens, eos=True, first=tok.plan_id)
    h, w = cfg.image_hw
    s, hz, a = cfg.frame_size, cfg.horizon, cfg.action_dim
    batch = {
        "images": torch.rand(B, cfg.num_views, 3, h, w, generator=g) * 2 - 1,
        "state": torch.randn(B, cfg.state_dim * cfg.n_obs_steps, generator=g),
        "instruction_tokens": it, "instruction_mask": im, "plan_tokens": pt, "plan_mask": pm,
        "actions": torch.rand(B, hz, a, generator=g) * 2 - 1,
        "action_is_pad": torch.zeros(B, hz, dtype=torch.bool),
        "future_frame": torch.rand(B, 3, s, s, generator=g) * 2 - 1,
        "future_is_pad": torch.zeros(B, dtype=torch.bool),
    }
    batch["action_is_pad"][1, -2:] = True
    if fixed_noise:
        batch.update(noise=torch.randn(B, hz, a, generator=g), time=torch.rand(B, generator=g) * 0.9 + 0.05,
                     frame_noise=torch.randn(B, 3, s, s, generator=g),
                     frame_time=torch.rand(B, generator=g) * 0.9 + 0.05)
    return batch


def store_stats(state_dim: int = S, action_dim: int = A) -> dict[str, dict[str, np.ndarray]]:
    def one(d: int, lo: float, hi: float) -> dict[str, np.ndarray]:
        q01, q99 = np.full(d, lo, np.float32), np.full(d, hi, np.float32)
        return {"q01": q01, "q99": q99, "min": q01 - 0.1, "max": q99 + 0.1, "mean": (q01 + q99) / 2,
                "std": np.full(d, (hi - lo) / 4, np.float32)}

    return {"state": one(state_dim, -2.0, 2.0), "action": one(action_dim, -1.0, 1.0)}


def normalizer() -> Normalizer:
    return Normalizer(store_stats(), mode="quantile")


def window_batch(cfg: VLAConfig, seed: int = 0) -> dict:
    """A collated `WindowDataset` batch (raw values, numpy, as the default collate would give after .numpy())."""
    r = np.random.default_rng(seed)
    h, w = cfg.image_hw
    return {
        "images": {c: r.integers(0, 256, (B, cfg.n_obs_steps, h, w, 3), dtype=np.uint8) for c in cfg.cameras},
        "state": r.standard_normal((B, cfg.n_obs_steps, cfg.state_dim)).astype(np.float32),
        "action": r.uniform(-1, 1, (B, cfg.horizon, cfg.action_dim)).astype(np.float32),
        "action_is_pad": np.zeros((B, cfg.horizon), dtype=bool),
        "instruction": list(INSTRUCTIONS[:B]),
        "plan": list(PLANS[:B]),
        "future_image": r.integers(0, 256, (B, h, w, 3), dtype=np.uint8),
        "future_is_pad": np.array([False, True, False][:B]),
    }
