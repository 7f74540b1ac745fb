"""Training that survives bad data (issue 18 item 3).

Two faults stop a long run hours in unless they are met here:

- **A corrupt store chunk** met by the sampler (the store raises ``StoreError`` naming the array,
  the chunk and its episodes). ``GuardedWindows`` wraps the training ``WindowDataset``: with
  ``dataset.on_corrupt=skip`` it finds which episodes of the batch cannot be read, never samples
  them again, fills their places with readable windows and reports them with the batch (the loop
  counts them in the logs and metrics); with ``stop`` (the default) the error reaches the loop,
  which writes a checkpoint of the last completed step and stops with ``CorruptDataError``.
- **A non-finite loss or gradient.** ``check_finite`` raises ``NonFiniteError`` naming the step and
  the batch's episodes *before* the optimizer step, so the weights never take a NaN;
  ``check_state_finite`` refuses to write a checkpoint holding a non-finite tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vla.datasets import StoreError, collate_windows

ON_CORRUPT = ("skip", "stop")


class CorruptDataError(RuntimeError):
    """The training data holds a chunk that cannot be read (``dataset.on_corrupt=stop``)."""


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; the run stops before the optimizer step."""


def on_corrupt_mode(value: Any) -> str:
    mode = str(value if value is not None else "stop")
    if mode not in ON_CORRUPT:
        raise ValueError(f"dataset.on_corrupt must be one of {list(ON_CORRUPT)}, got {mode!r}")
    return mode


def _ranges(ids: Sequence[int]) -> str:
    from vla.datasets.layout import format_ranges

    return format_ranges(ids) if len(ids) else "none"


class GuardedWindows:
    """A ``WindowDataset`` whose batches skip episodes that cannot be read (``skip``) or raise (``stop``).

    Skipping is decided per batch: when a batch read fails, each of its episodes is read alone; the
    ones that fail join ``bad_episodes`` and their samples are replaced by readable windows of other
    episodes (found by a walk seeded with the sample index, so a given batch is refilled the same
    way every time). The batch carries ``corrupt = [(episode, message), ...]`` for the episodes newly
    found bad in it. DataLoader workers each keep their own ``bad_episodes``; the loop keeps the union.
    """

    def __init__(self, dataset, mode: str = "stop") -> None:
        self.dataset = dataset
        self.mode = on_corrupt_mode(mode)
        self.bad_episodes: dict[int, str] = {}
        self._ep = dataset._ep  # (M,) episode of each sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]):
        idx = np.asarray(indices, np.int64).reshape(-1) % max(len(self), 1)  # (B,)
        known_bad = [i for i, e in enumerate(self._ep[idx]) if int(e) in self.bad_episodes]
        if not known_bad:
            try:
                return self.dataset.__getitems__(idx)
            except StoreError as e:
                if self.mode == "stop":
                    eps = sorted({int(x) for x in self._ep[idx]})
                    raise CorruptDataError(f"a batch of episodes {_ranges(eps)} cannot be read: {e}") from None
        new = self._find_bad(idx)
        keep = np.array([int(e) not in self.bad_episodes for e in self._ep[idx]])  # (B,)
        idx = idx.copy()
        for j in np.flatnonzero(~keep):
            idx[j] = self._substitute(int(idx[j]))
        batch = self.dataset.__getitems__(idx)
        batch.arrays["corrupt"] = [(ep, self.bad_episodes[ep]) for ep in new]
        return batch

    def _find_bad(self, idx: np.ndarray) -> list[int]:
        """Read each not-yet-known episode of the batch alone; return the ones newly found bad."""
        new = []
        for ep in sorted({int(e) for e in self._ep[idx]} - set(self.bad_episodes)):
            mine = idx[self._ep[idx] == ep]
            try:
                self.dataset.__getitems__(mine)
            except StoreError as e:
                self.bad_episodes[ep] = str(e)
                new.append(ep)
        return new

    def _substitute(self, i: int) -> int:
        """A readable sample index in place of ``i`` (a walk seeded with ``i``; skips bad episodes)."""
        n = len(self)
        rng = np.random.default_rng(i)
        for _ in range(64):
            j = int(rng.integers(n))
            ep = int(self._ep[j])
            if ep in self.bad_episodes:
                continue
            try:
                self.dataset.__getitems__([j])
                return j
            except StoreError as e:
                self.bad_episodes[ep] = str(e)
        good = [e for e in np.unique(self._ep).tolist() if e not in self.bad_episodes]
        raise CorruptDataError(
            f"dataset.on_corrupt=skip: no readable window found in 64 tries; {len(self.bad_episodes)} episodes "
            f"are unreadable ({_ranges(sorted(self.bad_episodes))}), {len(good)} remain unchecked or good; "
            f"run `vla dataset verify` and `--repair`"
        )


def collate_guarded(batch) -> dict[str, Any]:
    """``collate_windows`` that keeps the ``corrupt`` report of a ``GuardedWindows`` batch."""
    out = collate_windows(batch)
    arrays = getattr(batch, "arrays", {})
    out["corrupt"] = list(arrays.get("corrupt", []))
    return out


def note_skipped(raw: dict[str, Any], skipped: dict[int, str], step: int, line) -> None:
    """Move a batch's ``corrupt`` report into ``skipped`` and log each newly skipped episode once."""
    for ep, why in raw.pop("corrupt", []):
        if ep not in skipped:
            skipped[ep] = why
            line(f"skip episode={ep} step={step} skipped={len(skipped)} reason: {why}")


def stop_on_corrupt(step: int, error: Exception, ckpt_root, line) -> None:
    """Raise ``CorruptDataError`` for a batch that could not be read after ``step`` completed steps."""
    where = f"checkpoint of step {step} in {ckpt_root}" if step > 0 else "no checkpoint (no step was completed)"
    msg = (f"step {step + 1}: corrupt training data: {error}; {where}; run `vla dataset verify --repair`, or "
           f"resume with dataset.on_corrupt=skip to train past the episodes that cannot be read")
    line(f"stop {msg}")
    raise CorruptDataError(msg) from None


def batch_episodes(raw: dict[str, Any]) -> list[int]:
    ep = raw.get("episode")
    return sorted({int(e) for e in ep.tolist()}) if torch.is_tensor(ep) else []


def check_finite(step: int, what: str, value: torch.Tensor, raw: dict[str, Any],
                 detail: str | Callable[[], str] = "") -> None:
    """Raise ``NonFiniteError`` naming the step, ``what`` and the batch's episodes if ``value`` is NaN/inf.
    ``detail`` may be a callable, so the message is only built when it is needed."""
    if bool(torch.isfinite(value).all()):
        return
    detail = detail() if callable(detail) else detail
    v = value.detach().float()
    shown = f"{float(v)}" if v.numel() == 1 else "non-finite"
    raise NonFiniteError(
        f"step {step}: {what} is {shown}{f' ({detail})' if detail else ''}; batch episodes "
        f"{_ranges(batch_episodes(raw))}; the optimizer step was not taken and no checkpoint was written "
        f"for this step (the last checkpoint holds the last good weights)"
    )


def check_state_finite(state: dict[str, torch.Tensor], what: str, step: int) -> None:
    """Refuse to checkpoint weights that hold NaN/inf (the previous checkpoint stays the newest)."""
    bad = [k for k, v in state.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = "..." if len(bad) > 3 else ""
        raise NonFiniteError(f"step {step}: {what} hold non-finite values in {bad[:3]}{more}; checkpoint not written")
