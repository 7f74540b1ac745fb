"""bf16 autocast on the CPU: when ``trainer.bf16=auto`` turns it on, and that it stays close to fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import model_batch, tiny_config

from vla.model import VLA
from vla.training.distributed import cpu_has_native_bf16, use_bf16


def test_auto_follows_the_cpu_and_explicit_values_win():
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) == cpu_has_native_bf16()
    assert use_bf16(True, cpu) is True and use_bf16(False, cpu) is False
    with pytest.raises(ValueError, match="trainer.bf16: expected auto|true|false, got 'yes'"):
        use_bf16("yes", cpu)


def test_cpu_attention_in_bf16_matches_fp32_for_every_mask_kind_and_returns_bf16():
    """The CPU's bf16 path (two bf16 matmuls around an fp32 softmax) against fp32 SDPA: bool, additive and
    no mask, values and input gradients; a masked key gets no weight."""
    torch.manual_seed(0)
    model = VLA(tiny_config())
    q, k, v = (torch.randn(2, 4, 10, 32) * 2 for _ in range(3))
    allowed = torch.rand(2, 1, 10, 10) > 0.3
    allowed |= torch.eye(10, dtype=torch.bool)  # every query sees itself, as make_attn_mask builds it
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~allowed, float("-inf"))
    is_vlm = torch.ones(10, dtype=torch.bool)
    for mask in (allowed, additive, None):
        qs, ks, vs = (x.bfloat16().float().requires_grad_() for x in (q, k, v))  # the same rounded inputs
        ref = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        ref.square().sum().backward()
        qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
        out = model._attend(qb, kb, vb, mask, is_vlm, is_vlm)
        out.float().square().sum().backward()
        assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 10, 32)
        assert (out.float() - ref).norm() / ref.norm() < 0.02  # measured ~0.01: bf16 scores and probabilities
        for g, g_ref in ((qb.grad, qs.grad), (kb.grad, ks.grad), (vb.grad, vs.grad)):
            assert F.cosine_similarity(g.float().flatten(), g_ref.flatten(), dim=0) > 0.999
    v2 = v.clone()
    v2[0, :, 3] = 1e4  # key 3 of sample 0 is hidden from query 0: its value must not leak in
    allowed[0, 0, 0, 3] = False
    out = model._attend(q.bfloat16(), k.bfloat16(), v2.bfloat16(), allowed, is_vlm, is_vlm)
    assert out[0, :, 0].float().abs().max() < 100


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
