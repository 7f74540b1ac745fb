"""Turns dataset windows and env observations into model batches, and model actions back to raw units.

``Processor(config, normalizer, tokenizer)`` sits between the data (`vla.datasets.WindowDataset`,
env observations) and `vla.model.VLA`. It owns every conversion the model must not see:

    images    u8 [B, n_obs, H, W, 3] per camera -> f32 [B, V, 3, H, W] in [-1, 1],
              V = cameras x n_obs_steps, ordered camera-major (cam0 t0, cam0 t1, ..., cam1 t0, ...)
    state     f32 [B, n_obs, S] raw -> f32 [B, n_obs * S] normalized (oldest step first)
    text      instruction -> ``instruction_tokens`` i64 [B, Li] + ``instruction_mask``
              (UTF-8 bytes, or WordPiece ids [CLS] ... [SEP] with ``text: minilm``);
              plan -> ``plan_tokens`` = <plan> text <eos> i64 [B, Lp] + ``plan_mask``
              (bytes, or `vla.tokenizer.PlanVocab` ids with ``plan_vocab: words``, which also adds
              ``instruction_word_pos`` i64 [B, copy_slots]: the token index of each instruction word,
              -1 for none; inference batches carry ``instruction_text``, the strings, to spell copies)
              (text longer than ``max_instruction_tokens`` / ``max_plan_tokens`` is truncated)
    actions   f32 [B, H, A] raw -> normalized; ``action_is_pad`` bool [B, H]
    goal      ``goal_state`` f32 [B, S] raw -> normalized like the state (only with
              ``goal_loss_weight`` > 0: the target of the goal head)
    future    u8 [B, H, W, 3] -> ``future_frame`` f32 [B, 3, frame_size, frame_size] in [-1, 1]
              (area-resized); ``future_is_pad`` bool [B]

The training loop augments ``batch["images"]`` after `training_batch`; its format is stable.
Normalization statistics and the tokenizer travel with the processor (`to_dict`/`from_dict`, JSON).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vla.model import VLAConfig
from vla.normalize import Normalizer
from vla.observation import ObservationSpec, validate_observation
from vla.tokenizer import ByteTokenizer, PlanVocab, pad_rows, word_starts


def _tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise ValueError(f"{where}: expected an array or tensor, got {type(x).__name__}")


class Processor:
    """Dataset windows / observations <-> model batches (see the module docstring for the formats)."""

    version = 1

    def __init__(self, config: VLAConfig, normalizer: Normalizer, tokenizer: ByteTokenizer | None = None) -> None:
        self.config = config
        self.normalizer = normalizer
        self.tokenizer = tokenizer or ByteTokenizer(config.action_bins)
        if self.tokenizer.action_bins != config.action_bins:
            raise ValueError(f"Processor: tokenizer has {self.tokenizer.action_bins} action bins, "
                             f"config.action_bins is {config.action_bins}")
        self.text_tokenizer = None
        if config.text == "minilm":
            from vla.text_encoder import WordPieceTokenizer

            self.text_tokenizer = WordPieceTokenizer()
        self.plan_vocab = PlanVocab(config.plan_words, config.copy_slots) if config.plan_vocab == "words" else None
        # instruction -> (token ids, word positions): a store has a few hundred distinct instructions, and
        # tokenizing 256 of them per batch (twice for word positions) cost ~50 ms of host time per step
        self._instruction_memo: dict[str, tuple[list[int], list[int]]] = {}
        # training with goal_patch_loss_weight: the first camera's 3x4 projection (world xyz -> pixel) at the
        # model's image size, set by the training loop (`camera_projection`); the state's first three
        # entries are the hand's world position, so a goal state's are where the goal is
        self.goal_camera: np.ndarray | None = None
        for key, dim in (("state", config.state_dim), ("action", config.action_dim)):
            if normalizer.dim(key) != dim:
                raise ValueError(f"Processor: normalizer '{key}' statistics have dim {normalizer.dim(key)}, "
                                 f"config.{key}_dim is {dim}")

    # ------------------------------------------------------------------------------- pieces
    def _images(self, images: Mapping[str, Any], device: torch.device | str) -> torch.Tensor:
        """{cam: u8 [B, n_obs, H, W, 3]} -> f32 [B, V, 3, H, W] in [-1, 1]."""
        cfg = self.config
        h, w = cfg.image_hw
        if not isinstance(images, Mapping):
            raise ValueError(f"images: expected a dict camera -> uint8 array, got {type(images).__name__}")
        views = []
        for cam in cfg.cameras:
            if cam not in images:
                raise ValueError(f"images: missing camera '{cam}'; got cameras {sorted(images)}, "
                                 f"the model expects {cfg.cameras}")
            x = _tensor(images[cam], f"images['{cam}']")
            if x.dim() != 5 or tuple(x.shape[1:]) != (cfg.n_obs_steps, h, w, 3):
                raise ValueError(f"images['{cam}']: expected uint8 [B, n_obs, H, W, 3] with n_obs={cfg.n_obs_steps}, "
                                 f"H={h}, W={w}, got shape {tuple(x.shape)}")
            if x.dtype != torch.uint8:
                raise ValueError(f"images['{cam}']: expected dtype uint8, got {x.dtype}")
            views.append(x)
        x = torch.stack(views, 1).to(device)  # (B, C, n_obs, H, W, 3)
        b = x.shape[0]
        x = x.reshape(b, cfg.num_views, h, w, 3).permute(0, 1, 4, 2, 3)  # (B, V, 3, H, W)
        return x.float() / 127.5 - 1.0

    def _state(self, state: Any, device: torch.device | str) -> torch.Tensor:
        """f32 [B, n_obs, S] (or [B, S] when n_obs=1) raw -> f32 [B, n_obs*S] normalized."""
        cfg = self.config
        x = _tensor(state, "state").float()
        if x.dim() == 2 and cfg.n_obs_steps == 1:
            x = x[:, None]  # (B, 1, S)
        if x.dim() != 3 or tuple(x.shape[1:]) != (cfg.n_obs_steps, cfg.state_dim):
            raise ValueError(f"state: expected float [B, n_obs={cfg.n_obs_steps}, S={cfg.state_dim}], "
                             f"got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("state: contains NaN or inf")
        x = self.normalizer.normalize("state", x.to(device))  # (B, n_obs, S)
        return x.reshape(x.shape[0], -1)  # (B, n_obs*S)

    def _text(self, texts: Any, key: str, n: int) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) != n:
            raise ValueError(f"{key}: expected a list of {n} strings, got {type(texts).__name__}"
                             + (f" of length {len(texts)}" if isinstance(texts, Sequence) else ""))
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{key}[{i}]: expected str, got {type(t).__name__}")
        return list(texts)

    def _instruction(self, text: str) -> tuple[list[int], list[int]]:
        """(token ids, word positions) of one instruction, computed once per distinct text."""
        hit = self._instruction_memo.get(text)
        if hit is None:
            if len(self._instruction_memo) >= 16384:  # bounded: a server may see many texts
                self._instruction_memo.clear()
            tok = self.text_tokenizer or self.tokenizer
            ids, mask = tok.batch_encode([text], self.config.max_instruction_tokens)  # (1, L) x2
            hit = self._instruction_memo[text] = (ids[0][mask[0]].tolist(), self._word_pos(text))
        return hit

    def tokenize_instructions(self, texts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.text_tokenizer or self.tokenizer
        ids, mask = pad_rows([self._instruction(t)[0] for t in texts], tok.pad_id)
        return ids.to(device), mask.to(device)  # (B, Li) x2

    def instruction_word_pos(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """i64 [B, copy_slots]: the instruction token index where word i starts (-1: no word i, or truncated)."""
        pos = torch.tensor([self._instruction(t)[1] for t in texts], dtype=torch.long)
        return pos.reshape(len(texts), self.config.copy_slots).to(device)  # (B, K)

    def _word_pos(self, text: str) -> list[int]:
        """Token index where each of the first ``copy_slots`` words of ``text`` starts (-1: none, or truncated)."""
        cfg = self.config
        pos = [-1] * cfg.copy_slots
        starts = word_starts(text)[: cfg.copy_slots]
        if self.text_tokenizer is None:  # bytes: a word starts at the byte offset of its first character
            idx = [len(text[:c].encode("utf-8")) for c in starts]
            limit = cfg.max_instruction_tokens
        else:  # WordPiece: the first non-special token whose character span holds the word's start
            enc = self.text_tokenizer.tok.encode(text)
            spans = [(j, a, e) for j, ((a, e), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask))
                     if not special]
            idx = [next((j for j, a, e in spans if a <= c < e), -1) for c in starts]
            limit = cfg.max_instruction_tokens - 1  # the encoder keeps [SEP] last when truncating
        for i, j in enumerate(idx):
            if 0 <= j < limit:
                pos[i] = j
        return pos

    def tokenize_plans(self, texts: list[str], device: torch.device | str,
                       instructions: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.plan_vocab is not None:
            if instructions is None:
                raise ValueError("tokenize_plans: word plans need the instructions (copies point into them)")
            copyable = (self.instruction_word_pos(instructions) >= 0).sum(1).tolist()
            ids, mask = self.plan_vocab.batch_encode(texts, instructions, self.config.max_plan_tokens, copyable)
            return ids.to(device), mask.to(device)  # (B, Lp) x2
        tok = self.tokenizer
        ids, mask = tok.batch_encode(texts, self.config.max_plan_tokens, eos=True, first=tok.plan_id)
        return ids.to(device), mask.to(device)  # (B, Lp) x2

    def decode_plan(self, ids: torch.Tensor, instruction: str) -> str:
        """Text of one plan row (<plan> ... <eos>), bytes or words."""
        if self.plan_vocab is not None:
            return self.plan_vocab.decode(ids, instruction)
        return self.tokenizer.decode(ids[1:])

    # ------------------------------------------------------------------------------- batches
    def training_batch(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A collated `WindowDataset` batch -> the model's training batch (normalized tensors on ``device``)."""
        cfg = self.config
        need = ["images", "state", "action", "action_is_pad", "instruction"]
        need += ["plan"] if cfg.planner else []
        need += ["future_image", "future_is_pad"] if cfg.frame != "off" else []
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"training_batch: missing keys {missing}; got {sorted(batch)}")
        out: dict[str, torch.Tensor] = {"images": self._images(batch["images"], device)}
        b = out["images"].shape[0]
        out["state"] = self._state(batch["state"], device)
        action = _tensor(batch["action"], "action").float()
        if tuple(action.shape) != (b, cfg.horizon, cfg.action_dim):
            raise ValueError(f"action: expected float [B={b}, horizon={cfg.horizon}, A={cfg.action_dim}], "
                             f"got shape {tuple(action.shape)}")
        if not torch.isfinite(action).all():
            raise ValueError("action: contains NaN or inf")
        out["actions"] = self.normalizer.normalize("action", action.to(device))  # (B, H, A)
        pad = _tensor(batch["action_is_pad"], "action_is_pad")
        if tuple(pad.shape) != (b, cfg.horizon):
            raise ValueError(f"action_is_pad: expected bool [B={b}, horizon={cfg.horizon}], got {tuple(pad.shape)}")
        out["action_is_pad"] = pad.bool().to(device)
        instructions = self._text(batch["instruction"], "instruction", b)
        out["instruction_tokens"], out["instruction_mask"] = self.tokenize_instructions(instructions, device)
        if cfg.planner:
            out["plan_tokens"], out["plan_mask"] = self.tokenize_plans(self._text(batch["plan"], "plan", b), device,
                                                                       instructions)
            if self.plan_vocab is not None:
                out["instruction_word_pos"] = self.instruction_word_pos(instructions, device)
        if cfg.goal_loss_weight > 0:
            if "goal_state" not in batch:
                raise ValueError(f"training_batch: model.goal_loss_weight={cfg.goal_loss_weight} needs the key "
                                 f"'goal_state' (WindowDataset gives it); got {sorted(batch)}")
            goal = _tensor(batch["goal_state"], "goal_state").float()
            if tuple(goal.shape) != (b, cfg.state_dim):
                raise ValueError(f"goal_state: expected float [B={b}, S={cfg.state_dim}], "
                                 f"got shape {tuple(goal.shape)}")
            out["goal_state"] = self.normalizer.normalize("state", goal.to(device))  # (B, S)
            if self.goal_camera is not None:  # the goal's pixel in the first camera (goal_patch_loss_weight)
                from vla.envs.rendering import project_points

                pix = project_points(self.goal_camera, goal[:, :3].double().numpy())  # (B, 2) column, row
                out["goal_pixel"] = torch.from_numpy(pix).to(device)
        if cfg.frame != "off":
            out["future_frame"] = self.future_frame(batch["future_image"], device)
            fpad = _tensor(batch["future_is_pad"], "future_is_pad").reshape(-1)
            if fpad.shape[0] != b:
                raise ValueError(f"future_is_pad: expected bool [B={b}], got shape {tuple(fpad.shape)}")
            out["future_is_pad"] = fpad.bool().to(device)
        return out

    def future_frame(self, image: Any, device: torch.device | str = "cpu") -> torch.Tensor:
        """u8 [B, H, W, 3] -> f32 [B, 3, s, s] in [-1, 1], s = frame_size (area resize)."""
        cfg = self.config
        x = _tensor(image, "future_image")
        h, w = cfg.image_hw
        if x.dim() != 4 or tuple(x.shape[1:]) != (h, w, 3) or x.dtype != torch.uint8:
            raise ValueError(f"future_image: expected uint8 [B, {h}, {w}, 3] (camera '{cfg.frame_camera}'), "
                             f"got {x.dtype} {tuple(x.shape)}")
        x = x.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        s = cfg.frame_size
        return x if (h, w) == (s, s) else F.interpolate(x, size=(s, s), mode="area")  # (B, 3, s, s)

    def observation_batch(self, obs_list: Sequence[Mapping[str, Any]], instructions: Sequence[str],
                          device: torch.device | str = "cpu", plans: Sequence[str] | None = None) -> dict[str, Any]:
        """Env observations ``{"images": {cam: u8[H,W,3] or [n_obs,H,W,3]}, "state": f32[S] or [n_obs,S]}``
        -> the model's inference batch. ``plans`` (optional) gives known plans (teacher forcing)."""
        if not obs_list:
            raise ValueError("observation_batch: empty observation list")
        b = len(obs_list)
        instructions = self._text(list(instructions), "instructions", b)
        cfg = self.config
        images, states = {}, []
        spec = ObservationSpec.from_config(cfg)
        for i, obs in enumerate(obs_list):
            obs = validate_observation(obs, spec, f"observation {i}")
            for cam, img in obs["images"].items():
                images.setdefault(cam, []).append(img if img.ndim == 4 else img[None])
            states.append(obs["state"] if obs["state"].ndim == 2 else obs["state"][None])
        try:
            stacked = {cam: np.stack(v) for cam, v in images.items()}  # (B, n_obs, H, W, 3)
            state = np.stack(states)  # (B, n_obs, S)
        except ValueError as e:
            raise ValueError(f"observation_batch: observations differ in shape: {e}") from None
        out: dict[str, Any] = {"images": self._images(stacked, device), "state": self._state(state, device)}
        out["instruction_tokens"], out["instruction_mask"] = self.tokenize_instructions(instructions, device)
        if cfg.planner and self.plan_vocab is not None:
            out["instruction_word_pos"] = self.instruction_word_pos(instructions, device)
            out["instruction_text"] = list(instructions)
        if plans is not None and cfg.planner:
            out["plan_tokens"], out["plan_mask"] = self.tokenize_plans(self._text(list(plans), "plans", b), device,
                                                                       instructions)
        return out

    def unnormalize_actions(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalized actions (..., A) -> raw units, same type."""
        return self.normalizer.unnormalize("action", x)

    # ------------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {"type": "Processor", "version": self.version, "config": self.config.to_dict(),
                "normalizer": self.normalizer.to_dict(), "tokenizer": self.tokenizer.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Processor:
        if d.get("type") != "Processor":
            raise ValueError(f"Processor.from_dict: expected type 'Processor', got {d.get('type')!r}")
        return cls(VLAConfig.from_dict(d["config"]), Normalizer.from_dict(d["normalizer"]),
                   ByteTokenizer.from_dict(d["tokenizer"]))
