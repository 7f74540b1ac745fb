"""Checkpoint folders: atomic writes, `last` pointer, pruning, and loading a policy bundle.

Layout (docs/architecture.md, docs/contracts.md)::

    run_dir/checkpoints/
        step_0000100/
            model.safetensors    live weights
            ema.safetensors      EMA weights (policies load these by default)
            config.json          {"model": VLAConfig dict, "train": resolved train config, "step": ...}
            normalizer.json      statistics + mode (vla.normalize.Normalizer)
            tokenizer.json       vla.tokenizer.ByteTokenizer
            trainer_state.pt     optimizer, scheduler, EMA counters, RNG states, data position;
                                 tensors and primitive containers only (torch.load(weights_only=True))
        last                     text file naming the newest step folder

A step folder is written under a temporary name, every file fsynced, then renamed into place,
so a crash never leaves a half-written ``step_*``; ``last`` is replaced atomically after the
rename. Pruning renames a step folder out of the ``step_*`` names before deleting it, so a kill
mid-prune never leaves a partial one. Temp leftovers of a writer killed mid-write or mid-prune
(``.tmp_step_*_<pid>``, ``.prune_step_*_<pid>``, ``.last_<pid>``) are removed at the run's next
write or resume once their pid is gone. Nothing here unpickles
arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

FORMAT = "vla.checkpoint"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "ema.safetensors", "config.json", "normalizer.json", "tokenizer.json", "trainer_state.pt")
# What a policy needs (evaluation, serving, planning): a step folder without the optimizer state still loads
# as a policy (e.g. one copied off a training machine without it), never for resuming.
POLICY_FILES = tuple(f for f in FILES if f != "trainer_state.pt")


def step_dirname(step: int) -> str:
    return f"step_{int(step):07d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    # Clone: tied weights share storage, which safetensors refuses; contiguous CPU copies are always fine.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a name -> tensor dict."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    return load_file(str(path), device=str(device))


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    config: dict[str, Any],
    normalizer: dict[str, Any],
    tokenizer: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``ckpt_root/step_XXXXXXX`` atomically, point ``last`` at it, prune to ``keep_last``.

    ``normalizer``/``tokenizer`` are JSON-ready dicts; ``trainer_state`` holds tensors and primitive
    containers only. Returns the final step folder.
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temp(root)  # leftovers of an earlier writer of this run killed mid-write
    final = root / step_dirname(step)
    tmp = root / f".tmp_{step_dirname(step)}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": FORMAT, "step": str(int(step))}
    _save_tensors(model_state, tmp / "model.safetensors", meta)
    _save_tensors(ema_state if ema_state is not None else model_state, tmp / "ema.safetensors", meta)
    cfg = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), **config}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False))
    (tmp / "normalizer.json").write_text(json.dumps(normalizer))
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for name in FILES:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        _remove_step_dir(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    last_tmp = root / f".last_{os.getpid()}"
    last_tmp.write_text(final.name + "\n")
    _fsync_file(last_tmp)
    os.replace(last_tmp, root / "last")
    _fsync_dir(root)
    prune_checkpoints(root, keep_last)
    return final


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def clean_stale_temp(ckpt_root: str | os.PathLike) -> list[str]:
    """Remove ``.tmp_step_*_<pid>`` / ``.prune_step_*_<pid>`` folders and ``.last_<pid>`` files left by
    writers killed mid-write or mid-prune.

    Only leftovers whose pid is no longer alive go: a writer still running keeps its temp folder.
    Returns the names removed. Called at every checkpoint write and when a run is resumed.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        if not p.name.startswith((".tmp_step_", ".last_", ".prune_step_")):
            continue
        pid = p.name.rsplit("_", 1)[-1]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return sorted(removed)


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete step folders under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def prune_checkpoints(ckpt_root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders (``keep_last <= 0`` keeps everything)."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        _remove_step_dir(p)


def _remove_step_dir(p: Path) -> None:
    """Delete a step folder so that a kill midway never leaves a partial ``step_*``: rename it out of
    the ``step_*`` namespace first (atomic), then delete (a leftover is cleaned like a temp folder)."""
    gone = p.parent / f".prune_{p.name}_{os.getpid()}"
    os.replace(p, gone)
    shutil.rmtree(gone, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = FILES) -> Path:
    """Find the step folder for a run dir, its ``checkpoints`` dir, or a step folder itself, and check that
    it holds the ``required`` files (default: all of them, as resuming needs)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint path does not exist: {p}")
    if (p / "model.safetensors").is_file() or ((p / "config.json").is_file() and p.name.startswith("step_")):
        step_dir = p
    else:
        root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        last = root / "last"
        step_dir = None
        if last.exists():
            name = last.read_text().strip() if last.is_file() else os.readlink(last)
            cand = root / Path(name).name
            if cand.is_dir():
                step_dir = cand
        if step_dir is None:
            found = list_checkpoints(root)
            if not found:
                raise ValueError(
                    f"no checkpoint under {p}: expected a run dir with checkpoints/, a checkpoints dir "
                    f"with step_* folders, or a step folder with model.safetensors"
                )
            step_dir = found[-1]
    missing = [f for f in required if not (step_dir / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {step_dir} is incomplete: missing {missing}")
    return step_dir


def read_config(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a step folder, checked for format."""
    path = Path(step_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read checkpoint config {path}: {e}") from None
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format '{FORMAT}', got {cfg.get('format')!r}")
    if int(cfg.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {cfg.get('version')} is newer than this vla "
            f"(reads up to {FORMAT_VERSION}); upgrade vla"
        )
    if "model" not in cfg:
        raise ValueError(f"{path}: no 'model' section (model config)")
    return cfg


def read_json(step_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    path = Path(step_dir) / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def load_trainer_state(step_dir: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.pt`` loaded without unpickling objects (weights_only=True)."""
    path = Path(step_dir) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt/foreign file
        raise ValueError(f"cannot load trainer state {path}: {e}") from None


def load_policy_bundle(path: str | os.PathLike, device: str | torch.device = "cpu", use_ema: bool = True):
    """Load ``(model, processor, config_dict)`` from a run dir, a checkpoints dir or a step folder.

    The model is in eval mode on ``device`` with the EMA weights (``use_ema=False``: live weights).
    ``config_dict`` is the checkpoint's ``config.json`` (keys ``model``, ``train``, ``step``).
    """
    from vla.model import VLA
    from vla.normalize import Normalizer
    from vla.processor import Processor
    from vla.tokenizer import ByteTokenizer

    step_dir = resolve_checkpoint(path, required=POLICY_FILES)
    cfg = read_config(step_dir)
    model_cfg = model_config_from_dict(cfg["model"])
    try:
        model = VLA(model_cfg)
    except ModuleNotFoundError as e:  # e.g. text=minilm without its package
        raise ModuleNotFoundError(f"checkpoint {step_dir} (text={model_cfg.text}) cannot be loaded: {e}") from None
    weights = load_tensors(step_dir / ("ema.safetensors" if use_ema else "model.safetensors"))
    load_weights_checked(model, weights, step_dir)
    model.to(device).eval()
    normalizer = Normalizer.from_dict(read_json(step_dir, "normalizer.json"))
    tokenizer = ByteTokenizer.from_dict(read_json(step_dir, "tokenizer.json"))
    processor = Processor(model_cfg, normalizer, tokenizer)
    return model, processor, cfg


def model_config_from_dict(d: dict[str, Any]):
    """``VLAConfig`` from its saved dict (refuses keys this version does not know)."""
    from vla.model import VLAConfig

    try:
        return VLAConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint model config: {e}") from None


def load_weights_checked(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Any) -> None:
    """``load_state_dict(strict)`` with a message naming the first mismatching tensors and ``where``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(weights[k].shape)}"
        for k in sorted(set(own) & set(weights))
        if own[k].shape != weights[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ValueError(f"weights from {where} do not fit the model: " + ", ".join(parts))
    model.load_state_dict(weights)
