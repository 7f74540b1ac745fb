"""Training from a store on disk that is not held in memory (issue 16 item 3).

Random windows read from a zarr store decode one whole image chunk (~20 frames) per frame they
need, so a shuffled batch costs ~64 chunk decodes for 64 windows. Here the data order is
*chunk-local* instead: each epoch shuffles spans of ``span_chunks`` consecutive image chunks,
takes them ``buffer_spans`` at a time (the shuffle buffer), and shuffles the windows within each
buffer. ``ChunkCache`` keeps the decoded chunks of the current buffer (a bounded LRU), so every
chunk is decoded about once per epoch. Batches mix windows from ``buffer_spans`` places of the
store; the order is a seeded function of (seed, epoch) like the in-memory order, so resume stays
exact.

``choose_source`` picks memory or disk by the size of the store's images against the memory
available, and says why.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from vla.training.data_order import ResumableBatchSampler, mix_seed

# Keep images in memory only when they take at most this share of the memory available now.
MEMORY_SHARE = 0.5


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def image_bytes(store) -> int:
    """Raw bytes of every committed frame of every camera (what ``in_memory`` would hold)."""
    return int(sum(store.num_steps * h * w * 3 for h, w in store.cameras.values()))


def choose_source(setting: Any, need: int, have: int | None = None) -> tuple[bool, str]:
    """(in_memory, reason) for ``dataset.in_memory`` = true | false | auto."""
    have = available_memory() if have is None else have
    sizes = f"images {need / 2**30:.2f} GiB, memory available {have / 2**30:.2f} GiB"
    s = str(setting).lower()
    if s in ("true", "false"):
        return s == "true", f"dataset.in_memory={s} ({sizes})"
    if s != "auto":
        raise ValueError(f"dataset.in_memory must be true, false or auto, got {setting!r}")
    if need <= MEMORY_SHARE * have:
        return True, f"auto: {sizes}: the images fit in {MEMORY_SHARE:.0%} of it"
    return False, f"auto: {sizes}: more than {MEMORY_SHARE:.0%} of it, so images are read from disk chunk by chunk"


class ChunkLocalBatchSampler(ResumableBatchSampler):
    """``ResumableBatchSampler`` whose per-epoch order is chunk-local (see the module docstring)."""

    def __init__(self, rows: np.ndarray, chunk_frames: int, batch_size: int, world_size: int, rank: int, seed: int,
                 span_chunks: int = 4, buffer_spans: int = 8, start=None) -> None:
        super().__init__(len(rows), batch_size, world_size, rank, seed, start)
        if chunk_frames < 1 or span_chunks < 1 or buffer_spans < 1:
            raise ValueError(f"chunk_frames={chunk_frames}, span_chunks={span_chunks}, buffer_spans={buffer_spans}: "
                             f"each must be >= 1")
        self.buffer_spans = int(buffer_spans)
        span = np.asarray(rows, np.int64) // (int(chunk_frames) * int(span_chunks))  # (N,) span of each sample
        order = np.argsort(span, kind="stable")
        ids, starts = np.unique(span[order], return_index=True)
        self._by_span = np.split(order, starts[1:])  # sample indices of each span, in row order
        self.num_spans = len(ids)

    def permutation(self, epoch: int) -> torch.Tensor:
        rng = np.random.default_rng(mix_seed(self.seed, 0xC4E, epoch))
        spans = rng.permutation(self.num_spans)
        parts = []
        for b in range(0, self.num_spans, self.buffer_spans):
            idx = np.concatenate([self._by_span[s] for s in spans[b : b + self.buffer_spans]])
            parts.append(rng.permutation(idx))
        return torch.from_numpy(np.concatenate(parts))  # (N,)


class ChunkCache:
    """``read_frames`` through a bounded LRU of decoded image chunks (whole chunks, read in runs).

    Stands in for the store inside a ``WindowDataset`` copy (``cached_windows``); everything else
    is the store's. Damaged chunks raise the store's ``StoreError`` naming array, chunk, episodes.
    """

    def __init__(self, store, capacity_chunks: int) -> None:
        self.store = store
        self.capacity = int(capacity_chunks)
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._arrays: dict[str, Any] | None = None
        self.decoded = 0  # chunks decoded so far (the benchmark reports it)

    def __getstate__(self) -> dict:  # DataLoader workers reopen the arrays and start with an empty cache
        return {"store": self.store, "capacity": self.capacity, "_cache": OrderedDict(), "_arrays": None,
                "decoded": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:
        store = self.__dict__.get("store")
        if store is None:
            raise AttributeError(name)
        return getattr(store, name)

    def _array(self, camera: str):
        if self._arrays is None:
            from vla.datasets.layout import open_group

            group, _ = open_group(self.store.path, read_only=True)
            self._arrays = {c: group[f"data/images/{c}"] for c in self.store.cameras}
        return self._arrays[camera]

    def chunk_frames(self, camera: str) -> int:
        return int(self._array(camera).chunks[0])

    def _load(self, camera: str, chunks: np.ndarray) -> dict[int, np.ndarray]:
        """Decode these chunks, one zarr read per run of consecutive chunk ids."""
        from vla.datasets.layout import read_checked

        a = self._array(camera)
        f = int(a.chunks[0])
        out = {}
        for run in np.split(chunks, np.flatnonzero(np.diff(chunks) != 1) + 1):
            lo, hi = int(run[0]) * f, min((int(run[-1]) + 1) * f, a.shape[0])
            block = read_checked(self.store.path, a, f"data/images/{camera}", lambda lo=lo, hi=hi: a[lo:hi],
                                 self.store.episode_ends)  # (hi - lo, H, W, 3)
            for k, c in enumerate(run):
                out[int(c)] = block[k * f : (k + 1) * f]
            self.decoded += len(run)
        return out

    def read_frames(self, camera: str, rows: np.ndarray) -> np.ndarray:
        """u8[len(rows), H, W, 3], like ``EpisodeStore.read_frames``."""
        if camera not in self.store.cameras:
            return self.store.read_frames(camera, rows)  # its error names the cameras
        rows = np.asarray(rows, np.int64).reshape(-1)  # (R,)
        if rows.size and (rows.min() < 0 or rows.max() >= self.store.num_steps):
            return self.store.read_frames(camera, rows)  # its error names the range
        f = self.chunk_frames(camera)
        chunk = rows // f  # (R,)
        need = np.unique(chunk)
        blocks: dict[int, np.ndarray] = {}
        for c in need.tolist():
            b = self._cache.get((camera, c))
            if b is not None:
                self._cache.move_to_end((camera, c))
                blocks[c] = b
        missing = np.array([c for c in need.tolist() if c not in blocks], np.int64)
        if missing.size:
            for c, b in self._load(camera, missing).items():
                blocks[c] = self._cache[(camera, c)] = b
            while len(self._cache) > self.capacity:  # least recently used first; this call holds its own
                self._cache.popitem(last=False)
        h, w = self.store.cameras[camera]
        out = np.empty((rows.size, h, w, 3), np.uint8)
        for c, b in blocks.items():
            sel = np.flatnonzero(chunk == c)
            out[sel] = b[rows[sel] - c * f]
        return out


def cached_windows(dataset, capacity_chunks: int):
    """A shallow copy of a ``WindowDataset`` that reads its frames through a ``ChunkCache``."""
    ds = copy.copy(dataset)
    ds.store = ChunkCache(dataset.store, capacity_chunks)
    return ds


def disk_sampler(dataset, cache: ChunkCache, batch_size: int, world_size: int, rank: int, seed: int,
                 span_chunks: int = 4, buffer_spans: int = 8) -> ChunkLocalBatchSampler:
    """The chunk-local sampler for ``dataset``, aligned to the chunks of its frame camera."""
    f = cache.chunk_frames(dataset.frame_camera)
    return ChunkLocalBatchSampler(dataset._row, f, batch_size, world_size, rank, seed, span_chunks, buffer_spans)


def cache_capacity(span_chunks: int, buffer_spans: int, cameras: int) -> int:
    """Chunks to keep: the buffer's spans plus the next chunk of each (future frames), per camera, x2 slack."""
    return 2 * cameras * buffer_spans * (span_chunks + 1)
