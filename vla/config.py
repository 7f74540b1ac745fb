"""Hydra config composition for every `vla` subcommand.

The configs live in the ``vla.configs`` package (folder ``configs/``), so they are found the
same way from an editable install and from a wheel. Commands compose with the Compose API
rather than ``@hydra.main`` so that one process can run several commands (tests do) and the
run directory is ours to lay out (``outputs/<date>/<time>_<name>/``).
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def config_dir() -> Path:
    """The folder holding the Hydra YAML files (works for editable installs and wheels)."""
    import vla.configs

    return Path(vla.configs.__file__).resolve().parent


# Keys that moved into the `policy` group (configs/policy/): the old top-level spelling still works,
# forwarded per command (in `vla plan`, `seed` is the env seed, not the policy's).
_POLICY_KEYS = ("checkpoint", "device", "use_ema", "n_action_steps", "replan_every", "temporal_ensemble",
                "num_flow_steps", "seed")
MOVED_KEYS: dict[str, dict[str, str]] = {
    "eval": {**{k: f"policy.{k}" for k in _POLICY_KEYS}, "max_steps": "max_episode_steps"},
    "serve": {k: f"policy.{k}" for k in _POLICY_KEYS if k != "temporal_ensemble"},
    "plan": {k: f"policy.{k}" for k in ("checkpoint", "device", "use_ema", "num_flow_steps")},
}


def forward_moved_keys(config_name: str, overrides: list[str]) -> list[str]:
    """``checkpoint=X`` -> ``++policy.checkpoint=X`` (and the like) for keys that moved; ``++``
    because the chosen policy's file may not have the key (``policy=expert checkpoint=...``)."""
    moved = MOVED_KEYS.get(config_name, {})
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key in moved:
            target = moved[key]
            o = f"++{target}={value}" if target.startswith("policy.") else f"{target}={value}"
        out.append(o)
    return out


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra command-line style overrides.

    Raises ``ValueError`` naming the config and the override when an override is malformed or
    names a key/group that does not exist.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = forward_moved_keys(config_name, list(overrides or []))
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"config '{config_name}' with overrides {overrides}: {e}") from None
    return cfg


def make_run_dir(cfg: DictConfig, command: str, root: str | os.PathLike | None = None) -> Path:
    """Create ``<root>/<date>/<time>_<name>/`` and write the resolved config into it.

    ``root`` defaults to ``cfg.output_root`` (``outputs``); ``name`` to ``cfg.name`` or the command.
    When ``cfg.run_dir`` is set, that exact folder is used instead (for scripts and tests).
    """
    fixed = cfg.get("run_dir")
    if fixed:
        run_dir = Path(fixed)
    else:
        root = Path(root or cfg.get("output_root") or "outputs")
        now = _dt.datetime.now()
        name = cfg.get("name") or command
        run_dir = root / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}_{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir
