"""The VLA model: a raw-patch vision-language backbone plus Mixture-of-Transformers experts.

Token sequence of one sample (docs/architecture.md), left to right::

    block   tokens                                    expert   attention
    PREFIX  image patches (each view), instruction    vlm      bidirectional
    PLAN    <plan> subtask text <eos>                 vlm      causal; sees PREFIX
    STATE   one state token                           action   sees PREFIX+PLAN (not time-conditioned)
    ACTION  H noisy action tokens                     action   bidirectional; sees PREFIX..STATE
    FRAME   P noisy future-frame patch tokens         frame    bidirectional; sees PREFIX+PLAN+STATE

Instruction tokens are byte embeddings, or with ``text: minilm`` the per-token states of a frozen
(or ``text_finetune``) pretrained MiniLM projected to the vlm width (`vla.text_encoder`). Plan
tokens are bytes, or with ``plan_vocab: words`` `vla.tokenizer.PlanVocab` words whose copy slots
point at instruction words (`plan_logits`).

(``planner: side``, i.e. ``actions_read_plan: false``: STATE, ACTION and FRAME do not see PLAN; the plan is
a decoded side output. ``frame: condition`` also lets ACTION see FRAME; then actions and frame share one flow time and
are integrated jointly.) With ``action_head: discrete`` the state token joins the prefix and the
ACTION block is ``<sep>`` + H*A action-bin tokens decoded causally by the vlm expert (RT-2 style);
with ``goal_condition`` a vlm goal token (STATE block) sits between the plan and the action bins.

Every expert owns its norms, QKV/O projections and MLP; all tokens meet in ONE joint attention
(``scaled_dot_product_attention`` with the block mask from `vla.attention`). ``experts: dense``
routes every token through the vlm expert's weights (the baseline). Action and frame experts are
conditioned on flow time by adaptive RMSNorm (scale, shift, residual gate). Positions: learned 2D
patch + view embeddings for images, and rotary embeddings (RoPE) for every token at the position
`vla.attention.token_positions` gives (valid tokens it sees to its left): padding never shifts
positions, a KV cache continues them, and the action and frame blocks both start right after the
state, whether run together (training) or separately against the cache (inference).
Dense experts: the shared trunk is a plain transformer; flow time is added to the action and frame
token embeddings instead (pi0's action-time MLP), so dense = MoT minus the expert copies.
With ``knowledge_insulation`` the action/frame queries read the vlm's keys and values through
``.detach()``: action and frame losses send exactly zero gradient into vlm parameters.

Verbs: `VLA.compute_loss(batch)` for training, `VLA.sample(batch)` for inference (KV-cached prefix,
greedy plan decoding, Euler integration of only the action block per flow step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vla.attention import default_visibility, make_attn_mask, token_positions
from vla.flow import euler_integrate, interpolate, sample_time, time_embedding
from vla.model_config import VLAConfig, check_batch, conv_strides
from vla.tokenizer import ByteTokenizer, PlanGrammar, PlanRules, PlanVocab

__all__ = ["VLA", "VLAConfig"]

PREFIX, PLAN, STATE, ACTION, FRAME = range(5)  # block ids, left to right


# ----------------------------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return F.rms_norm(x, x.shape[-1:], self.weight, eps=1e-6), None


class AdaRMSNorm(nn.Module):
    """RMSNorm whose scale, shift and residual gate come from a conditioning vector (zero-init = plain)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mod = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = self.mod(cond).chunk(3, dim=-1)  # 3 x (B, N, W)
        return F.rms_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift, 1 + gate


class ExpertLayer(nn.Module):
    """One transformer layer's weights for one expert; the attention itself is joint (see `VLA._run`)."""

    def __init__(self, width: int, n_heads: int, head_dim: int, mlp_ratio: float, adaptive: bool,
                 gelu: str = "tanh") -> None:
        super().__init__()
        norm = AdaRMSNorm if adaptive else RMSNorm
        self.attn_norm, self.mlp_norm = norm(width), norm(width)
        self.qkv = nn.Linear(width, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, width, bias=False)
        hidden = int(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(approximate=_approximate(gelu)),
                                 nn.Linear(hidden, width, bias=False))


