"""Normalization statistics for the episode store (action and state).

The store keeps, per low-dimensional key, six float32 vectors over all committed rows:
``mean``, ``std`` (population, ddof=0), ``min``, ``max``, ``q01`` and ``q99`` (the 1st and 99th
percentiles, numpy's default linear interpolation). ``vla.normalize`` turns them into a
mean/std or a quantile normalizer inside the policy.

Exactness and cost: mean/std/min/max are exact (float64 accumulation) and the writer updates
them incrementally (``RunningStats``: O(T) per appended episode). Quantiles are exact up to
``EXACT_QUANTILE_MAX_ROWS`` (500k) rows, computed with one ``np.partition`` pass (~0.35 s for
500k x 43 on one core); beyond that they come from an evenly strided subsample of 500k rows
(deterministic), so an append never costs more than that, and the error of a stride subsample
that large is far below anything a normalizer cares about.

Degenerate dimensions (a gripper that never moves, a state entry that is always 0) would make a
normalizer divide by ~0. ``guard_stats`` fixes them in the stored statistics:

- ``std < GUARD_EPS``            -> ``std = 1``           (mean/std normalization becomes x - mean)
- ``q99 - q01 < GUARD_EPS``      -> ``q01 = c - 1, q99 = c + 1`` with c = (q01 + q99) / 2
- ``max - min < GUARD_EPS``      -> ``min = c - 1, max = c + 1`` with c = (min + max) / 2

so the constant value maps to 0 and a deviation of one raw unit maps to about 1. Which
dimensions were guarded is recorded next to the statistics (``EpisodeStore.stats_guarded``).
"""

from __future__ import annotations

import numpy as np

STAT_KEYS: tuple[str, ...] = ("mean", "std", "min", "max", "q01", "q99")
QUANTILES: tuple[float, float] = (0.01, 0.99)
EXACT_QUANTILE_MAX_ROWS = 500_000
GUARD_EPS = 1e-6


def quantiles(x: np.ndarray, qs: tuple[float, ...] = QUANTILES) -> np.ndarray:
    """Per-column quantiles of ``x`` (N, D) as float64 (len(qs), D), equal to ``np.quantile``'s
    default (linear) method, computed with one ``np.partition`` pass instead of a sort.

    Above ``EXACT_QUANTILE_MAX_ROWS`` rows an evenly strided subsample of at most that many rows
    is used (deterministic), which keeps the cost per call bounded.
    """
    n = x.shape[0]
    if n > EXACT_QUANTILE_MAX_ROWS:
        x = x[:: int(np.ceil(n / EXACT_QUANTILE_MAX_ROWS))]
        n = x.shape[0]
    pos = np.asarray(qs, np.float64) * (n - 1)  # (Q,)
    lo = np.floor(pos).astype(np.int64)  # (Q,)
    hi = np.minimum(lo + 1, n - 1)  # (Q,)
    cols = np.ascontiguousarray(x.T)  # (D, N): partition along contiguous rows
    part = np.partition(cols, np.unique(np.concatenate([lo, hi])), axis=1)  # (D, N)
    frac = (pos - lo)[:, None]  # (Q, 1)
    below, above = part[:, lo].T.astype(np.float64), part[:, hi].T.astype(np.float64)  # (Q, D) each
    return below + (above - below) * frac  # (Q, D)


def compute_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of ``x`` (N, D) per dimension: a dict of float32[D] for each of ``STAT_KEYS``.

    Raises ``ValueError`` for an empty or non-2-D input (statistics of nothing are undefined).
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"compute_stats: expected a non-empty (N, D) array, got shape {x.shape}")
    x64 = x.astype(np.float64, copy=False)  # (N, D)
    q01, q99 = quantiles(x)  # (D,), (D,)
    out = {"mean": x64.mean(axis=0), "std": x64.std(axis=0), "min": x64.min(axis=0), "max": x64.max(axis=0),
           "q01": q01, "q99": q99}
    return {k: v.astype(np.float32) for k, v in out.items()}


