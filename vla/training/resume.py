"""Resume compatibility and RNG state: what a checkpoint must agree on to be continued, and the
random-generator states saved with it (for anything in the model that draws from global generators).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# Train-config keys that may change between a run and its resume without changing the result's meaning.
RESUMABLE_CHANGES = ("trainer.steps", "trainer.stop_at", "trainer.log_every", "trainer.ckpt_every",
                     "trainer.keep_last", "trainer.num_workers", "trainer.num_threads", "trainer.progress",
                     "trainer.val_every", "trainer.val_batches", "dataset.path", "dataset.in_memory",
                     "dataset.on_corrupt", "resume", "run_dir", "eval", "wandb", "device", "name", "output_root")


def compare_model_configs(new: dict[str, Any], old: dict[str, Any], where: str, what: str) -> None:
    """Refuse a checkpoint whose model config differs, naming each differing key with both values."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    diffs = [f"{k}: config {norm(new.get(k))!r} vs checkpoint {norm(old.get(k))!r}"
             for k in sorted(set(new) | set(old)) if norm(new.get(k)) != norm(old.get(k))]
    if diffs:
        raise ValueError(f"{what} {where}: checkpoint of a different model config: " + "; ".join(diffs))


def check_resume_train_config(cfg: DictConfig, old_train: dict, where: str) -> None:
    """Refuse to resume under a training config that differs from the checkpoint's in anything but
    :data:`RESUMABLE_CHANGES` (the model section is compared by :func:`compare_model_configs`)."""
    new = OmegaConf.to_container(cfg, resolve=True)

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    a, b = flat(new), flat(old_train)
    skip = ("model.",) + tuple(RESUMABLE_CHANGES)
    diffs = [f"{k}: now {a.get(k)!r} vs checkpoint {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if not any(k == s or k.startswith(s + ".") or (s.endswith(".") and k.startswith(s)) for s in skip)
             and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"resume {where}: checkpoint of a different training config: "
                         + "; ".join(diffs))


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def check_checkpoints(cfg: DictConfig, model_cfg: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(resume dir, init_from dir) of ``cfg``, each checked against the model config before step 1:
    resume needs the same model and training config, init_from the same state/action dims."""
    from vla import checkpoint as ckpt

    resume_dir = init_dir = None
    if cfg.get("resume"):
        resume_dir = ckpt.resolve_checkpoint(cfg.resume)
        old = ckpt.read_config(resume_dir)
        compare_model_configs(model_cfg, old["model"], str(resume_dir), "resume")
        check_resume_train_config(cfg, old.get("train") or {}, str(resume_dir))
    if cfg.get("init_from"):
        if resume_dir is not None:
            raise ValueError("resume and init_from are both set: resume continues a run, init_from starts one")
        init_dir = ckpt.resolve_checkpoint(cfg.init_from)
        old = ckpt.read_config(init_dir)
        dims = {k: (model_cfg.get(k), old["model"].get(k)) for k in ("state_dim", "action_dim")}
        bad = {k: v for k, v in dims.items() if v[0] != v[1]}
        if bad:
            detail = "; ".join(f"{k}: store/config {a} vs checkpoint {b}" for k, (a, b) in bad.items())
            raise ValueError(f"init_from {init_dir}: dimensions do not match the dataset: {detail}")
    return resume_dir, init_dir


def check_resume_state(st: dict[str, Any], where: str, *, total_steps: int, stop_at: int, num_samples: int,
                       world_size: int, optimizer_format: str, strategy: str) -> None:
    """Refuse a trainer state that this run cannot continue exactly, naming what differs."""
    step, data = int(st["step"]), st["data"]
    if step >= total_steps:
        raise ValueError(f"resume {where}: the checkpoint is at step {step}, trainer.steps={total_steps}; "
                         f"raise trainer.steps to train further")
    if step >= stop_at:
        raise ValueError(f"resume {where}: the checkpoint is at step {step} and trainer.stop_at={stop_at}; "
                         f"nothing to do (drop or raise trainer.stop_at)")
    if int(data["num_samples"]) != num_samples:
        raise ValueError(f"resume {where}: the dataset has {num_samples} windows, the checkpoint was trained on "
                         f"{data['num_samples']} (a different store or filter)")
    if int(data["world_size"]) != world_size:
        # The data position counts global batches, whose size is batch_size x world_size.
        raise ValueError(f"resume {where}: trained with {data['world_size']} processes, now {world_size}; "
                         f"resume with the same number of processes")
    if st.get("optimizer_format", "torch") != optimizer_format:
        raise ValueError(f"resume {where}: the optimizer state was saved under trainer.strategy="
                         f"'{st.get('strategy')}', this run uses '{strategy}'; resume with the same strategy")
