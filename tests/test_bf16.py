"""bf16 autocast on the CPU: when ``trainer.bf16=auto`` turns it on, and that it stays close to fp32."""

from __future__ import annotations

import pytest
import torch
from model_helpers import model_batch, tiny_config

from vla.model import VLA
from vla.training.distributed import cpu_has_native_bf16, use_bf16


def test_auto_follows_the_cpu_and_explicit_values_win():
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) == cpu_has_native_bf16()
    assert use_bf16(True, cpu) is True and use_bf16(False, cpu) is False
    with pytest.raises(ValueError, match="trainer.bf16: expected auto|true|false, got 'yes'"):
        use_bf16("yes", cpu)


def test_cpu_attention_under_autocast_runs_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    model = VLA(tiny_config())
    q, k, v = (torch.randn(2, 4, 10, 32) for _ in range(3))
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    is_vlm = torch.ones(10, dtype=torch.bool)
    ref = model._attend(q, k, v, mask, is_vlm, is_vlm)
    out = model._attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, is_vlm, is_vlm)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=3e-2)  # only the inputs' bf16 rounding differs


def test_bf16_autocast_loss_and_gradients_stay_close_to_fp32():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = VLA(cfg)
    batch = model_batch(cfg)
    fixed = {"noise": torch.randn(3, cfg.horizon, cfg.action_dim), "time": torch.full((3,), 0.5)}
    ref = model.compute_loss({**batch, **fixed})["loss"]
    ref.backward()
    g_ref = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.compute_loss({**batch, **fixed})["loss"]
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.02 * ref.item()
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) > 0.99