class RunningStats:
    """Statistics kept up to date as episodes are appended, without re-reading old rows.

    mean/std merge per batch (Chan et al.'s parallel update, float64) and min/max are running
    values, so they cost O(T) per episode; quantiles need the rows, which are kept in a growing
    buffer (amortized O(T) appends) and recomputed with one partition pass (O(N), bounded by
    ``EXACT_QUANTILE_MAX_ROWS``). Results equal ``compute_stats`` over the concatenated rows up
    to float64 rounding.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._m2 = np.zeros(dim, np.float64)
        self._min = np.full(dim, np.inf)
        self._max = np.full(dim, -np.inf)
        self._rows = np.zeros((0, dim), np.float32)  # capacity buffer; valid rows are [:count]
        self._pending: tuple | None = None

    def stage(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics as they will be once rows ``x`` (T, D) are added, without adding them yet.

        ``commit()`` then adds them; staging again instead discards the staged rows. This lets
        the writer store the new statistics before its episode is committed, and forget them
        when the write fails.
        """
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ValueError(f"RunningStats.stage: expected a non-empty (T, {self.dim}) array, got {x.shape}")
        t = x.shape[0]
        x64 = x.astype(np.float64)  # (T, D)
        b_mean = x64.mean(axis=0)
        b_m2 = ((x64 - b_mean) ** 2).sum(axis=0)
        n = self.count + t
        delta = b_mean - self._mean
        mean = self._mean + delta * (t / n)
        m2 = self._m2 + b_m2 + delta**2 * (self.count * t / n)
        lo = np.minimum(self._min, x64.min(axis=0))
        hi = np.maximum(self._max, x64.max(axis=0))
        if n > self._rows.shape[0]:
            grown = np.zeros((max(n, 2 * self._rows.shape[0], 1024), self.dim), np.float32)
            grown[: self.count] = self._rows[: self.count]
            self._rows = grown
        self._rows[self.count : n] = x  # past ``count``: invisible until commit()
        self._pending = (n, mean, m2, lo, hi)
        return self._result(n, mean, m2, lo, hi)

    def commit(self) -> None:
        """Add the rows of the last ``stage``."""
        if self._pending is None:
            raise ValueError("RunningStats.commit: nothing staged")
        self.count, self._mean, self._m2, self._min, self._max = self._pending
        self._pending = None

    def update(self, x: np.ndarray) -> None:
        """Add rows ``x`` (T, D)."""
        self.stage(x)
        self.commit()

    def result(self) -> dict[str, np.ndarray]:
        """float32[D] per stat key, as ``compute_stats`` would give over all committed rows."""
        if self.count == 0:
            raise ValueError("RunningStats.result: no rows yet")
        return self._result(self.count, self._mean, self._m2, self._min, self._max)

    def _result(self, n, mean, m2, lo, hi) -> dict[str, np.ndarray]:
        q01, q99 = quantiles(self._rows[:n])  # (D,), (D,)
        out = {"mean": mean, "std": np.sqrt(m2 / n), "min": lo, "max": hi, "q01": q01, "q99": q99}
        return {k: np.asarray(v).astype(np.float32) for k, v in out.items()}


def guard_stats(stats: dict[str, np.ndarray], eps: float = GUARD_EPS) -> tuple[dict[str, np.ndarray], dict]:
    """Return (guarded copy of ``stats``, {"std"|"quantile"|"minmax": list[bool] per dim}).

    See the module docstring for what the guard does and why.
    """
    s = {k: np.array(v, dtype=np.float32, copy=True) for k, v in stats.items()}
    std_bad = s["std"] < eps
    s["std"][std_bad] = 1.0
    q_bad = (s["q99"] - s["q01"]) < eps
    qc = (s["q99"] + s["q01"]) / 2
    s["q01"][q_bad] = qc[q_bad] - 1.0
    s["q99"][q_bad] = qc[q_bad] + 1.0
    m_bad = (s["max"] - s["min"]) < eps
    mc = (s["max"] + s["min"]) / 2
    s["min"][m_bad] = mc[m_bad] - 1.0
    s["max"][m_bad] = mc[m_bad] + 1.0
    mask = {"std": std_bad.tolist(), "quantile": q_bad.tolist(), "minmax": m_bad.tolist()}
    return s, mask


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    """{key: {stat: float32[D]}} -> JSON-able lists (float32 values survive a JSON round trip)."""
    return {
        key: {k: [float(v) for v in np.asarray(arr, np.float32)] for k, arr in d.items()} for key, d in stats.items()
    }


def stats_from_json(obj: dict) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of ``stats_to_json``."""
    return {key: {k: np.asarray(v, dtype=np.float32) for k, v in d.items()} for key, d in obj.items()}