class Expert(nn.Module):
    def __init__(self, cfg: VLAConfig, width: int, adaptive: bool) -> None:
        super().__init__()
        self.width, self.adaptive = width, adaptive
        self.layers = nn.ModuleList(ExpertLayer(width, cfg.n_heads, cfg.head_dim, cfg.mlp_ratio, adaptive, cfg.gelu)
                                    for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(width)


class TimeMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(time_embedding(t, self.width))  # (B, W)


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, N, hd/2) of the rotary embedding at integer positions pos (B, N)."""
    half = head_dim // 2
    freq = theta ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)  # (hd/2,)
    ang = pos.float()[:, None, :, None] * freq  # (B, 1, N, hd/2)
    return ang.cos(), ang.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, hd) by the angles of `rope_angles` (the reference form; see `rope_tables`)."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, N, hd)


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables for `rope_fast`: cos|cos and -sin|sin, each (B, 1, N, hd)."""
    cos, sin = rope_angles(pos, head_dim, theta)  # (B, 1, N, hd/2) x2
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def rope_fast(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """`rope` in 4 kernels instead of 9: ``x * cos2 + roll(x, hd/2) * sin2`` with `rope_tables`.

    Bit-identical to `rope` (first half: x1*cos + x2*(-sin) == x1*cos - x2*sin exactly in IEEE
    arithmetic; second half: the same products in the same order). ``x`` may carry extra leading
    dims (q and k rotated in one call: (2, B, H, N, hd)).
    """
    if cos2.dtype != x.dtype:
        cos2, sin2 = cos2.to(x.dtype), sin2.to(x.dtype)
    return x * cos2 + x.roll(x.shape[-1] // 2, -1) * sin2


def norm_fn(x: torch.Tensor, norm: nn.Module, mod: tuple | None = None) -> torch.Tensor:
    """A layer's `RMSNorm` as a function, or its `AdaRMSNorm` given ``mod`` = (scale1, shift, gate1)
    from `VLA._step_mods` (the inference paths that call layers as functions: `_integrate`, `_TokenStepper`)."""
    if mod is None:
        return F.rms_norm(x, x.shape[-1:], norm.weight, eps=1e-6)
    scale1, shift, _ = mod
    return torch.addcmul(shift, F.rms_norm(x, x.shape[-1:], eps=1e-6), scale1)


def mlp_fn(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A layer's bias-free GELU MLP as a function (see `norm_fn`)."""
    return F.linear(F.gelu(F.linear(h, layer.mlp[0].weight), approximate=layer.mlp[1].approximate),
                    layer.mlp[2].weight)


def _approximate(gelu: str) -> str:
    """`VLAConfig.gelu` ("tanh" | "erf") as torch's ``approximate`` argument ("tanh" | "none")."""
    return "tanh" if gelu == "tanh" else "none"


class ConvStem(nn.Module):
    """Strided 3x3 convolutions from pixels to one token per patch (early convolutions, Xiao et al. 2021).

    A linear map of raw patches must learn where a 4-pixel object sits inside its patch from few
    demonstrations; a few conv layers see it at full resolution first. Channels double per stage,
    then a 1x1 conv reaches the model width. (B*V, 3, H, W) -> (B*V, H/p * W/p, D), row-major like `patchify`.
    With ``film`` every stage's features are scaled and shifted by the instruction (FiLM, as in
    RT-1 and BC-Z: the text picks which colours and shapes the early features keep); zero-initialised,
    so training starts from the plain stem. With ``coords`` two constant channels, x and y in [-1, 1],
    join the pixels (CoordConv, Liu et al. 2018): a feature can say *where* as well as *what*, so the
    token of the named object carries its position without first learning it from `patch_pos`.
    """

    def __init__(self, strides: list[int], width: int, base: int = 32, film: bool = False,
                 coords: bool = False, keypoints: int = 0, gelu: str = "tanh") -> None:
        super().__init__()
        self.approximate = _approximate(gelu)
        self.convs = nn.ModuleList()
        self.films = nn.ModuleList() if film else None
        self.coords = coords
        c_in = 5 if coords else 3
        self.keypoint_stage, stride = len(strides) - 1, 1
        for i, s in enumerate(strides):
            c_out = min(base * 2 ** i, width)
            # No normalization over the image (GroupNorm/BatchNorm): a token must depend on its own
            # neighbourhood only, as a patch embedding does.
            self.convs.append(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1 if s == 2 else 0))
            if self.films is not None:
                self.films.append(nn.Linear(width, 2 * c_out))
            stride *= s
            if stride >= 4 and self.keypoint_stage == len(strides) - 1 and i < len(strides) - 1:
                self.keypoint_stage = i  # the first map at 1/4 resolution (24 x 24 at 96 px)
            c_in = c_out
        self.out = nn.Conv2d(c_in, width, 1)
        self.keypoints = None
        if keypoints:
            c_kp = self.convs[self.keypoint_stage].out_channels
            self.keypoints = SpatialSoftmax(c_kp, keypoints, width)

    def forward(self, img: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = img  # (N, 3, H, W)
        if self.coords:
            n, _, h, w = img.shape
            ys = torch.linspace(-1, 1, h, device=img.device, dtype=img.dtype)[:, None].expand(h, w)
            xs = torch.linspace(-1, 1, w, device=img.device, dtype=img.dtype)[None, :].expand(h, w)
            x = torch.cat([img, torch.stack([xs, ys]).expand(n, 2, h, w)], 1)  # (N, 5, H, W)
        # channels-last: oneDNN's convolutions and the elementwise FiLM/GELU run ~1.4x faster on the CPU in
        # this layout (same values), and the tokens below come out contiguous
        x = x.contiguous(memory_format=torch.channels_last)
        kp = None
        for i, conv in enumerate(self.convs):
            x = conv(x)  # (N, C, h, w)
            if self.films is not None and cond is not None:
                scale, shift = self.films[i](cond).chunk(2, dim=-1)  # (N, C) x2
                x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            x = F.gelu(x, approximate=self.approximate)
            if self.keypoints is not None and i == self.keypoint_stage:
                kp = self.keypoints(x)  # (N, 1, D)
        tokens = self.out(x).flatten(2).transpose(1, 2)  # (N, Np, D)
        return tokens if kp is None else torch.cat([tokens, kp], 1)  # (N, Np [+1], D)


class SpatialSoftmax(nn.Module):
    """K keypoints of a feature map as one token: where each of K learnt detectors fires, to sub-pixel precision.

    A 1x1 conv scores every location for K detectors; a softmax over the locations (learnt temperature)
    turns each score map into a distribution whose mean (x, y) in [-1, 1] is the keypoint (Levine et al.
    2016; the image encoder of Diffusion Policy). Tokens of 16 px patches say *what* is in a patch and,
    with CoordConv, roughly where; the keypoints hand the action expert coordinates. Under FiLM the
    detectors see instruction-modulated features, so a detector can follow the object the words name.
    (N, C, h, w) -> (N, 1, D).
    """

    def __init__(self, channels: int, keypoints: int, width: int) -> None:
        super().__init__()
        self.score = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.proj = nn.Linear(2 * keypoints, width)

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, K, 2): each detector's expected (x, y), -1 = left/top edge, +1 = right/bottom."""
        _, _, h, w = x.shape
        logits = self.score(x).flatten(2).float() / self.log_temperature.float().exp()  # (N, K, h*w)
        prob = logits.softmax(-1)
        ys = torch.linspace(-1, 1, h, device=x.device)[:, None].expand(h, w).reshape(-1)  # (h*w,)
        xs = torch.linspace(-1, 1, w, device=x.device)[None, :].expand(h, w).reshape(-1)
        return torch.stack([prob @ xs, prob @ ys], -1)  # (N, K, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pts = self.points(x)  # (N, K, 2)
        return self.proj(pts.flatten(1).to(self.proj.weight.dtype))[:, None]  # (N, 1, D)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(B, ..., 3, H, W) -> (B, ..., H/p * W/p, 3*p*p), row-major patches."""
    *lead, c, h, w = img.shape
    x = img.reshape(*lead, c, h // p, p, w // p, p)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # (..., H/p, W/p, 3, p, p)
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, P, 3*p*p) -> (B, 3, H, W), the inverse of `patchify`."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, H/p, p, W/p, p)
    return x.reshape(b, 3, h, w)


@dataclass
class Segment:
    """A run of tokens of one block, routed to one expert."""

    expert: str  # "vlm" | "action" | "frame"
    x: torch.Tensor  # (B, n, width of the expert)
    block: int
    causal: bool
    valid: torch.Tensor  # (B, n) bool
    cond: torch.Tensor | None = None  # (B, width) flow-time conditioning; None = none (zeros)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention`` with an additive float (or bool, or no) mask, cast to q's dtype.

    On the CPU, bf16 inputs (autocast) take two bf16 matmuls around an fp32 softmax: the CPU's fused
    attention is ~3x slower in bf16 than in fp32, and for these short sequences (~130 tokens) the
    explicit form beats the fused fp32 kernel ~1.4x forward + backward while its scores and softmax
    stay in fp32 (the probabilities are rounded to bf16 for the second matmul, as GPU kernels do).
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            scores = (q @ k.transpose(-1, -2).to(q.dtype)).float().mul_(q.shape[-1] ** -0.5)  # (B, H, Nq, Nk)
            if mask is not None and mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif mask is not None:
                scores = scores + mask.float()
            return scores.softmax(-1).to(torch.bfloat16) @ v.to(torch.bfloat16)  # (B, H, Nq, hd)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _KVStore:
    """Preallocated per-layer key/value buffers (B, H, capacity, hd), shared by the `KVCache` views
    that extend each other; ``filled`` is the longest prefix some cache owns (see `VLA._run`)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], filled: int) -> None:
        self.k, self.v, self.filled = k, v, filled

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def allocate(cls, like: torch.Tensor, n_layers: int, capacity: int, keep: int = 0,
                 src: _KVStore | None = None) -> _KVStore:
        """Buffers shaped like ``like`` (B, H, *, hd) for ``capacity`` tokens; ``src``'s first ``keep`` copied."""
        b, h, _, hd = like.shape
        k = [like.new_empty(b, h, capacity, hd) for _ in range(n_layers)]
        v = [like.new_empty(b, h, capacity, hd) for _ in range(n_layers)]
        if src is not None and keep:
            for dst, old in zip(k + v, src.k + src.v):
                dst[:, :, :keep] = old[:, :, :keep]
        return cls(k, v, keep)


@dataclass
class KVCache:
    """Keys/values of the ``n`` tokens already run (the first ``n`` slots of ``store``'s per-layer
    buffers), plus their mask metadata. Running more tokens against it writes them after slot ``n``
    in place (no copy of the cache); a cache extended with ``keep_kv`` shares the buffers."""

    store: _KVStore
    n: int
    block: torch.Tensor  # (Nc,)
    causal: torch.Tensor  # (Nc,)
    valid: torch.Tensor  # (B, Nc)
    is_vlm: torch.Tensor  # (Nc,)

    @property
    def k(self) -> list[torch.Tensor]:
        """Per-layer keys (B, H, Nc, hd)."""
        return [t[:, :, : self.n] for t in self.store.k]

    @property
    def v(self) -> list[torch.Tensor]:
        return [t[:, :, : self.n] for t in self.store.v]


@dataclass
class _Layout:
    """What `VLA._run` derives from the token layout alone (block ids, causal and valid flags): the
    attention mask, the rotary tables and the key metadata. It depends on no activation, so a block
    run many times against the same cache (the Euler steps of `VLA.sample`) builds it once."""

    sizes: list[int]  # tokens per segment
    mask: torch.Tensor | None  # (B, 1, N, Nk) additive float (0 / -inf), or None: every key visible
    cos: torch.Tensor  # (B, 1, N, hd) `rope_tables`
    sin: torch.Tensor
    is_vlm: torch.Tensor  # (N,) queries routed to the vlm expert
    block: torch.Tensor  # (Nk,) keys: cache + these tokens
    causal: torch.Tensor  # (Nk,)
    valid: torch.Tensor  # (B, Nk)
    k_is_vlm: torch.Tensor  # (Nk,)


class _Clock:
    """Optional phase timings for `VLA.sample` (synchronizes CUDA so the numbers are real)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        import time

        self.timings, self.device, self.now = timings, device, time.perf_counter
        self.last = self.now() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = self.now()
        self.timings[name] = self.timings.get(name, 0.0) + t - self.last
        self.last = t


class _TokenStepper:
    """Greedy decoding's model calls: one vlm token at a time after a KV cache, without `_run`'s
    per-call layout. Valid for a causal block that sees every cached token (plan, discrete actions):
    a token then sees the valid keys before it and itself, and its rotary position is the count of
    valid tokens before it, so the mask is one running row of key biases and the positions a
    running count (both exactly what `make_attn_mask` / `token_positions` give). Keys and values go
    into the cache's buffers in place; `cache` returns the extended cache.
    """

    def __init__(self, model: VLA, cache: KVCache, block: int, max_len: int) -> None:
        cfg = model.cfg
        self.model, self.block, self.base, self.n = model, block, cache.n, 0
        self.old = cache
        store = cache.store
        if store.filled > cache.n or cache.n + max_len > store.capacity:
            store = _KVStore.allocate(store.k[0], cfg.n_layers, cache.n + max_len, cache.n, store)
        self.store = store
        dev = cache.valid.device
        self.cos, self.sin = rope_tables(torch.arange(cache.n + max_len, device=dev)[None], cfg.head_dim,
                                         cfg.rope_theta)  # (1, 1, P, hd): position -> table row
        self.pos = cache.valid.sum(1)  # (B,) valid tokens so far = the next token's position
        self.bias = torch.zeros(cache.valid.shape[0], 1, 1, cache.n + max_len, device=dev)  # key biases
        self.bias[:, 0, 0, : cache.n].masked_fill_(~cache.valid, float("-inf"))
        self.masked = not bool(cache.valid.all())  # False: every key so far is valid, attend unmasked
        self.valid: list[torch.Tensor] = []

    def run(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run one token per sample, embeddings x (B, 1, D) and valid (B,); returns its final-normed output (B, D)."""
        cfg, e = self.model.cfg, self.model.expert("vlm")
        b, nh, hd = x.shape[0], cfg.n_heads, cfg.head_dim
        col = self.base + self.n
        cos, sin = self.cos[0, 0][self.pos][:, None, None], self.sin[0, 0][self.pos][:, None, None]  # (B,1,1,hd)
        mask = self.bias[..., : col + 1] if self.masked else None  # the token always sees itself (bias 0)
        x = x.float()
        for li, layer in enumerate(e.layers):
            qkv = F.linear(norm_fn(x, layer.attn_norm), layer.qkv.weight)
            qkv = qkv.view(b, 1, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, 1, hd)
            qk = rope_fast(qkv[:2], cos, sin)
            self.store.k[li][:, :, col:col + 1] = qk[1]
            self.store.v[li][:, :, col:col + 1] = qkv[2]
            k, v = self.store.k[li][:, :, : col + 1], self.store.v[li][:, :, : col + 1]
            att = attention(qk[0], k, v, mask)
            x = x + F.linear(att.transpose(1, 2).reshape(b, 1, nh * hd), layer.out.weight)
            x = x + mlp_fn(layer, norm_fn(x, layer.mlp_norm))
        if not bool(valid.all()):  # padding (a finished plan): later tokens must not see it
            self.bias[:, 0, 0, col].masked_fill_(~valid, float("-inf"))
            self.masked = True
        self.pos = self.pos + valid
        self.valid.append(valid)
        self.n += 1
        return norm_fn(x, e.final_norm)[:, -1]

    def cache(self) -> KVCache:
        """The cache extended by every token run so far (its metadata as `_run` would have built it)."""
        old, n, dev = self.old, self.n, self.old.valid.device
        if not n:
            return old
        self.store.filled = self.base + n
        return KVCache(self.store, self.base + n, torch.cat([old.block, torch.full((n,), self.block, device=dev)]),
                       torch.cat([old.causal, torch.ones(n, dtype=torch.bool, device=dev)]),
                       torch.cat([old.valid, torch.stack(self.valid, 1)], 1),
                       torch.cat([old.is_vlm, torch.ones(n, dtype=torch.bool, device=dev)]))


class FlowGraphs:
    """CUDA graphs of the Euler loop (`VLA._flow_loop`): at a few dozen kernels per layer and step, a
    small model's action phase is bound by kernel launches, not arithmetic, and a graph replays the
    whole loop (10 steps x every layer) as one launch.

    One graph per input signature (block shapes, context length, mask or none, dtypes, autocast),
    captured on first use and kept (at most ``max_graphs``, oldest dropped). Each graph owns static
    copies of everything the loop reads: the noise, the context's keys/values, the mask and rotary
    tables; a call copies the live tensors in, replays, and returns clones of the outputs. The
    weights are read in place, so loading new weights into the same parameters needs no re-capture.

    ``capture=False`` runs the same static-buffer path without a graph (on any device): the CPU
    tests check that path against the plain loop, and the CUDA tests check the graph against it.
    """

    def __init__(self, capture: bool = True, max_graphs: int = 16) -> None:
        self.capture, self.max_graphs = capture, max_graphs
        self.graphs: dict[tuple, dict[str, Any]] = {}
        self.pool = None
        self.captures = 0  # how many graphs were captured (tests, benchmarks)

    def clear(self) -> None:
        self.graphs.clear()

    @staticmethod
    def _key(noise: dict[str, torch.Tensor], t: torch.Tensor, lay: _Layout, store: _KVStore, base: int) -> tuple:
        dev = t.device
        return (tuple((k, tuple(v.shape), v.dtype) for k, v in noise.items()), t.shape[0], base,
                tuple(lay.sizes), lay.mask is None, tuple(lay.cos.shape), store.k[0].dtype, tuple(store.k[0].shape[:2]),
                dev.type, torch.is_autocast_enabled(dev.type),
                torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None)

    def _build(self, model: VLA, noise: dict[str, torch.Tensor], t: torch.Tensor, lay: _Layout, store: _KVStore,
               base: int, n_new: int) -> dict[str, Any]:
        static = {
            "noise": {k: v.clone() for k, v in noise.items()},
            "t": t.clone(),
            "store": _KVStore.allocate(store.k[0], model.cfg.n_layers, base + n_new, base, store),
            "lay": _Layout(list(lay.sizes), None if lay.mask is None else lay.mask.clone(), lay.cos.clone(),
                           lay.sin.clone(), lay.is_vlm, lay.block, lay.causal, lay.valid, lay.k_is_vlm),
        }

        def loop() -> list[torch.Tensor]:
            return model._flow_loop(static["noise"], static["t"], static["lay"], static["store"], base, n_new)

        static["loop"], static["graph"] = loop, None
        if self.capture:
            dev = t.device
            amp = torch.is_autocast_enabled(dev.type)
            # no autocast weight-cast cache inside the graph: its tensors would be freed after capture
            ctx = torch.autocast(dev.type, dtype=torch.get_autocast_dtype(dev.type), enabled=amp, cache_enabled=False)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with ctx, torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (lazy inits, cuBLAS workspaces)
                    loop()
            torch.cuda.current_stream(dev).wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with ctx, torch.cuda.graph(graph, pool=self.pool):
                static["out"] = loop()
            static["graph"] = graph
            self.captures += 1
        return static

    def run(self, model: VLA, noise: dict[str, torch.Tensor], t: torch.Tensor, lay: _Layout, store: _KVStore,
            base: int, n_new: int) -> list[torch.Tensor]:
        key = self._key(noise, t, lay, store, base)
        g = self.graphs.get(key)
        if g is None:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            g = self.graphs[key] = self._build(model, noise, t, lay, store, base, n_new)
        for k, v in noise.items():
            g["noise"][k].copy_(v)
        for dst, src in zip(g["store"].k + g["store"].v, store.k + store.v):
            dst[:, :, :base].copy_(src[:, :, :base])
        g["lay"].cos.copy_(lay.cos)
        g["lay"].sin.copy_(lay.sin)
        if lay.mask is not None:
            g["lay"].mask.copy_(lay.mask)
        if g["graph"] is None:
            return g["loop"]()
        g["graph"].replay()
        return [o.clone() for o in g["out"]]


# ----------------------------------------------------------------------------------------------- model
class VLA(nn.Module):
    """Parameters live in three groups: ``vlm`` (patches, text, plan head, trunk), ``action``, ``frame``."""

    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = ByteTokenizer(cfg.action_bins)
        d, p = cfg.d_model, cfg.patch_size
        dense = cfg.experts == "dense"
        self.vlm = nn.ModuleDict({
            "patch": (nn.Linear(3 * p * p, d) if cfg.vision == "patch"
                      else ConvStem(conv_strides(p), d, film=cfg.vision_film, coords=cfg.vision_coords,
                                    keypoints=cfg.vision_keypoints, gelu=cfg.gelu)),
            "patch_pos": nn.Embedding(cfg.tokens_per_view, d),  # 2D position of a patch in its view (+ keypoints)
            "view": nn.Embedding(cfg.num_views, d),  # camera x history step
            "embed": nn.Embedding(self.tok.vocab_size, d),  # tied with the LM head
            "expert": Expert(cfg, d, adaptive=False),
        })
        state_in = cfg.state_dim * cfg.n_obs_steps
        if cfg.action_head == "discrete":
            self.vlm["state"] = nn.Linear(state_in, d)
            self.action = nn.ModuleDict()  # only the goal head below, if any (its goal token is a vlm token)
            wa = d
        else:
            wa = d if dense else cfg.action_width
            self.action = nn.ModuleDict({"state": nn.Linear(state_in, wa), "inp": nn.Linear(cfg.action_dim, wa),
                                         "time": TimeMLP(wa), "out": nn.Linear(wa, cfg.action_dim)})
            if not dense:
                self.action["expert"] = Expert(cfg, wa, adaptive=True)
        if cfg.goal_loss_weight > 0 and cfg.goal_head == "point":  # point at a patch, map the point to a state
            self.action["goal_score"] = nn.Linear(d, 1)
            self.action["goal"] = nn.Sequential(nn.Linear(2, 64), nn.GELU(), nn.Linear(64, cfg.state_dim))
            gh, gw = cfg.image_hw[0] // p, cfg.image_hw[1] // p
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, gh), torch.linspace(-1, 1, gw), indexing="ij")
            self.register_buffer("goal_grid", torch.stack([xs, ys], -1).reshape(-1, 2), persistent=False)
            if cfg.goal_offset:  # where inside its patch the goal lies, in patch widths (tanh: within the patch)
                self.action["goal_offset"] = nn.Linear(d, 2)
            if cfg.goal_condition:  # the state token (discrete: a goal token) reads the goal too
                self.action["goal_in"] = nn.Linear(cfg.state_dim, wa)
        elif cfg.goal_loss_weight > 0:  # auxiliary: the state token predicts where the hand grasps/lets go next
            self.action["goal"] = nn.Linear(wa, cfg.state_dim)
        if cfg.frame != "off":
            wf, pf = (d if dense else cfg.frame_width), (cfg.frame_size // p) ** 2
            self.frame = nn.ModuleDict({"inp": nn.Linear(3 * p * p, wf), "pos": nn.Embedding(pf, wf),
                                        "time": TimeMLP(wf), "out": nn.Linear(wf, 3 * p * p)})
            if not dense:
                self.frame["expert"] = Expert(cfg, wf, adaptive=True)
        sees = default_visibility(5)
        sees[FRAME, ACTION] = False  # the frame never reads the noisy actions
        sees[ACTION, FRAME] = cfg.frame == "condition"
        if not cfg.actions_read_plan:  # planner=side: the plan is decoded and shown, never read by the experts
            sees[[STATE, ACTION, FRAME], PLAN] = False
        self.register_buffer("sees", sees, persistent=False)
        self.plan_vocab = PlanVocab(cfg.plan_words, cfg.copy_slots) if cfg.plan_vocab == "words" else None
        self.plan_grammar = (PlanGrammar(cfg.plan_subtasks, cfg.plan_max_subtasks)
                             if self.plan_vocab is not None and cfg.plan_subtasks else None)
        if self.plan_vocab is not None:  # word plans: own embedding (tied with their head) + copy pointer query
            self.vlm["plan_embed"] = nn.Embedding(self.plan_vocab.vocab_size, d)
            self.vlm["copy_query"] = nn.Linear(d, d, bias=False)
        if cfg.text == "minilm":
            from vla.text_encoder import MINILM

            self.vlm["text_proj"] = nn.Linear(MINILM["hidden_size"], d)  # per-token states -> vlm width
        self.apply(self._init_weights)
        if "goal_score" in getattr(self, "action", {}):  # the point -> state map: torch's default init, so that
            for layer in self.action["goal"]:  # its gradient reaches the patch scores (at std 0.02 it barely does)
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        if cfg.text == "minilm":  # after _init_weights, which would overwrite the pretrained weights
            from vla.text_encoder import BertEncoder

            self.vlm["text_encoder"] = BertEncoder().load_pretrained().requires_grad_(cfg.text_finetune)
        self._text_memo: dict[tuple, torch.Tensor] = {}  # frozen encoder: token ids -> states (see encode_instruction)
        self.flow_graphs: FlowGraphs | None = None  # `use_cuda_graphs`: the Euler loop replayed from CUDA graphs

    def use_cuda_graphs(self, on: bool = True, capture: bool = True) -> VLA:
        """Replay `sample`'s Euler loop from CUDA graphs (inference on CUDA; see `FlowGraphs`). Off by
        default. ``capture=False``: the graphs' static-buffer path without capturing (tests, any device)."""
        self.flow_graphs = FlowGraphs(capture=capture) if on else None
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._text_memo.clear()  # new encoder weights: memoized states are stale
        if self.flow_graphs is not None:  # a state dict may bring other dtypes/devices: re-capture
            self.flow_graphs.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, AdaRMSNorm):  # `apply` visits children first: re-zero the modulation
            nn.init.zeros_(m.mod.weight)
            nn.init.zeros_(m.mod.bias)
        elif isinstance(m, ConvStem) and m.films is not None:  # FiLM starts as the identity
            for f in m.films:
                nn.init.zeros_(f.weight)
                nn.init.zeros_(f.bias)

    @property
    def plan_tok(self) -> ByteTokenizer | PlanVocab:
        """The tokenizer of the PLAN block (ids of <pad>, <plan>, <eos>): bytes or `PlanVocab`."""
        return self.tok if self.plan_vocab is None else self.plan_vocab

    def expert(self, name: str) -> Expert:
        return self.vlm["expert"] if name == "vlm" or self.cfg.experts == "dense" else getattr(self, name)["expert"]

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by owner: "vlm" (vision, text, plan, dense trunk), "action", "frame"."""
        return {g: list(getattr(self, g).named_parameters()) for g in ("vlm", "action", "frame") if hasattr(self, g)}

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: "decay" holds the weight matrices of linear layers; "no_decay" the biases,
        norm scales (ndim < 2) and every ``nn.Embedding`` table (tokens, patch positions, views),
        decided by module type, not by parameter name. Parameters keep ``named_parameters`` order
        (optimizer states in checkpoints are indexed by it)."""
        plain = {id(p) for mod in self.modules() for p in mod.parameters(recurse=False)
                 if p.ndim < 2 or isinstance(mod, nn.Embedding)}
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if id(p) not in plain], "weight_decay": float(weight_decay), "name": "decay"},
            {"params": [p for p in params if id(p) in plain], "weight_decay": 0.0, "name": "no_decay"},
        ]

    # ------------------------------------------------------------------------------- embedding
    def encode_instruction(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Instruction tokens (B, Li) -> the prefix's instruction embeddings (B, Li, D).

        bytes: a table lookup. minilm: the encoder's per-token states projected into the vlm width
        (no pooling). Without ``text_finetune`` the encoder is frozen: it runs without autograd, and
        its states are memoized per distinct instruction (a store has a few paraphrases per task, so
        training runs the 22M-parameter encoder a handful of times instead of once per step).
        """
        v = self.vlm
        if self.cfg.text == "bytes":
            return v["embed"](tokens)  # (B, Li, D)
        enc = v["text_encoder"]
        if self.cfg.text_finetune:
            return v["text_proj"](enc(tokens, mask))  # (B, Li, D)
        return v["text_proj"](self._frozen_text_states(tokens, mask))  # (B, Li, D)

    def _frozen_text_states(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's states (B, Li, 384) of each row, from the per-instruction memo.

        The ids reach the host once per batch, not once per row (on a GPU each row's ``tolist`` is a host
        sync: 116 vs 94 ms per tiny step of 256 on an H200, BENCHMARKS.md "GPU"); each distinct
        instruction of the batch is copied into a small table once, and one gather spreads it to the rows.
        """
        enc = self.vlm["text_encoder"]
        ids, lengths = tokens.cpu(), mask.sum(1).cpu().tolist()
        keys = [(str(tokens.device), *ids[k, :n].tolist()) for k, n in enumerate(lengths)]
        first_row = {}  # distinct key -> its first row in the batch
        for k, key in enumerate(keys):
            first_row.setdefault(key, k)
        new = [key for key in first_row if key not in self._text_memo]
        if len(self._text_memo) + len(new) > 4096:  # bounded: a server may see many texts
            self._text_memo.clear()
            new = list(first_row)
        for key in new:
            k, n = first_row[key], len(key) - 1
            with torch.no_grad():
                self._text_memo[key] = enc(tokens[k:k + 1, :n], mask[k:k + 1, :n])[0]  # (n, 384)
        table = tokens.new_zeros(len(first_row), tokens.shape[1], enc.width, dtype=torch.float32)  # (U, Li, 384)
        slot = {key: j for j, key in enumerate(first_row)}
        for key, j in slot.items():
            table[j, :len(key) - 1] = self._text_memo[key]
        index = torch.tensor([slot[key] for key in keys], device=tokens.device)  # (B,)
        return table[index]  # (B, Li, 384)

    def cached_instruction_embeds(self, batch: Mapping[str, Any], texts: list[str],
                                  cache: dict[str, torch.Tensor]) -> torch.Tensor:
        """``encode_instruction`` of a batch, each distinct text encoded once and kept in ``cache``.

        For a policy: an episode's instruction does not change, so the encoder runs once per episode
        instead of once per chunk. Rows are padded to the batch's instruction length (zeros).
        """
        ids, mask = batch["instruction_tokens"], batch["instruction_mask"]  # (B, Li) x2
        out = torch.zeros(*ids.shape, self.cfg.d_model, device=ids.device)  # (B, Li, D)
        for k, text in enumerate(texts):
            n = int(mask[k].sum())
            key = f"{n}:{text}"  # the token count too: the same text truncated differently is another entry
            if key not in cache:
                if len(cache) >= 1024:  # a server sees many texts; keep memory bounded
                    cache.clear()
                cache[key] = self.encode_instruction(ids[k:k + 1, :n], mask[k:k + 1, :n])[0]  # (n, D)
            out[k, :n] = cache[key]
        return out

    def embed_prefix(self, batch: Mapping[str, torch.Tensor]) -> Segment:
        cfg, v = self.cfg, self.vlm
        img = batch["images"]  # (B, V, 3, H, W)
        b, nv = img.shape[:2]
        text = batch.get("instruction_embeds")
        if text is None:
            text = self.encode_instruction(batch["instruction_tokens"], batch["instruction_mask"])  # (B, Li, D)
        if cfg.vision == "conv":
            cond = None
            if cfg.vision_film:  # the instruction's mean token, once per view
                m = batch["instruction_mask"].to(text.dtype)[..., None]  # (B, Li, 1)
                cond = ((text * m).sum(1) / m.sum(1).clamp_min(1)).repeat_interleave(nv, 0)  # (B*V, D)
            patches = v["patch"](img.flatten(0, 1), cond).unflatten(0, (b, nv))  # (B, V, Np, D)
        else:
            patches = v["patch"](patchify(img, cfg.patch_size))  # (B, V, Np, D)
        patches = patches + v["patch_pos"].weight[None, None] + v["view"].weight[None, :, None]  # (B, V, Np, D)
        parts = [patches.reshape(b, -1, cfg.d_model), text]  # (B, V*Np, D) (B, Li, D)
        valid = [torch.ones(parts[0].shape[:2], dtype=torch.bool, device=img.device), batch["instruction_mask"]]
        if cfg.action_head == "discrete":  # the vlm reads the state itself
            parts.append(v["state"](self.state_input(batch["state"]))[:, None])  # (B, 1, D)
            valid.append(torch.ones(b, 1, dtype=torch.bool, device=img.device))
        return Segment("vlm", torch.cat(parts, 1), PREFIX, False, torch.cat(valid, 1))

    def instruction_words(self, batch: Mapping[str, torch.Tensor],
                          text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Word plans' pointer targets: the instruction embedding at each word's first token (B, K, D), ok (B, K).

        ``instruction_word_pos`` (B, K) from the processor gives the token index of instruction word i
        (-1: no such word, or truncated away). A copy of word i is scored against, and embedded as, this vector.
        """
        if text is None:
            text = batch.get("instruction_embeds")
            if text is None:
                text = self.encode_instruction(batch["instruction_tokens"], batch["instruction_mask"])  # (B, Li, D)
        pos = batch["instruction_word_pos"]  # (B, K)
        ok = pos >= 0
        feats = torch.gather(text, 1, pos.clamp_min(0)[..., None].expand(-1, -1, text.shape[-1]))  # (B, K, D)
        return feats * ok[..., None], ok

    def embed_plan(self, tokens: torch.Tensor, mask: torch.Tensor,
                   words: tuple[torch.Tensor, torch.Tensor] | None = None) -> Segment:
        if self.plan_vocab is None:
            return Segment("vlm", self.vlm["embed"](tokens), PLAN, True, mask)  # (B, Lp, D)
        x = self.vlm["plan_embed"](tokens)  # (B, Lp, D); a copy slot's row tags "copied word i"
        slot = tokens - self.plan_vocab.copy_offset  # (B, Lp), >= 0 for copies
        if words is not None and words[0].shape[1]:
            feats = torch.gather(words[0], 1, slot.clamp(0, words[0].shape[1] - 1)[..., None].expand_as(x))
            x = x + feats * (slot >= 0)[..., None]  # a copy also carries the copied word's own embedding
        return Segment("vlm", x, PLAN, True, mask)

    def plan_logits(self, h: torch.Tensor, words: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Next plan token scores (B, n, V_plan) from vlm outputs h (B, n, D); copy slots point into the instruction."""
        if self.plan_vocab is None:
            return self.lm_logits(h)  # (B, n, vocab)
        pv = self.plan_vocab
        fixed = h @ self.vlm["plan_embed"].weight[: pv.copy_offset].T  # (B, n, 3 + W)
        feats, ok = words  # (B, K, D), (B, K)
        keys = feats + self.vlm["plan_embed"].weight[pv.copy_offset:]  # (B, K, D): the word and its index
        copy = self.vlm["copy_query"](h) @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5  # (B, n, K)
        copy = copy.masked_fill(~ok[:, None], float("-inf"))  # only words the instruction has
        logits = torch.cat([fixed, copy], -1)  # (B, n, V_plan)
        logits[..., pv.pad_id] = float("-inf")
        logits[..., pv.plan_id] = float("-inf")
        return logits

    def state_input(self, state: torch.Tensor) -> torch.Tensor:
        """The proprioceptive state as the model reads it: with ``state_dropout`` p, training zeroes each
        sample's state with chance p (so the actions must come from the images too: a policy that can
        read the hand position learns phase timing from it and under-uses vision, as the tabletop runs
        showed); p = 1 means no state at all, also at inference."""
        p = self.cfg.state_dropout
        if p >= 1.0:
            return torch.zeros_like(state)
        if p > 0.0 and self.training:
            keep = torch.rand(state.shape[0], 1, device=state.device) >= p  # (B, 1)
            return state * keep.to(state.dtype)
        return state

    def embed_state(self, state: torch.Tensor, goal: torch.Tensor | None = None) -> Segment:
        """The action expert's state token; with ``goal_condition`` it also reads ``goal`` (B, S), the
        normalized state at the next gripper switch (training: the true one plus noise; inference: the
        goal head's prediction, `goal_from_prefix`)."""
        x = self.action["state"](self.state_input(state))  # (B, Wa)
        if self.cfg.goal_condition:
            if goal is None:
                raise ValueError("VLA.embed_state: goal_condition=true needs the goal (B, state_dim), got None")
            x = x + self.action["goal_in"](goal.to(x.dtype))
        x = x[:, None]  # (B, 1, Wa); no time cond, so it can be cached
        return Segment("action", x, STATE, False, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    def embed_goal(self, goal: torch.Tensor) -> Segment:
        """The discrete head's goal token (B, 1, D): ``goal_condition`` with ``action_head: discrete`` puts the
        goal (B, S) into the vlm stream between the plan and the action bins (STATE block: the bins see it)."""
        x = self.action["goal_in"](goal.to(self.action["goal_in"].weight.dtype))[:, None]  # (B, 1, D)
        return Segment("vlm", x, STATE, False, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    def embed_actions(self, x_t: torch.Tensor, t: torch.Tensor) -> Segment:
        x = self.action["inp"](x_t)  # (B, H, Wa)
        ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return Segment("action", x, ACTION, False, ones, self.action["time"](t))

    def embed_discrete_actions(self, tokens: torch.Tensor) -> Segment:
        ones = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        return Segment("vlm", self.vlm["embed"](tokens), ACTION, True, ones)  # (B, n, D)

    def embed_frame(self, x_t: torch.Tensor, t: torch.Tensor) -> Segment:
        x = self.frame["inp"](x_t) + self.frame["pos"].weight[None]  # (B, P, Wf)
        ones = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return Segment("frame", x, FRAME, False, ones, self.frame["time"](t))

    # ------------------------------------------------------------------------------- transformer
    def _layout(self, segs: list[Segment], cache: KVCache | None = None, drop_full_mask: bool = False,
                sees: torch.Tensor | None = None) -> _Layout:
        """Mask, rotary tables and key metadata of ``segs`` run after ``cache`` (see `_Layout`).

        ``drop_full_mask``: when every query may see every key (one sample without padding), the
        mask becomes None and attention runs unmasked (inference; costs one host sync to decide).
        ``sees``: the block visibility (default the model's; training with extra action copies widens it).
        """
        cfg = self.cfg
        sees = self.sees if sees is None else sees
        dev = segs[0].x.device
        sizes = [s.x.shape[1] for s in segs]
        block = torch.cat([torch.full((n,), s.block, device=dev) for s, n in zip(segs, sizes)])  # (N,)
        causal = torch.cat([torch.full((n,), s.causal, device=dev) for s, n in zip(segs, sizes)])  # (N,)
        valid = torch.cat([s.valid for s in segs], 1)  # (B, N)
        is_vlm = torch.cat([torch.full((n,), s.expert == "vlm", device=dev) for s, n in zip(segs, sizes)])  # (N,)
        if cache is not None:
            block, causal = torch.cat([cache.block, block]), torch.cat([cache.causal, causal])
            valid_all, k_is_vlm = torch.cat([cache.valid, valid], 1), torch.cat([cache.is_vlm, is_vlm])
        else:
            valid_all, k_is_vlm = valid, is_vlm
        allowed = make_attn_mask(block, causal, valid_all, sees, num_queries=valid.shape[1])[:, None]  # (B,1,N,Nk)
        if drop_full_mask and bool(allowed.all()):
            mask = None
        else:  # what scaled_dot_product_attention would make of the bool mask at every call, made once
            mask = torch.zeros(allowed.shape, device=dev).masked_fill_(~allowed, float("-inf"))
        pos = token_positions(block, valid_all, sees, num_queries=valid.shape[1])  # (B, N)
        cos, sin = rope_tables(pos, cfg.head_dim, cfg.rope_theta)  # (B, 1, N, hd) x2
        return _Layout(sizes, mask, cos, sin, is_vlm, block, causal, valid_all, k_is_vlm)

    def _run(self, segs: list[Segment], cache: KVCache | None = None, keep_kv: bool = False,
             layout: _Layout | None = None, reserve: int = 0) -> tuple[list[torch.Tensor], KVCache | None]:
        """Run segments (optionally after cached tokens) through all layers; outputs per segment, final-normed.

        ``keep_kv``: also return the cache extended by these tokens (sharing ``cache``'s buffers; a new
        cache gets room for ``reserve`` more tokens). Without it, keys and values of these tokens are
        written after the cache's last token as scratch and the cache is unchanged.
        ``layout``: `_layout` of the same segment shapes and cache, when the caller already has it.
        """
        cfg = self.cfg
        b = segs[0].x.shape[0]
        lay = layout if layout is not None else self._layout(segs, cache)
        sizes = lay.sizes
        groups: list[tuple[Expert, list[int]]] = []  # consecutive segments that share an expert
        for i, s in enumerate(segs):
            e = self.expert(s.expert)
            if groups and groups[-1][0] is e:
                groups[-1][1].append(i)
            else:
                groups.append((e, [i]))
        xs, conds = [], []
        for e, idx in groups:
            parts = [segs[i].x.float() if segs[i].cond is None or e.adaptive  # fp32 residual stream
                     else segs[i].x.float() + segs[i].cond[:, None]  # dense: time joins the tokens
                     for i in idx]
            xs.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))  # (B, n_g, W)
            if e.adaptive:
                conds.append(torch.cat([(segs[i].cond[:, None] if segs[i].cond is not None
                                         else segs[i].x.new_zeros(b, 1, e.width)).expand(-1, sizes[i], -1)
                                        for i in idx], 1))  # (B, n_g, W)
            else:
                conds.append(None)
        nh, hd = cfg.n_heads, cfg.head_dim
        n_new = sum(sizes)
        base = cache.n if cache is not None else 0
        store = cache.store if cache is not None else None
        if store is not None and (store.filled > base or base + n_new > store.capacity):
            # another cache already extends these buffers past `base`, or they are full: copy ours out
            store = _KVStore.allocate(store.k[0], cfg.n_layers, base + n_new + reserve, base, store)
        for li in range(cfg.n_layers):
            qkv, gates = [], []
            for (e, _), x, c in zip(groups, xs, conds):
                h, g = e.layers[li].attn_norm(x, c)
                qkv.append(e.layers[li].qkv(h).view(b, x.shape[1], 3, nh, hd))  # (B, n_g, 3, H, hd)
                gates.append(g)
            qkv = (qkv[0] if len(qkv) == 1 else torch.cat(qkv, 1)).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
            qk = rope_fast(qkv[:2], lay.cos, lay.sin)  # q and k rotated together: (2, B, H, N, hd)
            q, k, v = qk[0], qk[1], qkv[2]
            if store is None and (keep_kv or cache is not None):
                store = _KVStore.allocate(k, cfg.n_layers, n_new + reserve)
            if store is not None:  # write these tokens after the cached ones, attend over both
                store.k[li][:, :, base:base + n_new] = k
                store.v[li][:, :, base:base + n_new] = v
                k, v = store.k[li][:, :, :base + n_new], store.v[li][:, :, :base + n_new]  # (B, H, Nk, hd)
            att = self._attend(q, k, v, lay.mask, lay.is_vlm, lay.k_is_vlm)  # (B, H, N, hd)
            att = att.transpose(1, 2).reshape(b, -1, nh * hd)
            att = [att] if len(xs) == 1 else att.split([x.shape[1] for x in xs], 1)  # per group
            for j, ((e, _), a) in enumerate(zip(groups, att)):
                layer = e.layers[li]
                o = layer.out(a)  # (B, n_g, W)
                xs[j] = xs[j] + (o if gates[j] is None else gates[j] * o)
                h, g = layer.mlp_norm(xs[j], conds[j])
                o = layer.mlp(h)  # (B, n_g, W)
                xs[j] = xs[j] + (o if g is None else g * o)
        outs = []
        for (e, idx), x in zip(groups, xs):
            x = e.final_norm(x)[0]
            outs.extend([x] if len(idx) == 1 else x.split([sizes[i] for i in idx], 1))
        new_cache = None
        if keep_kv:
            store.filled = base + n_new
            new_cache = KVCache(store, base + n_new, lay.block, lay.causal, lay.valid, lay.k_is_vlm)
        return outs, new_cache

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                q_is_vlm: torch.Tensor, k_is_vlm: torch.Tensor) -> torch.Tensor:
        """Joint attention (`attention`); with knowledge insulation non-vlm queries read vlm keys/values detached."""
        if not self.cfg.knowledge_insulation or bool(q_is_vlm.all()):
            return attention(q, k, v, mask)
        sel = k_is_vlm[None, None, :, None]  # (1, 1, Nk, 1)
        kd, vd = torch.where(sel, k.detach(), k), torch.where(sel, v.detach(), v)  # stop-gradient into the vlm
        if not bool(q_is_vlm.any()):
            return attention(q, kd, vd, mask)
        out = torch.empty_like(q)
        out[:, :, q_is_vlm] = attention(q[:, :, q_is_vlm], k, v, None if mask is None else mask[:, :, q_is_vlm])
        out[:, :, ~q_is_vlm] = attention(q[:, :, ~q_is_vlm], kd, vd, None if mask is None else mask[:, :, ~q_is_vlm])
        return out

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.vlm["embed"].weight.T  # (B, n, vocab)

    # ------------------------------------------------------------------------------- training
    def teacher_forced_context(self, batch: Mapping[str, torch.Tensor]
                               ) -> tuple[list[Segment], tuple[torch.Tensor, torch.Tensor] | None]:
        """PREFIX (+ the given PLAN with ``planner``) segments of a training batch, and the instruction's
        word features the word-plan copy pointer reads (None with byte plans or no planner)."""
        segs, words = [self.embed_prefix(batch)], None
        if self.cfg.planner:
            if self.plan_vocab is not None:
                n_img, n_text = self.cfg.num_image_tokens, batch["instruction_tokens"].shape[1]
                words = self.instruction_words(batch, segs[0].x[:, n_img:n_img + n_text])
            segs.append(self.embed_plan(batch["plan_tokens"], batch["plan_mask"], words))
        return segs, words

    def predict_goal(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The goal head's normalized state at the next gripper switch (B, S), from a training batch
        (plan tokens given, as in training): a cheap readout of where the model thinks the named object
        or receptacle is. Needs ``goal_loss_weight`` > 0."""
        if "goal" not in getattr(self, "action", {}):
            raise ValueError("VLA.predict_goal: this model has no goal head (train with model.goal_loss_weight > 0)")
        if self.cfg.goal_head == "point":  # read off the prefix alone (which sees nothing after it)
            return self.goal_from_prefix(self._run([self.embed_prefix(batch)])[0][0])
        segs, _ = self.teacher_forced_context(batch)
        segs.append(self.embed_state(batch["state"]))  # the state token sees PREFIX+PLAN only
        outs, _ = self._run(segs)
        return self.goal_readout(outs, len(segs) - 1)  # (B, S)

    def goal_from_prefix(self, prefix_out: torch.Tensor) -> torch.Tensor:
        """The point goal head's prediction (B, S) from the prefix's final states (B, N, D)."""
        return self.goal_readout([prefix_out], 0)

    def goal_readout(self, outs: list[torch.Tensor], state_seg: int) -> torch.Tensor:
        """The goal head (B, S). ``token``: a linear map of the state token. ``point``: a score per patch of
        the first camera (its final vlm states), softmax, the expected patch centre (x, y) in [-1, 1], then
        an MLP to the state: where the goal is must come from *which patch* the words pick out."""
        if self.cfg.goal_head == "point":
            w = self.goal_scores(outs[0]).softmax(-1)  # (B, Np)
            if not self.cfg.goal_offset:
                return self.action["goal"]((w @ self.goal_grid).to(outs[0].dtype))  # (B, S)
            points = self.goal_grid + self.goal_offsets(outs[0]) * self.goal_spacing()  # (B, Np, 2)
            return self.action["goal"]((w[:, None] @ points)[:, 0].to(outs[0].dtype))  # (B, S)
        return self.action["goal"](outs[state_seg][:, 0])  # (B, S)

    def goal_offsets(self, prefix_out: torch.Tensor) -> torch.Tensor:
        """``goal_offset``: where inside each first-camera patch the goal lies (B, Np, 2), (x, y) in patch widths
        from the patch centre, within (-0.5, 0.5)."""
        n = self.goal_grid.shape[0]
        return 0.5 * torch.tanh(self.action["goal_offset"](prefix_out[:, :n]).float())

    def goal_spacing(self) -> torch.Tensor:
        """The goal grid's step (x, y) between neighbouring patch centres, in its [-1, 1] units (2,)."""
        gh, gw = self.cfg.image_hw[0] // self.cfg.patch_size, self.cfg.image_hw[1] // self.cfg.patch_size
        return self.goal_grid.new_tensor([2.0 / max(gw - 1, 1), 2.0 / max(gh - 1, 1)])

    def goal_offset_target(self, pixel: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """Where pixel (column, row) (B, 2) lies inside its patch ``patch`` (B,) (from `goal_patch_target`), in patch
        widths from the patch centre (B, 2); rows whose patch is -100 (unknown) come back as 0."""
        p, gw = self.cfg.patch_size, self.cfg.image_hw[1] // self.cfg.patch_size
        cell = patch.clamp_min(0)  # the patch `goal_patch_target` chose, so offset and patch always agree
        centre = torch.stack([cell % gw, cell // gw], -1).to(pixel.dtype) * p + p / 2  # (B, 2) column, row
        off = ((torch.nan_to_num(pixel, 0.0) - centre) / p).clamp(-0.5, 0.5)  # (B, 2)
        return off.masked_fill((patch < 0)[:, None], 0.0)

    def goal_scores(self, prefix_out: torch.Tensor) -> torch.Tensor:
        """The point goal head's score (logit, f32) per patch of the first camera (B, Np), row-major."""
        n = self.goal_grid.shape[0]  # the first view's patches lead the prefix
        return self.action["goal_score"](prefix_out[:, :n]).squeeze(-1).float()

    def goal_patch_target(self, pixel: torch.Tensor) -> torch.Tensor:
        """The first camera's patch (row-major index, B) holding pixel (column, row) (B, 2); -100 where the
        pixel is outside the image or unknown (NaN)."""
        p, (h, w) = self.cfg.patch_size, self.cfg.image_hw
        inside = (pixel[:, 0] >= 0) & (pixel[:, 0] < w) & (pixel[:, 1] >= 0) & (pixel[:, 1] < h)
        ok = torch.isfinite(pixel).all(-1) & inside
        cell = torch.nan_to_num(pixel, 0.0).clamp_min(0).div(p).floor().long()  # (B, 2)
        idx = cell[:, 1].clamp_max(h // p - 1) * (w // p) + cell[:, 0].clamp_max(w // p - 1)
        return idx.masked_fill(~ok, -100)

    def _run_training(self, segs: list[Segment]) -> tuple[list[torch.Tensor], int]:
        """`_run` of a training sequence; returns the outputs per segment and how many rows (the first) ran the plan.

        Blocks past FRAME are extra noisy copies of the action chunk (``flow_samples``): the visibility gets one
        row and column per copy, each seeing what the ACTION block sees except the other copies.
        ``plan_rows`` n (with the plan a side output, which no later block reads): the first n rows run with
        the plan block and the rest without it; every other output is what one joint run would give.
        """
        cfg, b = self.cfg, segs[0].x.shape[0]
        sees = self.sees
        n_blocks = 1 + max(s.block for s in segs)
        if n_blocks > sees.shape[0]:
            sees = torch.zeros(n_blocks, n_blocks, dtype=torch.bool, device=self.sees.device)
            sees[:FRAME + 1, :FRAME + 1] = self.sees
            for blk in range(FRAME + 1, n_blocks):
                sees[blk, :FRAME + 1] = self.sees[ACTION, :FRAME + 1]
                sees[blk, ACTION] = False
                sees[blk, blk] = True
        n = cfg.plan_rows
        if not (cfg.planner and 0 < n < b):
            return self._run(segs, layout=self._layout(segs, sees=sees))[0], b

        def rows(s: Segment, part: slice) -> Segment:
            return replace(s, x=s.x[part], valid=s.valid[part], cond=None if s.cond is None else s.cond[part])

        head = [rows(s, slice(0, n)) for s in segs]
        tail = [rows(s, slice(n, b)) for i, s in enumerate(segs) if i != 1]  # segs[1] is the plan
        out_head = self._run(head, layout=self._layout(head, sees=sees))[0]
        out_tail = self._run(tail, layout=self._layout(tail, sees=sees))[0]
        out_tail.insert(1, None)
        return [o if i == 1 else torch.cat([o, out_tail[i]]) for i, o in enumerate(out_head)], n

    def compute_loss(self, batch: Mapping[str, torch.Tensor], per_sample: bool = False) -> dict[str, torch.Tensor]:
        """Losses of one batch from `Processor.training_batch`: loss, plan_loss, action_loss, frame_loss
        (scalars; with ``goal_loss_weight`` also goal_loss, the goal head's error); ``per_sample`` adds
        ``action_loss_per_sample`` (B,), detached, for per-task metrics.

        Optional batch keys fix the flow randomness (tests, reproducible evaluation): ``noise`` (B, H, A),
        ``time`` (B,), ``frame_noise`` (B, 3, s, s), ``frame_time`` (B,; ignored with ``frame: condition``).
        """
        cfg = self.cfg
        check_batch(cfg, batch, training=True)
        actions = batch["actions"]  # (B, H, A)
        b, dev = actions.shape[0], actions.device
        segs, words = self.teacher_forced_context(batch)
        t = batch["time"] if "time" in batch else sample_time(b, dev)  # (B,)
        state_seg = len(segs)

        def blurred_goal() -> torch.Tensor | None:  # teacher forcing: the true goal, noised so the image still matters
            if not cfg.goal_condition:
                return None
            return batch["goal_state"] + cfg.goal_condition_noise * torch.randn_like(batch["goal_state"])

        targets = []  # flow: the velocity target of each noisy copy of the chunk
        if cfg.action_head == "flow":
            noise = batch["noise"] if "noise" in batch else torch.randn_like(actions)
            x_t, u = interpolate(actions, noise, t)  # (B, H, A) x2
            segs += [self.embed_state(batch["state"], blurred_goal()), self.embed_actions(x_t, t)]
            targets.append(u)
            for k in range(1, cfg.flow_samples):  # more noisy copies of the same chunk: each its own block,
                t_k = sample_time(b, dev)  # which sees what the first sees (prefix, state) but no other copy
                x_k, u_k = interpolate(actions, torch.randn_like(actions), t_k)
                segs.append(replace(self.embed_actions(x_k, t_k), block=FRAME + k))
                targets.append(u_k)
            action_segs = list(range(len(segs) - cfg.flow_samples, len(segs)))
        else:
            if cfg.goal_condition:
                segs.append(self.embed_goal(blurred_goal()))
            target = self.tok.actions_to_tokens(actions).reshape(b, -1)  # (B, H*A)
            sep = torch.full((b, 1), self.tok.sep_id, dtype=torch.long, device=dev)
            segs.append(self.embed_discrete_actions(torch.cat([sep, target[:, :-1]], 1)))  # (B, H*A)
            action_segs = [len(segs) - 1]
        if cfg.frame != "off":
            fx = patchify(batch["future_frame"], cfg.patch_size)  # (B, P, 3pp)
            t_f = t if cfg.frame == "condition" else batch.get("frame_time", None)
            t_f = sample_time(b, dev) if t_f is None else t_f
            f_noise = patchify(batch["frame_noise"], cfg.patch_size) if "frame_noise" in batch else torch.randn_like(fx)
            fx_t, fu = interpolate(fx, f_noise, t_f)
            segs.append(self.embed_frame(fx_t, t_f))
        outs, n_plan = self._run_training(segs)
        zero = actions.new_zeros(())
        losses = {"plan_loss": zero, "action_loss": zero, "frame_loss": zero}
        if cfg.goal_loss_weight > 0:
            if "goal_state" not in batch:
                raise ValueError(f"VLA.compute_loss: goal_loss_weight={cfg.goal_loss_weight} needs batch['goal_state'] "
                                 f"(B, state_dim={cfg.state_dim}), normalized like the state; got keys {sorted(batch)}")
            goal = self.goal_readout(outs, state_seg)  # (B, S)
            losses["goal_loss"] = (goal - batch["goal_state"]).pow(2).mean()
        if cfg.goal_patch_loss_weight > 0:  # which patch holds the goal: asked of every patch at once
            if "goal_pixel" not in batch:
                raise ValueError(f"VLA.compute_loss: goal_patch_loss_weight={cfg.goal_patch_loss_weight} needs "
                                 f"batch['goal_pixel'] (B, 2), the goal's (column, row) in the first camera "
                                 f"(training_batch gives it once Processor.goal_camera is set, as the training "
                                 f"loop does); got keys {sorted(batch)}")
            patch = self.goal_patch_target(batch["goal_pixel"])  # (B,)
            ce = F.cross_entropy(self.goal_scores(outs[0]), patch, ignore_index=-100, reduction="sum")
            losses["goal_patch_loss"] = ce / (patch >= 0).sum().clamp_min(1)
            if cfg.goal_offset:  # the offset predicted by the goal's own patch, against where the goal lies in it
                rows = (patch >= 0).nonzero()[:, 0]  # (K,)
                off = self.goal_offsets(outs[0])[rows, patch[rows]]  # (K, 2)
                err = (off - self.goal_offset_target(batch["goal_pixel"], patch)[rows].to(off)).abs().sum(-1)  # (K,)
                losses["goal_offset_loss"] = err.sum() / rows.numel() if rows.numel() else off.sum() * 0.0
        if cfg.planner:  # on the first n_plan rows (all, unless plan_rows says fewer)
            words = None if words is None else tuple(w[:n_plan] for w in words)
            logits = self.plan_logits(outs[1][:, :-1], words)  # (n_plan, Lp-1, V)
            m = batch["plan_mask"][:n_plan, 1:]
            plan_target = batch["plan_tokens"][:n_plan, 1:].masked_fill(~m, -100)  # padding: word plans score it -inf
            ce = F.cross_entropy(logits.transpose(1, 2), plan_target, reduction="none", ignore_index=-100)  # (B, Lp-1)
            m = m.float()
            losses["plan_loss"] = (ce * m).sum() / m.sum().clamp_min(1)
        step_ok = (~batch["action_is_pad"]).float()  # (B, H)
        if cfg.action_head == "flow":  # the mean over the noisy copies
            err = sum((self.action["out"](outs[i]) - u_k).pow(2).mean(-1)
                      for i, u_k in zip(action_segs, targets)) / len(targets)  # (B, H)
        else:
            logits = self.lm_logits(outs[action_segs[0]])  # (B, H*A, V)
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, H*A)
            err = ce.view(b, cfg.horizon, cfg.action_dim).mean(-1)  # (B, H)
        losses["action_loss"] = (err * step_ok).sum() / step_ok.sum().clamp_min(1)
        if per_sample:
            losses["action_loss_per_sample"] = ((err * step_ok).sum(1) / step_ok.sum(1).clamp_min(1)).detach()  # (B,)
        if cfg.frame != "off":
            ferr = (self.frame["out"](outs[-1]) - fu).pow(2).mean((1, 2))  # (B,)
            ok = (~batch["future_is_pad"]).float()  # (B,)
            losses["frame_loss"] = (ferr * ok).sum() / ok.sum().clamp_min(1)
        losses["loss"] = (cfg.plan_loss_weight * losses["plan_loss"] + losses["action_loss"]
                          + cfg.frame_loss_weight * losses["frame_loss"])
        if cfg.goal_loss_weight > 0:
            losses["loss"] = losses["loss"] + cfg.goal_loss_weight * losses["goal_loss"]
        if cfg.goal_patch_loss_weight > 0:
            losses["loss"] = losses["loss"] + cfg.goal_patch_loss_weight * losses["goal_patch_loss"]
        if cfg.goal_offset:
            losses["loss"] = losses["loss"] + cfg.goal_patch_loss_weight * losses["goal_offset_loss"]
        return losses

    # ------------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def sample(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None, decode_plan: bool = True,
               use_cache: bool = True, num_steps: int | None = None,
               frame_noise: torch.Tensor | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """Plan text, an action chunk (normalized) and optionally the future frame for a batch of observations.

        A plan given in the batch (``plan_tokens``/``plan_mask``, e.g. a known plan) is used as is;
        otherwise, with the planner on, it is decoded greedily when ``decode_plan``.
        ``use_cache=False`` recomputes the whole sequence at every step (same results; the reference
        for tests). With the cache, everything known before the Euler steps (prefix, a given plan,
        state) runs in one call, and the steps reuse one attention mask, one set of rotary tables and
        the flow-time modulations of every step computed together (`_integrate`).
        ``timings`` (a dict) receives the seconds spent in "prefix_s", "plan_s", "actions_s", "frame_s"
        (with the cache and a given plan, the plan and state tokens run with the prefix: "prefix_s").
        Runs under ``torch.inference_mode`` (cheaper per op than ``no_grad``): the returned tensors
        are inference tensors (read them freely; clone before modifying them in place outside it).
        """
        check_batch(self.cfg, batch, training=False)
        clock = _Clock(timings, batch["images"].device)
        if not use_cache:
            return self._sample_uncached(batch, noise, decode_plan, num_steps, frame_noise, clock)
        cfg, tok = self.cfg, self.tok
        steps = num_steps or cfg.flow_steps
        b, dev = batch["images"].shape[0], batch["images"].device
        prefix = self.embed_prefix(batch)
        prefix_out = None  # the prefix's outputs, once run (the point goal head reads them)
        words = None
        if cfg.planner and self.plan_vocab is not None:
            n_img = cfg.num_image_tokens
            words = self.instruction_words(batch, prefix.x[:, n_img:n_img + batch["instruction_tokens"].shape[1]])
        # room in the KV buffers for every token run after the prefix: plan, state, actions, frame
        n_frame = (cfg.frame_size // cfg.patch_size) ** 2 if cfg.frame != "off" else 0
        reserve = cfg.max_plan_tokens + 2 + max(cfg.horizon * cfg.action_dim + 1, cfg.horizon + n_frame)
        pending, cache = [prefix], None  # segments not run yet: run together, in one call
        plan_tokens = None
        if cfg.planner:
            if "plan_tokens" in batch:
                plan_tokens = batch["plan_tokens"]
                pending.append(self.embed_plan(plan_tokens, batch["plan_mask"], words))
            elif decode_plan:  # word plans: the instructions spell the copy slots for the decoding rules
                texts = None if self.plan_vocab is None else self._instruction_texts(batch, b)
                outs, cache = self._run(pending, keep_kv=True, reserve=reserve)
                prefix_out, pending = outs[0], []
                clock.lap("prefix_s")
                plan_tokens, _, cache = self._decode([prefix], cache, PLAN, cfg.max_plan_tokens,
                                                     self.plan_tok.plan_id, b, words=words, texts=texts)
                clock.lap("plan_s")
            else:
                raise ValueError("VLA.sample: the planner is on but the batch has no 'plan_tokens' "
                                 "and decode_plan=False")
        out = self._plan_output(batch, plan_tokens, b)
        goal = None
        if cfg.goal_condition:  # the goal head reads the prefix: run it before the state (or goal) token
            if pending:
                outs, cache = self._run(pending, cache, keep_kv=True, reserve=reserve)
                prefix_out, pending = outs[0], []
            goal = out["goal"] = self.goal_from_prefix(prefix_out)  # (B, S), normalized
        if cfg.action_head == "flow":
            pending.append(self.embed_state(batch["state"], goal))
        elif goal is not None:
            pending.append(self.embed_goal(goal))
        if pending:
            cache = self._run(pending, cache, keep_kv=True, reserve=reserve)[1]
            clock.lap("prefix_s")
        if cfg.action_head == "discrete":
            n = cfg.horizon * cfg.action_dim
            ids, _, _ = self._decode([prefix], cache, ACTION, n + 1, tok.sep_id, b, keep_last=False)
            out["actions"] = tok.tokens_to_actions(ids[:, 1:]).view(b, cfg.horizon, cfg.action_dim)
            clock.lap("actions_s")
        else:
            ha = (cfg.horizon, cfg.action_dim)
            noise = torch.randn(b, *ha, device=dev) if noise is None else noise
            if noise.shape != (b, *ha):
                raise ValueError(f"VLA.sample: noise must have shape {(b, *ha)}, got {tuple(noise.shape)}")
            if cfg.frame == "condition":  # actions and frame share one flow time: integrated jointly
                fnoise = self._frame_noise(frame_noise, b, dev)  # (B, P, 3pp)
                out["actions"], frame = self._integrate(cache, {"action": noise, "frame": fnoise}, steps)
                out["frame"] = self._frame_image(frame)
            else:
                (out["actions"],) = self._integrate(cache, {"action": noise}, steps)
            clock.lap("actions_s")
        if cfg.frame == "aux":  # the frame block never sees the actions: its own integration
            (frame,) = self._integrate(cache, {"frame": self._frame_noise(frame_noise, b, dev)}, steps)
            out["frame"] = self._frame_image(frame)
        clock.lap("frame_s")
        return out

    def _plan_output(self, batch: Mapping[str, Any], plan_tokens: torch.Tensor | None, b: int) -> dict[str, Any]:
        out: dict[str, Any] = {"plan_tokens": plan_tokens, "frame": None, "plan_text": [""] * b}
        if plan_tokens is not None and self.plan_vocab is None:
            out["plan_text"] = [self.tok.decode(r[1:]) for r in plan_tokens]
        elif plan_tokens is not None:  # copies read the instruction's words
            texts = self._instruction_texts(batch, b)
            out["plan_text"] = [self.plan_vocab.decode(r, s) for r, s in zip(plan_tokens, texts)]
        return out

    def _step_mods(self, expert: Expert, cond: torch.Tensor) -> list:
        """One expert's adaptive-norm modulations for every Euler step, from one matmul.

        ``cond`` (S, W) is the time conditioning of the S steps (one row per step: every sample of a
        batch is at the same flow time). Returns per step a list over layers and norms (attention norm
        of layer 0, MLP norm of layer 0, ...) of ``(scale1, shift, gate1)``, each (W,), with
        scale1 = 1 + scale and gate1 = 1 + gate as `AdaRMSNorm.forward` makes them; per step None for a
        plain (dense) expert.
        """
        steps = cond.shape[0]
        if not expert.adaptive:
            return [None] * steps
        norms = [n for layer in expert.layers for n in (layer.attn_norm, layer.mlp_norm)]
        mod = F.linear(cond, torch.cat([n.mod.weight for n in norms]), torch.cat([n.mod.bias for n in norms]))
        mod = mod.view(steps, len(norms), 3, -1)  # (S, 2L, scale|shift|gate, W)
        mod = torch.stack([1 + mod[:, :, 0], mod[:, :, 1], 1 + mod[:, :, 2]], 2)
        return [[tuple(n.unbind(0)) for n in step.unbind(0)] for step in mod.unbind(0)]

    def _integrate(self, cache: KVCache, noise: dict[str, torch.Tensor], steps: int) -> list[torch.Tensor]:
        """Euler-integrate the action and/or frame block (keys of ``noise``: "action" (B, H, A), "frame"
        (B, P, 3pp)) from t=1 to t=0 against the cached context; returns the blocks in that order.

        The same steps as `vla.flow.euler_integrate` (times ``1 + i * dt``, ``x += dt * v``) through the
        same layers as `_run`, called as functions rather than modules; what does not depend on x is
        built once per call instead of once per step: the layout (mask, rotary tables), and the time
        MLP and adaptive-norm modulations of all steps in one batch (`_step_mods`). Keys and values
        of the block are written after the cache's last token (scratch; the cache is unchanged).
        With CUDA graphs on (`use_cuda_graphs`), the step loop is replayed from a captured graph.
        """
        cfg = self.cfg
        kinds = list(noise)
        dev = noise[kinds[0]].device
        t = torch.tensor([1.0 + i * (-1.0 / steps) for i in range(steps)], device=dev)  # (S,), as euler_integrate's
        block = {"action": ACTION, "frame": FRAME}
        ones = {k: torch.ones(noise[k].shape[:2], dtype=torch.bool, device=dev) for k in kinds}
        segs = [Segment(k, noise[k].new_zeros(*noise[k].shape[:2], 1), block[k], False, ones[k]) for k in kinds]
        lay = self._layout(segs, cache, drop_full_mask=True)
        n_new, base, store = sum(lay.sizes), cache.n, cache.store
        if self.flow_graphs is not None and (dev.type == "cuda" or not self.flow_graphs.capture):
            return self.flow_graphs.run(self, noise, t, lay, store, base, n_new)
        if store.filled > base or base + n_new > store.capacity:  # scratch room after the cache: copy it out
            store = _KVStore.allocate(store.k[0], cfg.n_layers, base + n_new, base, store)
        return self._flow_loop(noise, t, lay, store, base, n_new)

    def _flow_loop(self, noise: dict[str, torch.Tensor], t: torch.Tensor, lay: _Layout, store: _KVStore,
                   base: int, n_new: int) -> list[torch.Tensor]:
        """`_integrate`'s Euler steps at times ``t`` (S,): device work only (no host sync), so that a CUDA
        graph can capture it. ``store`` has the context's keys/values in its first ``base`` slots and
        room for the ``n_new`` block tokens after them."""
        cfg = self.cfg
        kinds = list(noise)
        b, steps = noise[kinds[0]].shape[0], t.shape[0]
        dt = -1.0 / steps
        # consecutive blocks of one expert run as one group (dense: action + frame share the vlm's)
        groups: list[tuple[Expert, list[str]]] = []
        for k in kinds:
            e = self.expert(k)
            if groups and groups[-1][0] is e:
                groups[-1][1].append(k)
            else:
                groups.append((e, [k]))
        conds = {k: getattr(self, k)["time"](t) for k in kinds}  # (S, W) per block
        mods = [self._step_mods(e, conds[ks[0]]) for e, ks in groups]  # a group's blocks share t
        nh, hd = cfg.n_heads, cfg.head_dim
        x = dict(noise)
        for i in range(steps):
            xs = []
            for e, ks in groups:
                parts = []
                for k in ks:
                    if k == "action":
                        h = self.action["inp"](x[k])  # (B, H, Wa), as embed_actions
                    else:
                        h = self.frame["inp"](x[k]) + self.frame["pos"].weight[None]  # (B, P, Wf), as embed_frame
                    h = h.float()  # fp32 residual stream under autocast, as in _run
                    parts.append(h if e.adaptive else h + conds[k][i])  # dense: time joins the tokens, as in _run
                xs.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))  # (B, n_g, W)
            for li in range(cfg.n_layers):
                qkv = []
                for (e, _), xg, m in zip(groups, xs, mods):
                    layer = e.layers[li]
                    h = norm_fn(xg, layer.attn_norm, None if m[i] is None else m[i][2 * li])
                    qkv.append(F.linear(h, layer.qkv.weight).view(b, -1, 3, nh, hd))  # (B, n_g, 3, H, hd)
                qkv = (qkv[0] if len(qkv) == 1 else torch.cat(qkv, 1)).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
                qk = rope_fast(qkv[:2], lay.cos, lay.sin)
                k_buf, v_buf = store.k[li], store.v[li]
                k_buf[:, :, base:base + n_new] = qk[1]
                v_buf[:, :, base:base + n_new] = qkv[2]
                att = attention(qk[0], k_buf[:, :, :base + n_new], v_buf[:, :, :base + n_new], lay.mask)
                att = att.transpose(1, 2).reshape(b, n_new, nh * hd)
                att = [att] if len(xs) == 1 else att.split([xg.shape[1] for xg in xs], 1)
                for j, ((e, _), a, m) in enumerate(zip(groups, att, mods)):
                    layer = e.layers[li]
                    o = F.linear(a, layer.out.weight)  # (B, n_g, W)
                    xs[j] = xs[j] + o if m[i] is None else torch.addcmul(xs[j], o, m[i][2 * li][2])  # gated
                    o = mlp_fn(layer, norm_fn(xs[j], layer.mlp_norm, None if m[i] is None else m[i][2 * li + 1]))
                    xs[j] = xs[j] + o if m[i] is None else torch.addcmul(xs[j], o, m[i][2 * li + 1][2])
            for (e, ks), xg in zip(groups, xs):
                outs = norm_fn(xg, e.final_norm)
                outs = [outs] if len(ks) == 1 else outs.split([noise[k].shape[1] for k in ks], 1)
                for k, o in zip(ks, outs):
                    x[k] = x[k] + dt * getattr(self, k)["out"](o)
        return [x[k] for k in kinds]

    def _sample_uncached(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None, decode_plan: bool,
                         num_steps: int | None, frame_noise: torch.Tensor | None, clock: _Clock) -> dict[str, Any]:
        """`sample` without a KV cache: the whole sequence recomputed for every plan token and every
        flow step, each step through the generic `vla.flow.euler_integrate` (the reference)."""
        cfg, tok = self.cfg, self.tok
        steps = num_steps or cfg.flow_steps
        b, dev = batch["images"].shape[0], batch["images"].device
        ctx = [self.embed_prefix(batch)]
        words = None
        if cfg.planner and self.plan_vocab is not None:
            n_img = cfg.num_image_tokens
            words = self.instruction_words(batch, ctx[0].x[:, n_img:n_img + batch["instruction_tokens"].shape[1]])
        clock.lap("prefix_s")
        plan_tokens = None
        if cfg.planner:
            if "plan_tokens" in batch:
                plan_tokens, plan_mask = batch["plan_tokens"], batch["plan_mask"]
                ctx.append(self.embed_plan(plan_tokens, plan_mask, words))
            elif decode_plan:  # word plans: the instructions spell the copy slots for the decoding rules
                texts = None if self.plan_vocab is None else self._instruction_texts(batch, b)
                plan_tokens, plan_mask, _ = self._decode(ctx, None, PLAN, cfg.max_plan_tokens,
                                                         self.plan_tok.plan_id, b, words=words, texts=texts)
                ctx.append(self.embed_plan(plan_tokens, plan_mask, words))
            else:
                raise ValueError("VLA.sample: the planner is on but the batch has no 'plan_tokens' "
                                 "and decode_plan=False")
        clock.lap("plan_s")
        out = self._plan_output(batch, plan_tokens, b)
        goal = None
        if cfg.goal_condition:
            goal = out["goal"] = self.goal_from_prefix(self._run(ctx[:1])[0][0])  # (B, S)
        if cfg.action_head == "discrete":
            if goal is not None:
                ctx.append(self.embed_goal(goal))
            n = cfg.horizon * cfg.action_dim
            ids, _, _ = self._decode(ctx, None, ACTION, n + 1, tok.sep_id, b, keep_last=False)
            out["actions"] = tok.tokens_to_actions(ids[:, 1:]).view(b, cfg.horizon, cfg.action_dim)
        else:
            ctx.append(self.embed_state(batch["state"], goal))
            ha = (cfg.horizon, cfg.action_dim)
            noise = torch.randn(b, *ha, device=dev) if noise is None else noise
            if noise.shape != (b, *ha):
                raise ValueError(f"VLA.sample: noise must have shape {(b, *ha)}, got {tuple(noise.shape)}")
            joint = cfg.frame == "condition"
            if joint:
                fnoise = self._frame_noise(frame_noise, b, dev)  # (B, P, 3pp)
                fshape = fnoise.shape
                noise = torch.cat([noise.reshape(b, -1), fnoise.reshape(b, -1)], 1)  # (B, H*A + P*3pp)

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                segs = [self.embed_actions(x[:, : ha[0] * ha[1]].view(b, *ha), t)]
                if joint:
                    segs.append(self.embed_frame(x[:, ha[0] * ha[1]:].view(fshape), t))
                o = self._run(ctx + segs)[0][len(ctx):]
                v = self.action["out"](o[0]).reshape(b, -1)  # (B, H*A)
                return torch.cat([v, self.frame["out"](o[1]).reshape(b, -1)], 1) if joint else v.view(b, *ha)

            x = euler_integrate(velocity, noise, steps)
            out["actions"] = x[:, : ha[0] * ha[1]].reshape(b, *ha) if joint else x
            if joint:
                out["frame"] = self._frame_image(x[:, ha[0] * ha[1]:].view(fshape))
        clock.lap("actions_s")
        if cfg.frame == "aux":
            fnoise = self._frame_noise(frame_noise, b, dev)  # (B, P, 3pp)

            def frame_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                seg = [self.embed_frame(x, t)]
                return self.frame["out"](self._run(ctx + seg)[0][len(ctx):][0])  # (B, P, 3pp)

            out["frame"] = self._frame_image(euler_integrate(frame_velocity, fnoise, steps))
        clock.lap("frame_s")
        return out

    @staticmethod
    def _instruction_texts(batch: Mapping[str, Any], b: int) -> list[str]:
        texts = batch.get("instruction_text")
        if texts is None or len(texts) != b:
            raise ValueError("VLA.sample: word plans need the batch's 'instruction_text' (a list of the "
                             "B instruction strings) to spell copied words; build batches with vla.processor")
        return list(texts)

    def _frame_noise(self, frame_noise: torch.Tensor | None, b: int, dev: torch.device) -> torch.Tensor:
        """Frame noise as patches (B, P, 3pp): drawn, or the caller's (B, 3, s, s) image-shaped noise."""
        s, p = self.cfg.frame_size, self.cfg.patch_size
        if frame_noise is None:
            return torch.randn(b, (s // p) ** 2, 3 * p * p, device=dev)
        if tuple(frame_noise.shape) != (b, 3, s, s):
            raise ValueError(f"VLA.sample: frame_noise must have shape {(b, 3, s, s)}, got {tuple(frame_noise.shape)}")
        return patchify(frame_noise, p)

    def _frame_image(self, patches: torch.Tensor) -> torch.Tensor:
        s = self.cfg.frame_size
        return unpatchify(patches, self.cfg.patch_size, s, s).clamp(-1, 1)  # (B, 3, s, s)

    def _decode(self, ctx: list[Segment], cache: KVCache | None, block: int, max_len: int, first: int, b: int,
                keep_last: bool = True, words: tuple[torch.Tensor, torch.Tensor] | None = None,
                texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, KVCache | None]:
        """Greedy causal decoding of a vlm block (plan or discrete actions) after ``ctx``/``cache``.

        The plan stops per sample at <eos> (later tokens are padding); a plan that has not stopped by
        its last position (token ``max_len``) gets <eos> there, so every plan ends with <eos> within
        ``max_len`` tokens. Word plans (``texts``: the B instructions, which spell the copy slots) also
        obey `vla.tokenizer.banned_next_words` (no repeated word or bigram within a subtask, no empty
        or immediately repeated subtask) and, when the config has the store's subtask labels, the plan
        grammar (`vla.tokenizer.PlanGrammar`; docs/text.md "Decoding rules"). Every decode path (`vla plan`,
        the policy, the server) runs through here. Action-bin decoding always emits ``max_len - 1``
        bins. Returns ids (B, L), mask (B, L) and the extended cache.
        """
        dev = ctx[0].x.device
        tok = self.plan_tok if block == PLAN else self.tok
        words_plan = block == PLAN and self.plan_vocab is not None
        allowed = torch.ones(tok.vocab_size, dtype=torch.bool, device=dev)  # words: plan_logits masks itself
        if block == PLAN and not words_plan:
            allowed[:] = False
            allowed[:256] = True
            allowed[tok.eos_id] = True
        elif block != PLAN:
            allowed[:] = False
            allowed[tok.action_offset:] = True

        def embed(ids: torch.Tensor, ok: torch.Tensor) -> Segment:
            if words_plan:
                return self.embed_plan(ids, ok, words)
            return Segment("vlm", self.vlm["embed"](ids), block, True, ok)

        rules = None
        if words_plan:
            if texts is None or len(texts) != b:
                raise ValueError("VLA._decode: word plans need the B instruction texts (they spell the copy slots)")
            rules = [PlanRules(self.plan_vocab, t, grammar=self.plan_grammar) for t in texts]
        ids = [torch.full((b, 1), first, dtype=torch.long, device=dev)]
        valid = [torch.ones(b, 1, dtype=torch.bool, device=dev)]
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        rows: list[list[int]] = [[] for _ in range(b)]  # plan tokens emitted so far (word-plan rules)
        stepper = self._token_stepper(cache, block, max_len) if cache is not None else None
        for step in range(max_len):
            last = step == max_len - 1 or bool(done.all())
            if last and not keep_last:
                break
            seg = embed(ids[-1], valid[-1])
            if stepper is not None:
                h = stepper.run(seg.x, valid[-1][:, 0])  # (B, D)
            elif cache is not None:
                h, cache = self._run([seg], cache, keep_kv=True)
                h = h[0][:, -1]  # (B, D)
            else:
                all_ids, all_valid = torch.cat(ids, 1), torch.cat(valid, 1)
                full = embed(all_ids, all_valid)
                h = self._run(ctx + [full])[0][-1][:, -1]  # (B, D)
            if last:
                break
            logits = (self.plan_logits(h[:, None], words)[:, 0] if words_plan
                      else self.lm_logits(h)).masked_fill(~allowed, float("-inf"))  # (B, V)
            if rules is not None:
                ban = torch.zeros_like(logits, dtype=torch.bool)  # (B, V)
                for r, (rule, row) in enumerate(zip(rules, rows)):
                    ban[r, rule.banned_ids(row)] = True
                logits = logits.masked_fill(ban, float("-inf"))
            nxt = logits.argmax(-1)  # (B,)
            if block == PLAN:  # forced <eos>: at the last position, or when every token is blocked
                stuck = ~torch.isfinite(logits).any(-1)
                nxt = torch.where(stuck | (step == max_len - 2), tok.eos_id, nxt)
            nxt = torch.where(done, tok.pad_id, nxt)  # (B,)
            if rules is not None:
                for r, i in enumerate(nxt.tolist()):
                    rows[r].append(i)
            valid.append(~done[:, None])
            ids.append(nxt[:, None])
            if block == PLAN:
                done = done | (nxt == tok.eos_id)
        if stepper is not None:
            cache = stepper.cache()
        return torch.cat(ids, 1), torch.cat(valid, 1), cache

    def _token_stepper(self, cache: KVCache, block: int, max_len: int) -> _TokenStepper | None:
        """The one-token-at-a-time runner of `_decode` (None: use `_run` per token), see `_TokenStepper`."""
        if not bool(self.sees[block][cache.block].all()):  # a cached token this block may not see
            return None
        return _TokenStepper(self, cache, block, max_len)
