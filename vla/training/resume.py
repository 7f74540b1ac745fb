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


# What `vla train resume=RUN_DIR KEY=VALUE ...` may change: bookkeeping that leaves every step's
# result as it was, plus trainer.steps (raised to train further: the cosine schedule then stretches
# from the resumed step on). Anything else (model, data, schedule, seed, augmentation) may only be
# repeated with the run's own value; a different value is refused by name.
RESUME_OVERRIDES = ("trainer.stop_at", "trainer.log_every", "trainer.ckpt_every", "trainer.keep_last",
                    "trainer.num_workers", "trainer.num_threads", "trainer.progress", "trainer.val_every",
                    "trainer.val_batches", "trainer.steps", "dataset.path", "dataset.in_memory", "run_dir", "eval",
                    "wandb", "device", "output_root", "name")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changeable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_OVERRIDES)


def resume_config(resume: str, overrides: list[str]) -> DictConfig:
    """The config to continue the run at ``resume`` with: the run's own saved train config, with
    ``overrides`` checked. Keys in :data:`RESUME_OVERRIDES` are applied; any other override (a key
    or a config group such as ``model=small``) must leave every key it sets at the run's saved
    value (so repeating the original command line works), else it is refused naming the key.

    ``trainer.stop_at`` of the saved run is dropped (the continued run goes to ``trainer.steps``)
    unless given again, and ``run_dir`` becomes the resumed run's folder (wherever it lies now).
    Keys added to ``configs/train.yaml`` after the run was saved take their defaults.
    """
    from vla import checkpoint as ckpt
    from vla.config import compose

    step_dir = ckpt.resolve_checkpoint(resume)
    saved = ckpt.read_config(step_dir).get("train")
    if not saved:
        raise ValueError(f"resume {step_dir}: config.json holds no training config (was it written by vla train?)")
    overrides = [o for o in overrides if not o.startswith("resume=")]
    path = saved.get("dataset", {}).get("path") or "unset"
    base_args = [f"dataset.path={path}"]
    base = compose("train", base_args)
    applied = [o for o in overrides if "=" in o and _changeable(o.partition("=")[0])]
    others = [o for o in overrides if o not in applied]
    if others:
        # What the other overrides set: the keys where composing with them differs from without.
        with_them = _flat(OmegaConf.to_container(compose("train", base_args + others), resolve=True))
        without = _flat(OmegaConf.to_container(base, resolve=True))
        was = _flat(saved)
        changed = sorted(k for k in set(with_them) | set(without) if with_them.get(k) != without.get(k)
                         and not _changeable(k) and with_them.get(k) != was.get(k))
        if changed:
            k = changed[0]
            raise ValueError(f"resume: '{k}' cannot change when resuming (it changes what the run computes: model, "
                             f"data or schedule): the run has {was.get(k)!r}, the override gives {with_them.get(k)!r}. "
                             f"Changeable: {', '.join(RESUME_OVERRIDES)}")
    OmegaConf.set_struct(base, False)
    model = saved.get("model")
    cfg = OmegaConf.merge(base, OmegaConf.create(saved))
    if model is not None:
        cfg.model = OmegaConf.create(model)  # exactly the saved model section, no preset defaults mixed in
    cfg.trainer.stop_at = None
    cfg.run_dir = str(step_dir.parent.parent)
    if applied:
        given = compose("train", base_args + applied)
        for o in applied:
            key = o.partition("=")[0]
            OmegaConf.update(cfg, key, OmegaConf.select(given, key), merge=False, force_add=False)
    if cfg.trainer.steps != saved.get("trainer", {}).get("steps"):
        print(f"resume: trainer.steps {saved['trainer']['steps']} -> {cfg.trainer.steps}: the learning-rate schedule "
              f"stretches from step {ckpt.read_config(step_dir).get('step')} on", flush=True)
    cfg.resume = str(step_dir)
    return cfg
