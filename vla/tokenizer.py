"""Byte-level text tokenizer with the VLA's special tokens (docs/architecture.md "Text").

Vocabulary (ids):

    0..255                 UTF-8 bytes
    256 <pad>  257 <bos>  258 <eos>  259 <plan>  260 <sep> (starts the discrete action tokens)
    261..261+bins-1        action-bin tokens of the ``action_head: discrete`` baseline

Byte-level means no vocabulary file and no out-of-vocabulary text; the price is long sequences,
so the model presets keep ``max_instruction_tokens`` / ``max_plan_tokens`` small. Text longer than
a limit is *truncated* (the tail is dropped, at a byte boundary; ``decode`` drops any split UTF-8
character). The tokenizer serializes to JSON and is saved with every checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<plan>", "<sep>")


class ByteTokenizer:
    """UTF-8 bytes + special tokens + ``action_bins`` discrete action tokens."""

    version = 1

    def __init__(self, action_bins: int = 256) -> None:
        if not isinstance(action_bins, int) or action_bins < 2:
            raise ValueError(f"ByteTokenizer: action_bins must be an int >= 2, got {action_bins!r}")
        self.action_bins = action_bins
        self.pad_id, self.bos_id, self.eos_id, self.plan_id, self.sep_id = range(256, 256 + len(SPECIAL_TOKENS))
        self.action_offset = 256 + len(SPECIAL_TOKENS)
        self.vocab_size = self.action_offset + action_bins

    # -- text -------------------------------------------------------------------------------
    def encode(self, text: str, max_len: int | None = None, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; with ``max_len`` the result (specials included) is truncated to fit."""
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode: expected str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if max_len is not None:
            room = max_len - int(bos) - int(eos)
            if room < 0:
                raise ValueError(f"ByteTokenizer.encode: max_len={max_len} leaves no room for the special tokens")
            ids = ids[:room]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int] | np.ndarray | torch.Tensor) -> str:
        """Text of ``ids``: stops at the first <eos>, skips other special and action tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if 0 <= i < 256:
                out.append(i)
        return out.decode("utf-8", errors="ignore")

    def batch_encode(
        self, texts: list[str], max_len: int, bos: bool = False, eos: bool = False, first: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids i64[B, L] and mask bool[B, L], L = longest (<= max_len).

        ``first`` (e.g. ``plan_id``) is put before every text and counts toward ``max_len``.
        """
        rows = []
        for text in texts:
            head = [] if first is None else [first]
            rows.append(head + self.encode(text, max_len=max_len - len(head), bos=bos, eos=eos))
        length = max(1, max(len(r) for r in rows)) if rows else 1
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)  # (B, L)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = True
        return ids, mask

    # -- discrete actions -------------------------------------------------------------------
    def actions_to_tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Normalized actions in [-1, 1] (any shape) -> action-bin token ids, same shape (uniform bins)."""
        x = actions.clamp(-1.0, 1.0)
        bins = ((x + 1.0) * 0.5 * self.action_bins).long().clamp(0, self.action_bins - 1)
        return bins + self.action_offset

    def tokens_to_actions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Action-bin token ids -> bin centres in [-1, 1] (f32, same shape)."""
        bins = (tokens - self.action_offset).clamp(0, self.action_bins - 1).float()
        return (bins + 0.5) / self.action_bins * 2.0 - 1.0

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"type": "ByteTokenizer", "version": self.version, "action_bins": self.action_bins,
                "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ByteTokenizer:
        if d.get("type") != "ByteTokenizer":
            raise ValueError(f"ByteTokenizer.from_dict: expected type 'ByteTokenizer', got {d.get('type')!r}")
        if int(d.get("version", 0)) > cls.version:
            raise ValueError(f"ByteTokenizer.from_dict: version {d.get('version')} is newer than {cls.version}")
        if list(d.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise ValueError(f"ByteTokenizer.from_dict: special tokens {d.get('special_tokens')} != {SPECIAL_TOKENS}")
        return cls(action_bins=int(d["action_bins"]))
