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

import re
from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<plan>", "<sep>")



def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids i64[B, L] and mask bool[B, L] of token rows, L = the longest row (at least 1)."""
    length = max([1] + [len(r) for r in rows])
    ids = torch.tensor([[*r, *[pad_id] * (length - len(r))] for r in rows], dtype=torch.long)  # (B, L)
    mask = torch.tensor([[True] * len(r) + [False] * (length - len(r)) for r in rows], dtype=torch.bool)  # (B, L)
    return ids.reshape(len(rows), length), mask.reshape(len(rows), length)

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
        return pad_rows(rows, self.pad_id)

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


# ----------------------------------------------------------------------------------------------- word plans
WORD_RE = re.compile(r"\w+|[^\w\s]")  # a word, or one punctuation mark ("reach the handle; pull" -> 5 words)
PLAN_SPECIALS = ("<pad>", "<plan>", "<eos>")


def split_words(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, case kept (see `WORD_RE`)."""
    return WORD_RE.findall(text)


def word_starts(text: str) -> list[int]:
    """Character offset of every word `split_words` returns."""
    return [m.start() for m in WORD_RE.finditer(text)]


def join_words(words: list[str]) -> str:
    """Inverse of `split_words` for normally spaced text: punctuation attaches to the word before it."""
    out = ""
    for w in words:
        out += w if (not out or not WORD_RE.fullmatch(w) or not (w[0].isalnum() or w[0] == "_")) else " " + w
    return out


