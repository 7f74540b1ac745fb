"""CUDA graphs of the Euler loop (`VLA.use_cuda_graphs`, `vla.model.FlowGraphs`; issue 19).

On the CPU the graphs' static-buffer path runs without capture (``capture=False``): the same copies
in and out of the per-signature static tensors that a graph replays. It must give exactly the plain
loop's actions, reuse one static set per signature, make a new one for a new signature, and never
let one call's context leak into the next. On a CUDA machine the captured graph is checked against
the plain path too.
"""

import pytest
import torch
from model_helpers import model_batch, tiny_config

from vla.model import VLA


def _sample(model: VLA, batch: dict, noise: torch.Tensor, **kw) -> torch.Tensor:
    s = model.cfg.frame_size
    frame_noise = torch.randn(noise.shape[0], 3, s, s, generator=torch.Generator().manual_seed(1)).to(noise.device)
    return model.sample(batch, noise=noise, decode_plan=False, frame_noise=frame_noise, **kw)["actions"].clone()


@pytest.mark.parametrize("frame", ["off", "condition", "aux"])
def test_static_buffer_path_equals_the_plain_loop(frame):
    torch.manual_seed(0)
    model = VLA(tiny_config(frame=frame)).eval()
    batch = model_batch(model.cfg)
    noise = torch.randn(batch["state"].shape[0], model.cfg.horizon, model.cfg.action_dim)
    plain = _sample(model, batch, noise)
    model.use_cuda_graphs(capture=False)
    assert torch.equal(_sample(model, batch, noise), plain)
    assert torch.equal(_sample(model, batch, noise), plain)  # the second call reuses the static buffers
    assert len(model.flow_graphs.graphs) == (2 if frame == "aux" else 1)  # aux: its own frame integration


def test_a_new_context_is_copied_in_and_a_new_signature_gets_its_own_buffers():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval()
    batch = model_batch(model.cfg)
    other = dict(batch, images=torch.rand_like(batch["images"]) * 2 - 1, state=torch.randn_like(batch["state"]))
    noise = torch.randn(batch["state"].shape[0], model.cfg.horizon, model.cfg.action_dim)
    want_a, want_b = _sample(model, batch, noise), _sample(model, other, noise)
    assert not torch.equal(want_a, want_b)
    model.use_cuda_graphs(capture=False)
    for _ in range(2):  # alternate: stale keys/values from the previous context would show here
        assert torch.equal(_sample(model, batch, noise), want_a)
        assert torch.equal(_sample(model, other, noise), want_b)
    assert len(model.flow_graphs.graphs) == 1
    one = {k: v[:1] for k, v in batch.items()}  # batch 1: another signature
    assert torch.equal(_sample(model, one, noise[:1]), _sample(model.use_cuda_graphs(False), one, noise[:1]))


def test_graphs_are_dropped_when_weights_are_loaded_and_capped_in_number():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval().use_cuda_graphs(capture=False)
    batch = model_batch(model.cfg)
    noise = torch.randn(batch["state"].shape[0], model.cfg.horizon, model.cfg.action_dim)
    _sample(model, batch, noise)
    assert model.flow_graphs.graphs
    model.load_state_dict(VLA(tiny_config()).state_dict())
    assert not model.flow_graphs.graphs
    model.flow_graphs.max_graphs = 2
    for steps in (2, 3, 4):  # flow-step count is part of the signature
        _sample(model, batch, noise, num_steps=steps)
    assert len(model.flow_graphs.graphs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_captured_graph_matches_the_plain_loop_on_cuda(bf16):
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval().cuda()
    batch = {k: v.cuda() for k, v in model_batch(model.cfg).items()}
    noise = torch.randn(batch["state"].shape[0], model.cfg.horizon, model.cfg.action_dim, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        plain = _sample(model, batch, noise)
        model.use_cuda_graphs()
        first, again = _sample(model, batch, noise), _sample(model, batch, noise)
    assert model.flow_graphs.captures == 1
    tol = 2e-2 if bf16 else 1e-4
    assert (first - plain).norm() / plain.norm() < tol
    assert torch.equal(first, again)
