"""FLOP counting for the model (benchmarks, `vla report`): matmuls and attention, via torch's counter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of running ``fn()`` (matmuls and attention), counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:  # the CPU attention kernel has no formula of its own (torch 2.13)
        try:
            @register_flop_formula(op)
            def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
                return sdpa_flop_count(query_shape, key_shape, value_shape)
        except (RuntimeError, ValueError):
            pass  # already registered
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def chunk_flops(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                instructions: list[str] | None = None) -> int:
    """FLOPs of one action chunk at batch 1 (KV-cached prefix; plan decoded when the model plans),
    from the first sample of a training batch (`Processor.training_batch`)."""
    training_only = ("actions", "action_is_pad", "plan_tokens", "plan_mask", "future_frame", "future_is_pad",
                     "noise", "time", "frame_noise")
    one = {k: v[:1] for k, v in batch.items()
           if k not in training_only and (torch.is_tensor(v) or isinstance(v, list))}
    if instructions is not None:  # word plans spell copied words from the instruction text
        one["instruction_text"] = list(instructions[:1])
    was_training = model.training
    model.eval()
    try:
        return count_flops(lambda: model.sample(one))
    finally:
        model.train(was_training)