class PlanVocab:
    """Word-level plan tokens: a fixed vocabulary from the store's subtask table plus copy slots.

    Ids::

        0 <pad>  1 <plan>  2 <eos>
        3 .. 3+W-1              the W fixed words (every word of every subtask label, sorted)
        3+W .. 3+W+K-1          "copy instruction word i", i = 0..K-1

    A plan word that also occurs in the instruction is encoded as a copy of its first occurrence
    (when i < K), otherwise as its fixed id; a word that is in neither is refused. Preferring the
    copy is what makes names generalize: training plans name their objects by pointing into the
    instruction, so at test time "purple" in a new instruction is reachable though no training plan
    contained it. Decoding emits only fixed words and words of the instruction, so a plan cannot be
    misspelled. The model scores copy slots by pointing at the instruction's tokens (`vla.model`).
    """

    version = 1

    def __init__(self, words: list[str], copy_slots: int) -> None:
        words = [str(w) for w in words]
        bad = [w for w in words if split_words(w) != [w]]
        if bad:
            raise ValueError(f"PlanVocab: entries must be single words or punctuation marks, got {bad[:5]}")
        if len(set(words)) != len(words):
            raise ValueError("PlanVocab: duplicate words")
        if isinstance(copy_slots, bool) or not isinstance(copy_slots, int) or copy_slots < 0:
            raise ValueError(f"PlanVocab: copy_slots must be an int >= 0, got {copy_slots!r}")
        self.words, self.copy_slots = words, copy_slots
        self.pad_id, self.plan_id, self.eos_id = range(len(PLAN_SPECIALS))
        self.word_offset = len(PLAN_SPECIALS)
        self.copy_offset = self.word_offset + len(words)
        self.vocab_size = self.copy_offset + copy_slots
        self._id = {w: self.word_offset + i for i, w in enumerate(words)}

    @classmethod
    def from_subtasks(cls, subtasks: list[str], copy_slots: int) -> PlanVocab:
        """The words of every subtask label (plus ";", the plan separator), each label checked to round-trip."""
        words = {";"}
        for label in subtasks:
            split = split_words(label)
            if join_words(split) != label:
                raise ValueError(f"PlanVocab: subtask label {label!r} does not survive word splitting "
                                 f"(reads back as {join_words(split)!r}); use single spaces between words")
            words.update(split)
        return cls(sorted(words), copy_slots)

    def encode(self, plan: str, instruction: str = "", max_len: int | None = None,
               copyable: int | None = None) -> list[int]:
        """<plan> word ids <eos>; with ``max_len`` the words are truncated so that all of it fits.

        ``copyable``: only the instruction's first ``copyable`` words may be copied (the model sees no
        more of it, e.g. a truncated instruction); default all of the first ``copy_slots``.
        """
        if not isinstance(plan, str) or not isinstance(instruction, str):
            raise ValueError(f"PlanVocab.encode: expected str plan and instruction, got "
                             f"{type(plan).__name__}, {type(instruction).__name__}")
        first_at: dict[str, int] = {}
        n_copy = self.copy_slots if copyable is None else min(self.copy_slots, copyable)
        for i, w in enumerate(split_words(instruction)[:n_copy]):
            first_at.setdefault(w, i)
        ids = []
        for w in split_words(plan):
            if w in first_at:
                ids.append(self.copy_offset + first_at[w])
            elif w in self._id:
                ids.append(self._id[w])
            else:
                raise ValueError(f"PlanVocab.encode: word {w!r} of plan {plan!r} is neither in the plan vocabulary "
                                 f"(built from the store's subtask table) nor in the instruction {instruction!r}")
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"PlanVocab.encode: max_len={max_len} leaves no room for <plan> and <eos>")
            ids = ids[: max_len - 2]
        return [self.plan_id] + ids + [self.eos_id]

    def decode(self, ids: list[int] | np.ndarray | torch.Tensor, instruction: str = "") -> str:
        """Text of plan ids (a leading <plan> is skipped; stops at <eos>; copies read the instruction)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        inst = split_words(instruction)
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if self.word_offset <= i < self.copy_offset:
                out.append(self.words[i - self.word_offset])
            elif self.copy_offset <= i < self.vocab_size and i - self.copy_offset < len(inst):
                out.append(inst[i - self.copy_offset])
        return join_words(out)

    def batch_encode(self, plans: list[str], instructions: list[str], max_len: int,
                     copyable: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids i64[B, L] and mask bool[B, L] of <plan> words <eos>, L = longest (<= max_len)."""
        copyable = [None] * len(plans) if copyable is None else copyable
        rows = [self.encode(p, s, max_len, c) for p, s, c in zip(plans, instructions, copyable, strict=True)]
        return pad_rows(rows, self.pad_id)

    def length(self, plan: str) -> int:
        """Tokens of ``plan`` in the plan block, <plan> and <eos> included (copies and words count alike)."""
        return len(split_words(plan)) + 2

    def to_dict(self) -> dict[str, Any]:
        return {"type": "PlanVocab", "version": self.version, "words": list(self.words),
                "copy_slots": self.copy_slots, "special_tokens": list(PLAN_SPECIALS)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanVocab:
        if d.get("type") != "PlanVocab":
            raise ValueError(f"PlanVocab.from_dict: expected type 'PlanVocab', got {d.get('type')!r}")
        if int(d.get("version", 0)) > cls.version:
            raise ValueError(f"PlanVocab.from_dict: version {d.get('version')} is newer than {cls.version}")
        return cls(list(d["words"]), int(d["copy_slots"]))


# ----------------------------------------------------------------------------------------------- plan decoding rules
PLAN_SEPARATOR_WORD = ";"  # separates a plan's subtasks ("reach the handle; pull the drawer")
EOS_KEY = "<eos>"  # stands for the <eos> token in the word-level rules below (no word splits to it)
NO_REPEAT_NGRAM = 2  # within one subtask, no word n-gram of this size occurs twice


def banned_next_words(words: list[str], no_repeat_ngram: int = NO_REPEAT_NGRAM) -> set[str]:
    """Words (and ``EOS_KEY``) greedy plan decoding may not emit after ``words``, the plan so far.

    The rules (docs/text.md "Decoding rules"), on words (a copied "the" and the fixed "the" are the
    same word), scoped to subtasks, the words between <plan> or ";" and the next ";" or <eos>:

    1. within a subtask, no word directly follows itself ("the the");
    2. within a subtask, no ``no_repeat_ngram``-gram occurs twice ("the red the red"), as
       ``no_repeat_ngram_size`` in text generation, but per subtask: "put it in the bowl" may come
       back in a later subtask;
    3. no subtask is empty (no ";" or <eos> right after <plan> or ";");
    4. no subtask repeats the one just before it ("reach the handle; reach the handle").

    A fifth rule, the forced <eos> at the block's last position, is the decoder's (`VLA._decode`).
    """
    cur: list[str] = []
    prev: list[str] | None = None
    for w in words:
        if w == PLAN_SEPARATOR_WORD:
            prev, cur = cur, []
        else:
            cur.append(w)
    if not cur:
        return {PLAN_SEPARATOR_WORD, EOS_KEY}
    ban = {cur[-1]}
    n = no_repeat_ngram
    if n >= 1 and len(cur) >= n - 1:
        tail = cur[len(cur) - (n - 1):]
        ban.update(cur[i + n - 1] for i in range(len(cur) - n + 1) if cur[i:i + n - 1] == tail)
    if cur == prev:
        ban.update((PLAN_SEPARATOR_WORD, EOS_KEY))
    return ban


def plan_rule_violation(plan: str, no_repeat_ngram: int = NO_REPEAT_NGRAM) -> str | None:
    """Why the decoding rules could never produce ``plan`` (its first blocked word), or None if they can."""
    words = split_words(plan) + [EOS_KEY]
    for i, w in enumerate(words):
        if w in banned_next_words(words[:i], no_repeat_ngram):
            shown = join_words(words[:i])
            return f"{w!r} after {shown!r} is blocked" if shown else f"{w!r} at the start is blocked"
    return None


def subtask_skeletons(labels: list[str]) -> list[tuple[tuple[str | None, ...], tuple[frozenset[str], ...]]]:
    """The shapes of a subtask table's labels: each label's words, with its *slots* (None) where it names
    something. A word position is a slot when another label of the table differs from this one at that
    position only ("pick up the red cube" / "pick up the blue cube": position 3). Returns (skeleton, the
    words seen in each slot) pairs, one per distinct skeleton, in first-seen order::

        ["pick up the red cube", "pick up the blue cube", "pick up the red cylinder", "put it in the bowl"]
        -> [(("pick", "up", "the", None, None), (∅, ∅, ∅, {"red", "blue"}, {"cube", "cylinder"})),
            (("put", "it", "in", "the", "bowl"), (∅, ∅, ∅, ∅, ∅))]
    """
    split = [tuple(split_words(label)) for label in dict.fromkeys(labels)]
    by_len: dict[int, list[tuple[str, ...]]] = {}
    for words in split:
        by_len.setdefault(len(words), []).append(words)
    own = []  # each label's own shape
    for words in split:
        slots = set()
        for other in by_len[len(words)]:
            diff = [j for j, (a, b) in enumerate(zip(words, other)) if a != b]
            if len(diff) == 1:
                slots.add(diff[0])
        own.append(tuple(None if i in slots else w for i, w in enumerate(words)))
    shapes: dict[tuple[str | None, ...], list[set[str]]] = {}
    for words in split:  # each label joins the most general shape that fits it ("blue cube" -> "_ _")
        fits = [s for s in own if len(s) == len(words) and all(f is None or f == w for f, w in zip(s, words))]
        shape = max(fits, key=lambda s: sum(f is None for f in s))
        seen = shapes.setdefault(shape, [set() for _ in words])
        for i, f in enumerate(shape):
            if f is None:
                seen[i].add(words[i])
    return [(shape, tuple(frozenset(s) for s in seen)) for shape, seen in shapes.items()]


def _starts_like(shape: tuple[str | None, ...], seen: tuple[frozenset[str], ...], words: list[str],
                 new_names: set[str]) -> bool:
    """Whether ``words`` can begin a subtask of this shape (slots take their seen words or new names)."""
    return len(shape) >= len(words) and all(
        w == f if f is not None else (w in s or w in new_names) for f, s, w in zip(shape, seen, words))


class PlanGrammar:
    """Decoding rules 6 and 7 (docs/text.md): every subtask of a decoded plan has the shape of a subtask
    in the training store's table (`subtask_skeletons`), and a plan has at most as many subtasks as the
    longest training plan.

    A slot takes a word the table had there, or a *new name*: an instruction word that is not one of the
    table's fixed (non-slot) words. So "put the purple cube in the bowl" can still give "pick up the purple
    cube" though no training label said purple, while a held-out verb such as "collect" cannot start a
    subtask, and "put it in" can only go on with "the bowl".
    """

    def __init__(self, subtasks: list[str], max_subtasks: int | None = None) -> None:
        if not subtasks:
            raise ValueError("PlanGrammar: needs the subtask labels of the training store, got none")
        if max_subtasks is not None and (isinstance(max_subtasks, bool) or int(max_subtasks) < 1):
            raise ValueError(f"PlanGrammar: max_subtasks must be an int >= 1 or None, got {max_subtasks!r}")
        self.skeletons = subtask_skeletons(list(subtasks))
        self.fixed_words = {w for shape, _ in self.skeletons for w in shape if w is not None}
        self.max_subtasks = None if max_subtasks is None else int(max_subtasks)

    def allowed_next(self, words: list[str], new_names: set[str]) -> set[str]:
        """Words (and ``EOS_KEY``, ";") the grammar allows after ``words``, the plan so far; ``new_names``:
        the instruction's words that are not fixed words (`new_names`)."""
        n_done = sum(w == PLAN_SEPARATOR_WORD for w in words)
        cur = words[len(words) - words[::-1].index(PLAN_SEPARATOR_WORD):] if n_done else list(words)
        allowed: set[str] = set()
        for shape, seen in self.skeletons:
            if not _starts_like(shape, seen, cur, new_names):
                continue
            if len(shape) == len(cur):
                allowed.add(EOS_KEY)
                if self.max_subtasks is None or n_done + 1 < self.max_subtasks:
                    allowed.add(PLAN_SEPARATOR_WORD)
            else:
                f, s = shape[len(cur)], seen[len(cur)]
                allowed.update({f} if f is not None else s | new_names)
        if n_done:  # look ahead past rule 4: a word that can only complete the subtask just before is a dead end
            prev = words[:len(words) - len(cur) - 1]
            prev = prev[len(prev) - prev[::-1].index(PLAN_SEPARATOR_WORD):] if PLAN_SEPARATOR_WORD in prev else prev
            if len(prev) == len(cur) + 1 and prev[:-1] == cur and not any(
                    len(shape) > len(prev) and _starts_like(shape, seen, prev, new_names)
                    for shape, seen in self.skeletons):
                allowed.discard(prev[-1])
        return allowed

    def new_names(self, instruction_words: list[str]) -> set[str]:
        """The instruction's words that may fill a slot beyond the words the table had there."""
        return {w for w in instruction_words if w not in self.fixed_words and w != PLAN_SEPARATOR_WORD}

    def violation(self, plan: str, instruction: str = "") -> str | None:
        """Why the grammar could never produce ``plan`` for ``instruction`` (its first blocked word), or None."""
        words, names = split_words(plan) + [EOS_KEY], self.new_names(split_words(instruction))
        for i, w in enumerate(words):
            if w not in self.allowed_next(words[:i], names):
                shown = join_words(words[:i])
                return f"{w!r} after {shown!r} is not in the plan grammar" if shown else \
                    f"{w!r} cannot start a plan"
        return None


class PlanRules:
    """`banned_next_words` (and, with a `PlanGrammar`, everything outside it) for one row of token ids:
    maps plan ids to words and banned words to ids.

    ``instruction`` spells the copy slots; copy slots past its words map to no word (the model
    masks them). Specials other than <eos> are never emitted and have no word.
    """

    def __init__(self, vocab: PlanVocab, instruction: str, no_repeat_ngram: int = NO_REPEAT_NGRAM,
                 grammar: PlanGrammar | None = None) -> None:
        inst = split_words(instruction)[: vocab.copy_slots]
        self.grammar = grammar
        self.new_names = grammar.new_names(inst) if grammar is not None else set()
        self.word_of: list[str | None] = [None] * vocab.vocab_size
        self.word_of[vocab.eos_id] = EOS_KEY
        for i, w in enumerate(vocab.words):
            self.word_of[vocab.word_offset + i] = w
        for i, w in enumerate(inst):
            self.word_of[vocab.copy_offset + i] = w
        self.ids_of: dict[str, list[int]] = {}
        for i, w in enumerate(self.word_of):
            if w is not None:
                self.ids_of.setdefault(w, []).append(i)
        self.no_repeat_ngram = no_repeat_ngram

    def banned_ids(self, ids: list[int]) -> list[int]:
        """Token ids banned after ``ids`` (the plan's tokens after <plan>)."""
        words = [w for w in (self.word_of[i] for i in ids) if w is not None]
        banned = banned_next_words(words, self.no_repeat_ngram)
        if self.grammar is not None:
            allowed = self.grammar.allowed_next(words, self.new_names)
            banned |= {w for w in self.ids_of if w not in allowed}
        return [i for w in banned for i in self.ids_of.get(w, [])]
