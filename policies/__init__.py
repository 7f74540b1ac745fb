"""Policies: the interface every controller implements, and its implementations.

- :class:`Policy`, :class:`Chunk` (``base.py``): per-env action queues over batched chunk predictions,
  optional ACT-style temporal ensembling.
- :class:`VLAPolicy` (``vla_policy.py``): a trained checkpoint; normalization, plan decoding and
  flow-matching sampling happen inside; callers pass raw env observations.
- :class:`ExpertPolicy` (``expert.py``): the scripted experts of ``vla.envs`` (needs env infos).
- :class:`RemotePolicy` (``remote.py``): the client of ``vla serve``.
- ``make_policy`` / ``register_policy`` (``registry.py``): build any of them by name (``vla``,
  ``expert``, ``remote``) from the ``policy`` config group.

``VLAPolicy`` and ``RemotePolicy`` are imported on first use so that ``import vla.policies`` stays
light (no model or websocket import for a scripted-expert rollout).
"""

from __future__ import annotations

from typing import Any

from .base import Chunk, Observation, Policy
from .expert import ExpertPolicy
from .registry import list_policies, make_policy, register_policy

__all__ = ["Chunk", "ExpertPolicy", "Observation", "Policy", "RemotePolicy", "VLAPolicy", "list_policies",
           "make_policy", "register_policy"]


def __getattr__(name: str) -> Any:
    if name == "VLAPolicy":
        from .vla_policy import VLAPolicy

        return VLAPolicy
    if name == "RemotePolicy":
        from .remote import RemotePolicy

        return RemotePolicy
    raise AttributeError(f"module 'vla.policies' has no attribute {name!r}")
