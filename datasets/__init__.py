"""vla.datasets: the Zarr v3 demonstration store and the training-window sampler.

- ``EpisodeWriter``  create/append a store; atomic episode appends, strict validation
- ``EpisodeStore``   read it: episodes, rows, string tables, normalization statistics
- ``verify_store``   read every chunk, report damage with its episodes, optionally repair safely
- ``import_lerobot`` / ``export_lerobot`` (``vla.datasets.lerobot``) LeRobotDataset v3 in and out
- ``WindowDataset``  torch Dataset of (history, action chunk, plan text, future frame) windows
- ``collate_windows`` the fast collate for ``WindowDataset`` batches

The on-disk layout is documented in ``vla.datasets.store`` and docs/architecture.md ("Store schema").
The sampler names load lazily so that writing a store (collection workers) never imports torch.
"""

from typing import Any

from vla.datasets.stats import compute_stats, guard_stats
from vla.datasets.store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    EpisodeStore,
    EpisodeWriter,
    StoreError,
    verify_store,
)

_SAMPLER_NAMES = ("WindowDataset", "WindowBatch", "collate_windows")

__all__ = [
    "EpisodeWriter",
    "EpisodeStore",
    "WindowDataset",
    "WindowBatch",
    "verify_store",
    "StoreError",
    "collate_windows",
    "compute_stats",
    "guard_stats",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]


def __getattr__(name: str) -> Any:
    if name in _SAMPLER_NAMES:
        from vla.datasets import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'vla.datasets' has no attribute '{name}'")
