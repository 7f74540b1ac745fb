"""The policy registry: every policy `vla eval`, `vla plan` and `vla serve` can build, by name.

    policy = make_policy({"name": "vla", "checkpoint": "outputs/.../run"})
    policy = make_policy({"name": "expert"}, family="metaworld")

An entry is a factory taking the keyword arguments of its ``configs/policy/<name>.yaml`` (the
``policy`` Hydra group) plus the context the command knows (``family``, the env family being
rolled out). Factories import their policy on first use, so registering costs nothing.
``tests/test_policy_contract.py`` runs one contract over every registered entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .base import Policy

_FACTORIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    """Decorator: register ``factory`` under ``name`` (names are unique)."""

    def add(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        if name in _FACTORIES:
            raise ValueError(f"policy '{name}' is already registered")
        _FACTORIES[name] = factory
        return factory

    return add


def list_policies() -> list[str]:
    return sorted(_FACTORIES)


def make_policy(cfg: Mapping[str, Any], **context: Any) -> Policy:
    """Build the policy ``cfg["name"]`` with the rest of ``cfg`` (and ``context``) as arguments."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in _FACTORIES:
        raise ValueError(f"policy: expected one of {list_policies()}, got {name!r}")
    return _FACTORIES[name](**cfg, **context)


@register_policy("vla")
def _vla(checkpoint: str | None = None, device: str = "cpu", use_ema: bool = True, n_action_steps: int | None = 8,
         replan_every: int | None = None, temporal_ensemble: float | None = None, num_flow_steps: int = 10,
         seed: int | None = 0, **_context: Any) -> Policy:
    if not checkpoint:
        raise ValueError("policy=vla needs checkpoint=PATH (a run dir, its checkpoints dir or a step folder)")
    from .vla_policy import VLAPolicy

    return VLAPolicy.from_checkpoint(str(checkpoint), device=device, n_action_steps=n_action_steps,
                                     replan_every=replan_every, temporal_ensemble=temporal_ensemble,
                                     num_flow_steps=num_flow_steps, seed=seed, use_ema=use_ema)


@register_policy("expert")
def _expert(family: str | None = None, task: str | None = None, **_context: Any) -> Policy:
    if not family:
        raise ValueError("policy=expert needs the env family (env=FAMILY): the scripted experts belong to it")
    from .expert import ExpertPolicy

    return ExpertPolicy(family, task)


@register_policy("remote")
def _remote(host: str = "127.0.0.1", port: int = 8000, n_action_steps: int | None = None,
            replan_every: int | None = None, temporal_ensemble: float | None = None, timeout: float = 30.0,
            api_key_file: str | None = None, **_context: Any) -> Policy:
    from .remote import RemotePolicy

    api_key = None
    if api_key_file:
        from vla.serving import read_api_key

        api_key = read_api_key(api_key_file)
    return RemotePolicy(host, int(port), n_action_steps=n_action_steps, replan_every=replan_every,
                        temporal_ensemble=temporal_ensemble, timeout=float(timeout), api_key=api_key)
