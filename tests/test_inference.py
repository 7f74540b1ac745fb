"""The fast inference path of `VLA.sample` against reference computations (issue 16, item 1).

`sample` with the KV cache builds the mask, rotary tables and flow-time modulations once per call
(`_layout`, `_step_mods`), runs the Euler steps through `_integrate`, and decodes plans with
`_TokenStepper`; each is checked here against the generic per-call computation it replaces.
"""

import pytest
import torch
from model_helpers import B, model_batch, tiny_config

from vla.attention import make_attn_mask
from vla.flow import euler_integrate
from vla.model import PLAN, VLA, rope, rope_angles, rope_fast, rope_tables


def test_rope_fast_is_bit_identical_to_rope():
    torch.manual_seed(0)
    pos = torch.randint(0, 200, (3, 7))
    x = torch.randn(3, 2, 7, 16)
    cos, sin = rope_angles(pos, 16, 10_000.0)
    cos2, sin2 = rope_tables(pos, 16, 10_000.0)
    assert torch.equal(rope_fast(x, cos2, sin2), rope(x, cos, sin))
    qk = torch.randn(2, 3, 2, 7, 16)  # q and k rotated in one call
    assert torch.equal(rope_fast(qk, cos2, sin2)[1], rope(qk[1], cos, sin))


def test_layout_mask_is_the_bool_mask_made_additive_and_dropped_only_when_full():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval()
    batch = model_batch(model.cfg)  # 3 samples with padded instructions and plans
    segs = [model.embed_prefix(batch), model.embed_plan(batch["plan_tokens"], batch["plan_mask"])]
    lay = model._layout(segs, drop_full_mask=True)
    allowed = make_attn_mask(lay.block, lay.causal, lay.valid, model.sees)[:, None]
    assert lay.mask is not None and torch.equal(lay.mask == 0, allowed)
    assert torch.equal(lay.mask, torch.where(allowed, 0.0, float("-inf")))
    one = _first_sample(batch)
    assert model._layout([model.embed_prefix(one)], drop_full_mask=True).mask is None  # unpadded, bidirectional


def _first_sample(batch: dict) -> dict:
    """Sample 0 alone, without the padding the other samples forced on it."""
    one = {k: v[:1] for k, v in batch.items()}
    for key in ("instruction", "plan"):
        n = int(one[f"{key}_mask"].sum())
        one[f"{key}_tokens"], one[f"{key}_mask"] = one[f"{key}_tokens"][:, :n], one[f"{key}_mask"][:, :n]
    return one


def _reference_cached(model: VLA, batch: dict, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The cached sampling before the fast path: prefix, plan and state each through `_run`, and every
    Euler step through `_run` against the cache (its own mask, rotary tables and time MLP per step)."""
    cache = model._run([model.embed_prefix(batch)], keep_kv=True)[1]
    cache = model._run([model.embed_plan(batch["plan_tokens"], batch["plan_mask"])], cache, keep_kv=True)[1]
    cache = model._run([model.embed_state(batch["state"])], cache, keep_kv=True)[1]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.action["out"](model._run([model.embed_actions(x, t)], cache)[0][0])

    return euler_integrate(velocity, noise, steps)


@pytest.mark.parametrize("kw", [{}, dict(experts="dense"), dict(knowledge_insulation=True),
                                dict(vision="conv", vision_keypoints=4, image_size=16, patch_size=4)])
@pytest.mark.parametrize("n", [1, B])
def test_fast_cached_actions_equal_the_per_step_reference(kw, n):
    torch.manual_seed(0)
    model = VLA(tiny_config(**kw)).eval()
    batch = model_batch(model.cfg)
    batch = _first_sample(batch) if n == 1 else batch  # n=1: no padding, so the steps attend unmasked
    noise = torch.randn(n, model.cfg.horizon, model.cfg.action_dim)
    fast = model.sample(batch, noise=noise)["actions"]
    with torch.no_grad():
        ref = _reference_cached(model, batch, noise, model.cfg.flow_steps)
    assert (fast - ref).abs().max() < 1e-5


@pytest.mark.parametrize("early_eos", [False, True])
def test_token_stepper_decodes_what_run_per_token_decodes(early_eos):
    torch.manual_seed(0)
    model = VLA(tiny_config(max_plan_tokens=12)).eval()
    batch = {k: v for k, v in model_batch(model.cfg).items() if not k.startswith("plan")}
    with torch.no_grad():
        calls = [0]
        if early_eos:  # sample r emits <eos> at step 2r + 2: samples finish apart, later tokens are padding
            lm_logits = model.lm_logits

            def forced(h: torch.Tensor) -> torch.Tensor:
                logits = lm_logits(h).clone()
                for r in range(h.shape[0]):
                    if calls[0] == 2 * r + 2:
                        logits[r, model.tok.eos_id] = 1e4
                calls[0] += 1
                return logits

            model.lm_logits = forced
        prefix = model.embed_prefix(batch)
        cache = model._run([prefix], keep_kv=True, reserve=64)[1]
        ids, valid, fast = model._decode([prefix], cache, PLAN, 12, model.tok.plan_id, B)
        calls[0] = 0
        model._token_stepper = lambda *a: None  # the generic path: _run per token
        ids_ref, valid_ref, ref = model._decode([prefix], cache, PLAN, 12, model.tok.plan_id, B)
    assert torch.equal(ids, ids_ref) and torch.equal(valid, valid_ref)
    assert bool((~valid).any()) == early_eos
    assert fast.n == ref.n and torch.equal(fast.block, ref.block) and torch.equal(fast.valid, ref.valid)
    assert torch.equal(fast.causal, ref.causal) and torch.equal(fast.is_vlm, ref.is_vlm)
    for a, b in zip(fast.k + fast.v, ref.k + ref.v):
        assert (a - b).abs().max() < 1e-5


def test_a_cache_extended_twice_from_one_parent_keeps_both_branches_apart():
    torch.manual_seed(0)
    model = VLA(tiny_config()).eval()
    batch = model_batch(model.cfg)
    with torch.no_grad():
        parent = model._run([model.embed_prefix(batch)], keep_kv=True, reserve=8)[1]
        plan = model.embed_plan(batch["plan_tokens"], batch["plan_mask"])
        a = model._run([plan], parent, keep_kv=True)[1]
        state = model.embed_state(batch["state"])
        b = model._run([state], parent, keep_kv=True)[1]  # writes where `a` wrote: must copy, not overwrite
        a_again = model._run([plan], parent, keep_kv=True)[1]
    assert b.store is not a.store
    for x, y in zip(a.k + a.v, a_again.k + a_again.v):
        assert torch.equal(x, y)
