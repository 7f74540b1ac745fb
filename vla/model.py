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

(``frame: condition`` also lets ACTION see FRAME; then actions and frame share one flow time and
are integrated jointly.) With ``action_head: discrete`` the state token joins the prefix and the
ACTION block is ``<sep>`` + H*A action-bin tokens decoded causally by the vlm expert (RT-2 style).

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vla.attention import default_visibility, make_attn_mask, token_positions
from vla.flow import euler_integrate, interpolate, sample_time, time_embedding
from vla.model_config import VLAConfig, check_batch, conv_strides
from vla.tokenizer import ByteTokenizer, PlanRules, PlanVocab

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

    def __init__(self, width: int, n_heads: int, head_dim: int, mlp_ratio: float, adaptive: bool) -> None:
        super().__init__()
        norm = AdaRMSNorm if adaptive else RMSNorm
        self.attn_norm, self.mlp_norm = norm(width), norm(width)
        self.qkv = nn.Linear(width, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, width, bias=False)
        hidden = int(mlp_ratio * width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, width, bias=False))


class Expert(nn.Module):
    def __init__(self, cfg: VLAConfig, width: int, adaptive: bool) -> None:
        super().__init__()
        self.width, self.adaptive = width, adaptive
        self.layers = nn.ModuleList(ExpertLayer(width, cfg.n_heads, cfg.head_dim, cfg.mlp_ratio, adaptive)
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
    """Rotate x (B, H, N, hd) by the angles of `rope_angles`."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, N, hd)


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
                 coords: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.films = nn.ModuleList() if film else None
        self.coords = coords
        c_in = 5 if coords else 3
        for i, s in enumerate(strides):
            c_out = min(base * 2 ** i, width)
            # No normalization over the image (GroupNorm/BatchNorm): a token must depend on its own
            # neighbourhood only, as a patch embedding does.
            self.convs.append(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1 if s == 2 else 0))
            if self.films is not None:
                self.films.append(nn.Linear(width, 2 * c_out))
            c_in = c_out
        self.out = nn.Conv2d(c_in, width, 1)

    def forward(self, img: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = img  # (N, 3, H, W)
        if self.coords:
            n, _, h, w = img.shape
            ys = torch.linspace(-1, 1, h, device=img.device, dtype=img.dtype)[:, None].expand(h, w)
            xs = torch.linspace(-1, 1, w, device=img.device, dtype=img.dtype)[None, :].expand(h, w)
            x = torch.cat([img, torch.stack([xs, ys]).expand(n, 2, h, w)], 1)  # (N, 5, H, W)
        for i, conv in enumerate(self.convs):
            x = conv(x)  # (N, C, h, w)
            if self.films is not None and cond is not None:
                scale, shift = self.films[i](cond).chunk(2, dim=-1)  # (N, C) x2
                x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
            x = F.gelu(x, approximate="tanh")
        return self.out(x).flatten(2).transpose(1, 2)  # (N, Np, D)


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


@dataclass
class KVCache:
    """Per-layer keys/values (B, H, Nc, hd) of tokens already run, plus their mask metadata."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block: torch.Tensor  # (Nc,)
    causal: torch.Tensor  # (Nc,)
    valid: torch.Tensor  # (B, Nc)
    is_vlm: torch.Tensor  # (Nc,)


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


# ----------------------------------------------------------------------------------------------- model
class VLA(nn.Module):
    """Parameters live in three groups: ``vlm`` (patches, text, plan head, trunk), ``action``, ``frame``."""

    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = ByteTokenizer(cfg.action_bins)
        d, p = cfg.d_model, cfg.patch_size
        dense = cfg.experts == "dense"
        h, w = cfg.image_hw
        self.vlm = nn.ModuleDict({
            "patch": (nn.Linear(3 * p * p, d) if cfg.vision == "patch"
                      else ConvStem(conv_strides(p), d, film=cfg.vision_film, coords=cfg.vision_coords)),
            "patch_pos": nn.Embedding((h // p) * (w // p), d),  # 2D position of a patch in its view
            "view": nn.Embedding(cfg.num_views, d),  # camera x history step
            "embed": nn.Embedding(self.tok.vocab_size, d),  # tied with the LM head
            "expert": Expert(cfg, d, adaptive=False),
        })
        state_in = cfg.state_dim * cfg.n_obs_steps
        if cfg.action_head == "discrete":
            self.vlm["state"] = nn.Linear(state_in, d)
        else:
            wa = d if dense else cfg.action_width
            self.action = nn.ModuleDict({"state": nn.Linear(state_in, wa), "inp": nn.Linear(cfg.action_dim, wa),
                                         "time": TimeMLP(wa), "out": nn.Linear(wa, cfg.action_dim)})
            if not dense:
                self.action["expert"] = Expert(cfg, wa, adaptive=True)
        if cfg.frame != "off":
            wf, pf = (d if dense else cfg.frame_width), (cfg.frame_size // p) ** 2
            self.frame = nn.ModuleDict({"inp": nn.Linear(3 * p * p, wf), "pos": nn.Embedding(pf, wf),
                                        "time": TimeMLP(wf), "out": nn.Linear(wf, 3 * p * p)})
            if not dense:
                self.frame["expert"] = Expert(cfg, wf, adaptive=True)
        sees = default_visibility(5)
        sees[FRAME, ACTION] = False  # the frame never reads the noisy actions
        sees[ACTION, FRAME] = cfg.frame == "condition"
        self.register_buffer("sees", sees, persistent=False)
        self.plan_vocab = PlanVocab(cfg.plan_words, cfg.copy_slots) if cfg.plan_vocab == "words" else None
        if self.plan_vocab is not None:  # word plans: own embedding (tied with their head) + copy pointer query
            self.vlm["plan_embed"] = nn.Embedding(self.plan_vocab.vocab_size, d)
            self.vlm["copy_query"] = nn.Linear(d, d, bias=False)
        if cfg.text == "minilm":
            from vla.text_encoder import MINILM

            self.vlm["text_proj"] = nn.Linear(MINILM["hidden_size"], d)  # per-token states -> vlm width
        self.apply(self._init_weights)
        if cfg.text == "minilm":  # after _init_weights, which would overwrite the pretrained weights
            from vla.text_encoder import BertEncoder

            self.vlm["text_encoder"] = BertEncoder().load_pretrained().requires_grad_(cfg.text_finetune)
        self._text_memo: dict[tuple, torch.Tensor] = {}  # frozen encoder: token ids -> states (see encode_instruction)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._text_memo.clear()  # new encoder weights: memoized states are stale
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
        h = tokens.new_zeros(*tokens.shape, enc.width, dtype=torch.float32)  # (B, Li, 384)
        lengths = mask.sum(1).tolist()
        for k, n in enumerate(lengths):
            key = (str(tokens.device), *tokens[k, :n].tolist())
            if key not in self._text_memo:
                if len(self._text_memo) >= 4096:  # bounded: a server may see many texts
                    self._text_memo.clear()
                with torch.no_grad():
                    self._text_memo[key] = enc(tokens[k:k + 1, :n], mask[k:k + 1, :n])[0]  # (n, 384)
            h[k, :n] = self._text_memo[key]
        return v["text_proj"](h)  # (B, Li, D)

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
            parts.append(v["state"](batch["state"])[:, None])  # (B, 1, D)
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

    def embed_state(self, state: torch.Tensor) -> Segment:
        x = self.action["state"](state)[:, None]  # (B, 1, Wa); no time cond, so it can be cached
        return Segment("action", x, STATE, False, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

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
    def _run(self, segs: list[Segment], cache: KVCache | None = None,
             keep_kv: bool = False) -> tuple[list[torch.Tensor], KVCache | None]:
        """Run segments (optionally after cached tokens) through all layers; outputs per segment, final-normed."""
        cfg = self.cfg
        dev = segs[0].x.device
        b = segs[0].x.shape[0]
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
        mask = make_attn_mask(block, causal, valid_all, self.sees, num_queries=valid.shape[1])[:, None]  # (B,1,N,Nk)
        pos = token_positions(block, valid_all, self.sees, num_queries=valid.shape[1])  # (B, N)
        cos, sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)  # (B, 1, N, hd/2) x2
        groups: list[tuple[Expert, list[int]]] = []  # consecutive segments that share an expert
        for i, s in enumerate(segs):
            e = self.expert(s.expert)
            if groups and groups[-1][0] is e:
                groups[-1][1].append(i)
            else:
                groups.append((e, [i]))
        xs, conds = [], []
        for e, idx in groups:
            xs.append(torch.cat([segs[i].x.float() if segs[i].cond is None or e.adaptive  # fp32 residual stream
                                 else segs[i].x.float() + segs[i].cond[:, None]  # dense: time joins the tokens
                                 for i in idx], 1))  # (B, n_g, W)
            if e.adaptive:
                conds.append(torch.cat([(segs[i].cond[:, None] if segs[i].cond is not None
                                         else segs[i].x.new_zeros(b, 1, e.width)).expand(-1, sizes[i], -1)
                                        for i in idx], 1))  # (B, n_g, W)
            else:
                conds.append(None)
        nh, hd = cfg.n_heads, cfg.head_dim
        new_k, new_v = [], []
        for li in range(cfg.n_layers):
            qkv, gates = [], []
            for (e, _), x, c in zip(groups, xs, conds):
                h, g = e.layers[li].attn_norm(x, c)
                qkv.append(e.layers[li].qkv(h).view(b, x.shape[1], 3, nh, hd))  # (B, n_g, 3, H, hd)
                gates.append(g)
            q, k, v = torch.cat(qkv, 1).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if cache is not None:
                k, v = torch.cat([cache.k[li], k], 2), torch.cat([cache.v[li], v], 2)  # (B, H, Nk, hd)
            if keep_kv:
                new_k.append(k)
                new_v.append(v)
            att = self._attend(q, k, v, mask, is_vlm, k_is_vlm)  # (B, H, N, hd)
            att = att.transpose(1, 2).reshape(b, -1, nh * hd).split([x.shape[1] for x in xs], 1)  # per group
            for j, ((e, _), a) in enumerate(zip(groups, att)):
                layer = e.layers[li]
                o = layer.out(a)  # (B, n_g, W)
                xs[j] = xs[j] + (o if gates[j] is None else gates[j] * o)
                h, g = layer.mlp_norm(xs[j], conds[j])
                o = layer.mlp(h)  # (B, n_g, W)
                xs[j] = xs[j] + (o if g is None else g * o)
        outs = []
        for (e, idx), x in zip(groups, xs):
            outs.extend(e.final_norm(x)[0].split([sizes[i] for i in idx], 1))
        new_cache = KVCache(new_k, new_v, block, causal, valid_all, k_is_vlm) if keep_kv else None
        return outs, new_cache

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                q_is_vlm: torch.Tensor, k_is_vlm: torch.Tensor) -> torch.Tensor:
        """Joint attention; with knowledge insulation non-vlm queries read vlm keys/values detached.

        On the CPU, bf16 inputs (autocast) are attended in fp32: the CPU's fused attention backward
        is ~3x slower in bf16 than in fp32 here, and fp32 is the more accurate of the two anyway.
        """
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            with torch.autocast("cpu", enabled=False):
                return self._attend(q.float(), k.float(), v.float(), mask, q_is_vlm, k_is_vlm).to(torch.bfloat16)
        if not self.cfg.knowledge_insulation or bool(q_is_vlm.all()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        sel = k_is_vlm[None, None, :, None]  # (1, 1, Nk, 1)
        kd, vd = torch.where(sel, k.detach(), k), torch.where(sel, v.detach(), v)  # stop-gradient into the vlm
        if not bool(q_is_vlm.any()):
            return F.scaled_dot_product_attention(q, kd, vd, attn_mask=mask)
        out = torch.empty_like(q)
        out[:, :, q_is_vlm] = F.scaled_dot_product_attention(q[:, :, q_is_vlm], k, v, attn_mask=mask[:, :, q_is_vlm])
        out[:, :, ~q_is_vlm] = F.scaled_dot_product_attention(q[:, :, ~q_is_vlm], kd, vd,
                                                               attn_mask=mask[:, :, ~q_is_vlm])
        return out

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.vlm["embed"].weight.T  # (B, n, vocab)

    # ------------------------------------------------------------------------------- training
    def compute_loss(self, batch: Mapping[str, torch.Tensor], per_sample: bool = False) -> dict[str, torch.Tensor]:
        """Losses of one batch from `Processor.training_batch`: loss, plan_loss, action_loss, frame_loss
        (scalars); ``per_sample`` adds ``action_loss_per_sample`` (B,), detached, for per-task metrics.

        Optional batch keys fix the flow randomness (tests, reproducible evaluation): ``noise`` (B, H, A),
        ``time`` (B,), ``frame_noise`` (B, 3, s, s), ``frame_time`` (B,; ignored with ``frame: condition``).
        """
        cfg = self.cfg
        check_batch(cfg, batch, training=True)
        actions = batch["actions"]  # (B, H, A)
        b, dev = actions.shape[0], actions.device
        segs = [self.embed_prefix(batch)]
        words = None
        if cfg.planner:
            if self.plan_vocab is not None:
                n_img = cfg.num_views * (cfg.image_hw[0] // cfg.patch_size) * (cfg.image_hw[1] // cfg.patch_size)
                n_text = batch["instruction_tokens"].shape[1]
                words = self.instruction_words(batch, segs[0].x[:, n_img:n_img + n_text])
            segs.append(self.embed_plan(batch["plan_tokens"], batch["plan_mask"], words))
        t = batch["time"] if "time" in batch else sample_time(b, dev)  # (B,)
        if cfg.action_head == "flow":
            noise = batch["noise"] if "noise" in batch else torch.randn_like(actions)
            x_t, u = interpolate(actions, noise, t)  # (B, H, A) x2
            segs += [self.embed_state(batch["state"]), self.embed_actions(x_t, t)]
        else:
            target = self.tok.actions_to_tokens(actions).reshape(b, -1)  # (B, H*A)
            sep = torch.full((b, 1), self.tok.sep_id, dtype=torch.long, device=dev)
            segs.append(self.embed_discrete_actions(torch.cat([sep, target[:, :-1]], 1)))  # (B, H*A)
        if cfg.frame != "off":
            fx = patchify(batch["future_frame"], cfg.patch_size)  # (B, P, 3pp)
            t_f = t if cfg.frame == "condition" else batch.get("frame_time", None)
            t_f = sample_time(b, dev) if t_f is None else t_f
            f_noise = patchify(batch["frame_noise"], cfg.patch_size) if "frame_noise" in batch else torch.randn_like(fx)
            fx_t, fu = interpolate(fx, f_noise, t_f)
            segs.append(self.embed_frame(fx_t, t_f))
        outs, _ = self._run(segs)
        zero = actions.new_zeros(())
        losses = {"plan_loss": zero, "action_loss": zero, "frame_loss": zero}
        if cfg.planner:
            logits = self.plan_logits(outs[1][:, :-1], words)  # (B, Lp-1, V)
            m = batch["plan_mask"][:, 1:]
            plan_target = batch["plan_tokens"][:, 1:].masked_fill(~m, -100)  # padding: word plans score it -inf
            ce = F.cross_entropy(logits.transpose(1, 2), plan_target, reduction="none", ignore_index=-100)  # (B, Lp-1)
            m = m.float()
            losses["plan_loss"] = (ce * m).sum() / m.sum().clamp_min(1)
        step_ok = (~batch["action_is_pad"]).float()  # (B, H)
        a_out = outs[-2] if cfg.frame != "off" else outs[-1]
        if cfg.action_head == "flow":
            err = (self.action["out"](a_out) - u).pow(2).mean(-1)  # (B, H)
        else:
            logits = self.lm_logits(a_out)  # (B, H*A, V)
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
        return losses

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def sample(self, batch: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None, decode_plan: bool = True,
               use_cache: bool = True, num_steps: int | None = None,
               frame_noise: torch.Tensor | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
        """Plan text, an action chunk (normalized) and optionally the future frame for a batch of observations.

        A plan given in the batch (``plan_tokens``/``plan_mask``, e.g. a known plan) is used as is;
        otherwise, with the planner on, it is decoded greedily when ``decode_plan``.
        ``use_cache=False`` recomputes the whole sequence at every step (same results; for tests).
        ``timings`` (a dict) receives the seconds spent in "prefix_s", "plan_s", "actions_s", "frame_s".
        """
        check_batch(self.cfg, batch, training=False)
        clock = _Clock(timings, batch["images"].device)
        cfg, tok = self.cfg, self.tok
        steps = num_steps or cfg.flow_steps
        b, dev = batch["images"].shape[0], batch["images"].device
        ctx = [self.embed_prefix(batch)]  # segments run so far (uncached) ...
        words = None
        if cfg.planner and self.plan_vocab is not None:
            n_img = cfg.num_views * (cfg.image_hw[0] // cfg.patch_size) * (cfg.image_hw[1] // cfg.patch_size)
            words = self.instruction_words(batch, ctx[0].x[:, n_img:n_img + batch["instruction_tokens"].shape[1]])
        cache = self._run(ctx, keep_kv=True)[1] if use_cache else None  # ... or their keys/values
        clock.lap("prefix_s")
        plan_tokens = None
        if cfg.planner:
            if "plan_tokens" in batch:
                plan_tokens, plan_mask = batch["plan_tokens"], batch["plan_mask"]
                seg = self.embed_plan(plan_tokens, plan_mask, words)
                cache = self._run([seg], cache, keep_kv=True)[1] if use_cache else cache
                ctx.append(seg)
            elif decode_plan:  # word plans: the instructions spell the copy slots for the decoding rules
                texts = None if self.plan_vocab is None else self._instruction_texts(batch, b)
                plan_tokens, plan_mask, cache = self._decode(ctx, cache, PLAN, cfg.max_plan_tokens,
                                                             self.plan_tok.plan_id, b, words=words, texts=texts)
                ctx.append(self.embed_plan(plan_tokens, plan_mask, words))
            else:
                raise ValueError("VLA.sample: the planner is on but the batch has no 'plan_tokens' "
                                 "and decode_plan=False")
        clock.lap("plan_s")
        out: dict[str, Any] = {"plan_tokens": plan_tokens, "frame": None, "plan_text": [""] * b}
        if plan_tokens is not None and self.plan_vocab is None:
            out["plan_text"] = [tok.decode(r[1:]) for r in plan_tokens]
        elif plan_tokens is not None:  # copies read the instruction's words
            texts = self._instruction_texts(batch, b)
            out["plan_text"] = [self.plan_vocab.decode(r, s) for r, s in zip(plan_tokens, texts)]
        if cfg.action_head == "discrete":
            n = cfg.horizon * cfg.action_dim
            ids, _, _ = self._decode(ctx, cache, ACTION, n + 1, tok.sep_id, b, keep_last=False)
            out["actions"] = tok.tokens_to_actions(ids[:, 1:]).view(b, cfg.horizon, cfg.action_dim)
        else:
            state = self.embed_state(batch["state"])
            cache = self._run([state], cache, keep_kv=True)[1] if use_cache else cache
            ctx.append(state)
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
                o = self._run(segs, cache)[0] if use_cache else self._run(ctx + segs)[0][len(ctx):]
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
                o = self._run(seg, cache)[0] if use_cache else self._run(ctx + seg)[0][len(ctx):]
                return self.frame["out"](o[0])  # (B, P, 3pp)

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
        or immediately repeated subtask; docs/text.md "Decoding rules"). Every decode path (`vla plan`,
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
            rules = [PlanRules(self.plan_vocab, t) for t in texts]
        ids = [torch.full((b, 1), first, dtype=torch.long, device=dev)]
        valid = [torch.ones(b, 1, dtype=torch.bool, device=dev)]
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        rows: list[list[int]] = [[] for _ in range(b)]  # plan tokens emitted so far (word-plan rules)
        for step in range(max_len):
            last = step == max_len - 1 or bool(done.all())
            if last and not keep_last:
                break
            seg = embed(ids[-1], valid[-1])
            if cache is not None:
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
        return torch.cat(ids, 1), torch.cat(valid, 1), cache
