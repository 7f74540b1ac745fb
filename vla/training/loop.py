"""The training loop: one loop for every model variant (`vla train`; DESIGN.md §7).

``train(cfg) -> run_dir`` takes the composed ``configs/train.yaml`` and

1. checks everything that can be wrong before the first step (store, filters, batch size,
   dimensions of a checkpoint to resume or initialise from),
2. fills the data-dependent model fields (cameras, image size, state/action dims) from the store,
3. trains with AdamW (no decay on norms, biases, embeddings), linear warmup + cosine to
   ``min_lr``, gradient clipping (the norm is logged), an EMA of the weights, bf16 autocast on
   CUDA, image augmentation on the device,
4. runs under ``torchrun`` as DDP (or FSDP for base and larger presets on CUDA) with the same
   command, each rank reading its own slice of a deterministic global batch,
5. writes ``train.log`` / ``metrics.jsonl`` / TensorBoard (wandb optional) and atomic
   checkpoints (``vla.checkpoint``) that resume exactly.

Exact resume comes from one rule: nothing random depends on hidden state. The data order is a
seeded permutation per epoch plus a position counter; the augmentation parameters of step ``k``
are drawn for the whole global batch from a generator seeded with (seed, k) and each rank keeps
its slice (so they do not depend on the number of processes either); the global torch generator,
which the model uses for flow noise and time, is reseeded with (seed, k, rank) before step ``k``.
RNG states are saved and restored as well, for anything else that draws from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vla import checkpoint as ckpt
from vla import distributed as dist_utils
from vla.augment import AugmentConfig, augment_images, draw_params
from vla.datasets import collate_windows
from vla.ema import EMA

# Keys of the composed `model` group that describe the preset rather than VLAConfig fields.
MODEL_META_KEYS = ("preset", "name")
# Train-config keys that may change between a run and its resume without changing the result's meaning.
RESUMABLE_CHANGES = ("trainer.steps", "trainer.stop_at", "trainer.log_every", "trainer.ckpt_every",
                     "trainer.keep_last", "trainer.num_workers", "trainer.num_threads", "trainer.progress",
                     "trainer.val_every", "trainer.val_batches", "dataset.path", "dataset.in_memory",
                     "resume", "run_dir", "eval", "wandb", "device", "name", "output_root")


# --------------------------------------------------------------------------------------------
# Deterministic, resumable data order
# --------------------------------------------------------------------------------------------


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (same inputs, same seed, on every machine)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclasses.dataclass
class DataPosition:
    """Where the data stream stands: ``position`` global batches into ``epoch``."""

    epoch: int = 0
    position: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.position += 1
        if self.position >= batches_per_epoch:
            self.epoch += 1
            self.position = 0


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless stream of this rank's index lists; a seeded permutation per epoch, drop-last.

    Global batch ``g`` of an epoch is ``perm[g * B * W : (g + 1) * B * W]`` and rank ``r`` takes
    its ``r``-th block of ``B``, so W processes of B see exactly what one process of W * B sees.
    Starting at (epoch, position) continues a stopped run mid-epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int, seed: int,
                 start: DataPosition | None = None) -> None:
        self.n = int(num_samples)
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.start = dataclasses.replace(start) if start else DataPosition()
        self.global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = self.n // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(f"global batch {self.global_batch} is larger than the dataset ({self.n} windows)")

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5A3D, epoch))
        return torch.randperm(self.n, generator=g)  # (N,)

    def __iter__(self) -> Iterator[list[int]]:
        pos = dataclasses.replace(self.start)
        epoch, perm = -1, None
        while True:
            if pos.epoch != epoch:
                epoch, perm = pos.epoch, self.permutation(pos.epoch)
            lo = pos.position * self.global_batch + self.rank * self.batch_size
            yield perm[lo : lo + self.batch_size].tolist()
            pos.advance(self.batches_per_epoch)

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its own bookkeeping
        return sys.maxsize


# --------------------------------------------------------------------------------------------
# Schedule, optimizer
# --------------------------------------------------------------------------------------------


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def strip_wrapper_prefixes(name: str) -> str:
    """A parameter name without the path parts DDP / torch.compile / FSDP1 insert (``module.x`` -> ``x``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters without weight decay: biases, norm scales (ndim < 2) and embedding tables."""
    names: set[str] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim < 2 or isinstance(mod, nn.Embedding) or "embed" in full.lower() or "pos_" in full.lower():
                names.add(strip_wrapper_prefixes(full))
    return names


def build_optimizer(model: nn.Module, no_decay: set[str], tcfg: DictConfig) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if strip_wrapper_prefixes(name) in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(tcfg.weight_decay), "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return torch.optim.AdamW(groups, lr=float(tcfg.lr), betas=tuple(tcfg.betas), eps=float(tcfg.eps))


class LossModule(nn.Module):
    """Wraps the model so DDP/FSDP see ``compute_loss`` as ``forward`` (their gradient hooks need it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.compute_loss(batch)


# --------------------------------------------------------------------------------------------
# Data and model setup (everything checked before step 1)
# --------------------------------------------------------------------------------------------


def open_store(dcfg: DictConfig):
    """Open the episode store named by ``dataset.path`` or raise a ValueError naming it."""
    from vla.datasets import EpisodeStore

    path = dcfg.get("path")
    if path is None or OmegaConf.is_missing(dcfg, "path"):
        raise ValueError("dataset.path is required: the Zarr store written by `vla collect`")
    p = Path(str(path))
    if not p.exists():
        raise ValueError(f"dataset.path: store not found: {p}")
    try:
        store = EpisodeStore(str(p), in_memory=bool(dcfg.get("in_memory", True)))
    except ValueError as e:
        raise ValueError(f"dataset.path: cannot open store {p}: {e}") from None
    except Exception as e:  # noqa: BLE001 - zarr/OS errors of a corrupt store become one clear line
        raise ValueError(f"dataset.path: {p} is not a valid vla episode store ({type(e).__name__}: {e})") from None
    if store.num_episodes == 0:
        raise ValueError(f"dataset.path: store {p} has no episodes")
    return store


def select_episodes(store, dcfg: DictConfig) -> tuple[list[int], list[int]]:
    """(train, val) episode indices after the task filter and the validation hold-out."""
    tasks = list(dcfg.get("tasks") or [])
    all_tasks = list(store.episode_tasks)
    eps = [i for i, t in enumerate(all_tasks) if not tasks or t in tasks]
    if not eps:
        raise ValueError(
            f"dataset.tasks={tasks}: no episodes of these tasks in {dcfg.path} "
            f"(the store has tasks {sorted(set(all_tasks))})"
        )
    n_val = int(dcfg.get("val_episodes") or 0)
    if n_val < 0 or n_val >= len(eps):
        raise ValueError(f"dataset.val_episodes={n_val}: must be in [0, {len(eps) - 1}] for {len(eps)} episodes")
    return (eps[: len(eps) - n_val], eps[len(eps) - n_val :]) if n_val else (eps, [])


def build_model_config(mcfg: dict[str, Any], store, dcfg: DictConfig):
    """``VLAConfig`` from the composed ``model`` group with cameras, image size and dims from the store.

    ``dataset.cameras`` (if set) picks the cameras and ``dataset.frame_camera`` the future-frame camera.
    """
    from vla.model import VLAConfig

    d = {k: v for k, v in mcfg.items() if k not in MODEL_META_KEYS}
    if dcfg.get("cameras"):
        d["cameras"] = list(dcfg.cameras)
    if dcfg.get("frame_camera"):
        d["frame_camera"] = str(dcfg.frame_camera)
    try:
        return VLAConfig.from_store(d, store)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config (with dims from {dcfg.path}): {e}") from None


def compare_model_configs(new: dict[str, Any], old: dict[str, Any], where: str, what: str) -> None:
    """Refuse a checkpoint whose model config differs, naming each differing key with both values."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    diffs = [f"{k}: config {norm(new.get(k))!r} vs checkpoint {norm(old.get(k))!r}"
             for k in sorted(set(new) | set(old)) if norm(new.get(k)) != norm(old.get(k))]
    if diffs:
        raise ValueError(f"{what} {where}: checkpoint of a different model config: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class MetricLog:
    """train.log lines, metrics.jsonl, TensorBoard (always) and wandb (optional), rank 0 only."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.echo: Callable[[str], None] | None = None  # also show lines on the console (set by the loop)
        if not enabled:
            return
        self.text = open(run_dir / "train.log", "a")
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        w = cfg.get("wandb") or {}
        if w.get("enabled"):
            try:
                import wandb
            except ImportError:
                raise ValueError("wandb.enabled=true but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=w.get("project", "vla"), entity=w.get("entity"), mode=w.get("mode"),
                                    dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                                    name=run_dir.name)

    def line(self, msg: str) -> None:
        if self.enabled:
            self.text.write(msg + "\n")
            self.text.flush()
            if self.echo is not None:
                self.echo(msg)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        body = " ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        self.line(f"{prefix} step={step} {body}")
        self.jsonl.write(json.dumps({"split": prefix, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.text.close()
        self.jsonl.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------
# RNG state (saved for anything in the model that draws from global generators)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _worker_init(seed: int, epoch: int, rank: int):
    def init(worker_id: int) -> None:
        s = mix_seed(seed, epoch, rank, worker_id)
        random.seed(s)
        np.random.seed(s % (2**32))
        torch.manual_seed(s)

    return init


def _set_threads(tcfg: DictConfig, info: dist_utils.DistInfo) -> None:
    if info.device.type != "cpu":
        return
    n = int(tcfg.get("num_threads") or 0)
    if n <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def _use_bf16(tcfg: DictConfig, device: torch.device) -> bool:
    v = tcfg.get("bf16", "auto")
    if isinstance(v, str):
        if v != "auto":
            raise ValueError(f"trainer.bf16: expected auto|true|false, got '{v}'")
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(v)


class Trainer:
    """Holds everything one training run needs; ``run()`` trains and returns the run dir."""

    def __init__(self, cfg: DictConfig, info: dist_utils.DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.tcfg = cfg.trainer
        self.device = info.device
        self._setup()

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        from vla.datasets import WindowDataset
        from vla.model import VLA
        from vla.normalize import Normalizer
        from vla.processor import Processor
        from vla.tokenizer import ByteTokenizer

        cfg, tcfg, info = self.cfg, self.tcfg, self.info
        _set_threads(tcfg, info)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast use tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.seed = int(cfg.seed)
        self.total_steps = int(tcfg.steps)
        if self.total_steps < 1:
            raise ValueError(f"trainer.steps must be >= 1, got {self.total_steps}")
        self.stop_at = int(tcfg.stop_at) if tcfg.get("stop_at") is not None else self.total_steps
        self.batch_size = int(tcfg.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"trainer.batch_size must be >= 1, got {self.batch_size}")

        # 1. data
        dcfg = cfg.dataset
        self.store = open_store(dcfg)
        train_eps, val_eps = select_episodes(self.store, dcfg)
        mcfg = OmegaConf.to_container(cfg.model, resolve=True)
        self.model_cfg = build_model_config(mcfg, self.store, dcfg)
        self.model_cfg_dict = self.model_cfg.to_dict()
        mc = self.model_cfg
        for key in ("n_obs_steps", "horizon"):
            if int(dcfg[key]) != int(getattr(mc, key)):
                raise ValueError(f"dataset.{key}={dcfg[key]} but model.{key}={getattr(mc, key)}: they must match")
        win = dict(n_obs_steps=mc.n_obs_steps, horizon=mc.horizon, frame_offset=int(dcfg.frame_offset),
                   frame_camera=mc.frame_camera, cameras=list(mc.cameras))
        self.dataset = WindowDataset(self.store, episodes=train_eps, **win)
        self.val_dataset = WindowDataset(self.store, episodes=val_eps, **win) if val_eps else None
        global_batch = self.batch_size * info.world_size
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {dcfg.path}: no training windows in episodes {train_eps[:5]}...")
        if global_batch > len(self.dataset):
            raise ValueError(
                f"trainer.batch_size={self.batch_size} x {info.world_size} process(es) = {global_batch} is larger "
                f"than the dataset ({len(self.dataset)} windows in {len(train_eps)} episodes of {dcfg.path})"
            )

        # 2. the model config, checked against a checkpoint to resume or initialise from
        self.resume_dir: Path | None = None
        self.init_dir: Path | None = None
        if cfg.get("resume"):
            self.resume_dir = ckpt.resolve_checkpoint(cfg.resume)
            old = ckpt.read_config(self.resume_dir)
            compare_model_configs(self.model_cfg_dict, old["model"], str(self.resume_dir), "resume")
            self._check_resume_train_config(old.get("train") or {})
        if cfg.get("init_from"):
            if self.resume_dir is not None:
                raise ValueError("resume and init_from are both set: resume continues a run, init_from starts one")
            self.init_dir = ckpt.resolve_checkpoint(cfg.init_from)
            old = ckpt.read_config(self.init_dir)
            dims = {k: (self.model_cfg_dict.get(k), old["model"].get(k)) for k in ("state_dim", "action_dim")}
            bad = {k: v for k, v in dims.items() if v[0] != v[1]}
            if bad:
                detail = "; ".join(f"{k}: store/config {a} vs checkpoint {b}" for k, (a, b) in bad.items())
                raise ValueError(f"init_from {self.init_dir}: dimensions do not match the dataset: {detail}")

        # 3. processor (normalizer from the store's statistics) and model
        self.normalizer = Normalizer(self.store.stats, mode=str(dcfg.normalization))
        self.tokenizer = ByteTokenizer(self.model_cfg.action_bins)
        self.processor = Processor(self.model_cfg, self.normalizer, self.tokenizer)
        torch.manual_seed(mix_seed(self.seed, 0x1D17))  # same init on every rank
        model = VLA(self.model_cfg)
        if self.init_dir is not None:
            weights = ckpt.load_tensors(self.init_dir / "ema.safetensors")
            ckpt.load_weights_checked(model, weights, f"init_from {self.init_dir}")
        self.raw_model = model.to(self.device)
        no_decay = no_decay_names(model)
        n_params = sum(p.numel() for p in model.parameters())
        self.strategy = dist_utils.pick_strategy(str(tcfg.get("strategy", "auto")), n_params, info,
                                                 int(tcfg.get("fsdp_min_params", 100_000_000)))
        self.bf16 = _use_bf16(tcfg, self.device)
        loss_module = LossModule(self.raw_model)
        if tcfg.get("compile"):
            loss_module.compile()  # in place: parameter names (checkpoints, EMA) stay the same
        self.model = dist_utils.wrap_model(loss_module, self.strategy, info, bf16=self.bf16)
        self.optimizer = build_optimizer(self.model, {"model." + n for n in no_decay}, tcfg)
        ema_decay = float(tcfg.get("ema_decay") or 0.0)
        self.ema = EMA(self.model, decay=ema_decay, warmup=bool(tcfg.get("ema_warmup", True))) if ema_decay else None
        self.augment = AugmentConfig.from_dict(OmegaConf.to_container(tcfg.augment, resolve=True)
                                               if tcfg.get("augment") is not None else None)
        self.eval_every, self.eval_tasks = self._check_eval()
        self.step = 0
        self.saved_step = -1
        self.data_pos = DataPosition()
        self.sampler = ResumableBatchSampler(len(self.dataset), self.batch_size, info.world_size, info.rank, self.seed)
        if self.resume_dir is not None:
            self._load_resume_state()

    def _check_eval(self) -> tuple[int, list[str]]:
        """(every, tasks) of the periodic closed-loop evaluation, checked before training starts."""
        e = self.cfg.get("eval")
        every = int(e.get("every") or 0) if e is not None else 0
        if every <= 0:
            return 0, []
        if not e.get("env"):
            raise ValueError(f"eval.every={every} needs eval.env (the env family to roll out in, e.g. metaworld)")
        try:
            import vla.evaluation  # noqa: F401
            from vla.policies import VLAPolicy  # noqa: F401
        except ImportError as err:
            raise ValueError(f"eval.every={every}: closed-loop evaluation is not available in this build ({err})") \
                from None
        tasks = list(e.get("tasks") or self.cfg.dataset.get("tasks") or dict.fromkeys(self.store.episode_tasks))
        return every, tasks

    def _check_resume_train_config(self, old_train: dict) -> None:
        new = OmegaConf.to_container(self.cfg, resolve=True)

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
            raise ValueError(f"resume {self.resume_dir}: checkpoint of a different training config: "
                             + "; ".join(diffs))

    # -- checkpoint state ----------------------------------------------------------------------

    def _load_resume_state(self) -> None:
        d = self.resume_dir
        st = ckpt.load_trainer_state(d)
        step, data = int(st["step"]), st["data"]
        if step >= self.total_steps:
            raise ValueError(f"resume {d}: the checkpoint is at step {step}, trainer.steps={self.total_steps}; "
                             f"raise trainer.steps to train further")
        if step >= self.stop_at:
            raise ValueError(f"resume {d}: the checkpoint is at step {step} and trainer.stop_at={self.stop_at}; "
                             f"nothing to do (drop or raise trainer.stop_at)")
        if int(data["num_samples"]) != len(self.dataset):
            raise ValueError(f"resume {d}: the dataset has {len(self.dataset)} windows, the checkpoint was trained on "
                             f"{data['num_samples']} (a different store or filter)")
        if int(data["world_size"]) != self.info.world_size:
            # The data position counts global batches, whose size is batch_size x world_size.
            raise ValueError(f"resume {d}: trained with {data['world_size']} processes, now {self.info.world_size}; "
                             f"resume with the same number of processes")
        if st.get("optimizer_format", "torch") != self._optimizer_format():
            raise ValueError(f"resume {d}: the optimizer state was saved under trainer.strategy="
                             f"'{st.get('strategy')}', this run uses '{self.strategy}'; resume with the same strategy")

        live = {"model." + k: v for k, v in ckpt.load_tensors(d / "model.safetensors").items()}
        try:
            if self.ema is not None:
                # Load the EMA weights through the model so FSDP shards them exactly like the live ones.
                dist_utils.load_full_state_dict(self.model, {"model." + k: v for k, v in
                                                             ckpt.load_tensors(d / "ema.safetensors").items()})
                self.ema = EMA(self.model, decay=self.ema.decay, warmup=self.ema.warmup)
                self.ema.load_state_dict(st["ema"])
            dist_utils.load_full_state_dict(self.model, live)
            dist_utils.load_optimizer_state(self.model, self.optimizer, st["optimizer"])
        except (RuntimeError, KeyError) as e:  # a damaged checkpoint (the configs already matched)
            raise ValueError(f"resume {d}: the checkpoint does not load into this model: {e}") from None
        self.step = self.saved_step = step  # that checkpoint exists
        self.data_pos = DataPosition(int(data["epoch"]), int(data["position"]))
        self.sampler.start = dataclasses.replace(self.data_pos)
        rs = st["rng"]
        set_rng_state(rs[self.info.rank] if len(rs) > self.info.rank else rs[0])

    def _optimizer_format(self) -> str:
        return "fqn" if self.strategy == "fsdp" else "torch"

    def save(self, run_dir: Path) -> Path | None:
        """Write a checkpoint (collective under FSDP; rank 0 writes). Returns the step folder on rank 0."""
        live = dist_utils.full_state_dict(self.model, self.info)
        ema_sd = None
        if self.ema is not None:
            with self.ema.swapped_into(self.model):
                ema_sd = dist_utils.full_state_dict(self.model, self.info)
        optim = dist_utils.full_optimizer_state(self.model, self.optimizer)
        rng = rng_state()
        rngs = [rng]
        if self.info.distributed:
            import torch.distributed as dist

            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        out = None
        if self.info.is_main:
            strip = len("model.")
            state = {
                "step": self.step,
                "optimizer": optim,
                "optimizer_format": self._optimizer_format(),
                "strategy": self.strategy,
                "scheduler": {"name": "warmup_cosine", "step": self.step, "lr": float(self.tcfg.lr),
                              "min_lr": float(self.tcfg.min_lr), "warmup_steps": int(self.tcfg.warmup_steps),
                              "total_steps": self.total_steps},
                "ema": self.ema.state_dict() if self.ema is not None else {},
                "rng": rngs,
                "data": {"epoch": self.data_pos.epoch, "position": self.data_pos.position,
                         "num_samples": len(self.dataset), "world_size": self.info.world_size, "seed": self.seed},
            }
            out = ckpt.save_checkpoint(
                run_dir / "checkpoints", self.step,
                model_state={k[strip:]: v for k, v in live.items()},
                ema_state={k[strip:]: v for k, v in ema_sd.items()} if ema_sd is not None else None,
                config={"model": _jsonable(self.model_cfg_dict),
                        "train": OmegaConf.to_container(self.cfg, resolve=True)},
                normalizer=self.normalizer.to_dict(),
                tokenizer=self.tokenizer.to_dict(),
                trainer_state=state,
                keep_last=int(self.tcfg.keep_last),
            )
        dist_utils.barrier(self.info)
        return out

    # -- one step ------------------------------------------------------------------------------

    def _augment(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """Augment this rank's images with parameters drawn for the global batch of step ``step``."""
        if not self.augment.enabled:
            return images
        b, v = images.shape[:2]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 0xA11, step))
        params = draw_params(self.augment, b * self.info.world_size, v, gen)  # (B*W, V) each
        lo = self.info.rank * b
        return augment_images(images, self.augment, {k: p[lo : lo + b] for k, p in params.items()})

    def _prepare(self, raw: dict[str, Any], step: int) -> dict[str, Any]:
        batch = self.processor.training_batch(raw, self.device)
        batch["images"] = self._augment(batch["images"], step)  # (B, V, 3, H, W)
        return batch

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, raw: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on this rank's batch; returns float metrics (this rank's)."""
        step = self.step
        # Anything inside the model that uses the global generator is reproducible on resume.
        torch.manual_seed(mix_seed(self.seed, 0xB0B, step, self.info.rank))
        batch = self._prepare(raw, step)
        lr = lr_at(step, lr=float(self.tcfg.lr), min_lr=float(self.tcfg.min_lr),
                   warmup_steps=int(self.tcfg.warmup_steps), total_steps=self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        with self._autocast():
            losses = self.model(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()} ({_fmt_losses(losses)})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = float(self.tcfg.grad_clip or 0.0)
        max_norm = clip if clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.data_pos.advance(self.sampler.batches_per_epoch)
        out = {k: float(v.detach().float()) for k, v in losses.items() if torch.is_tensor(v)}
        out["grad_norm"] = float(gnorm)
        out["lr"] = lr
        return out

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Mean losses on up to ``val_batches`` fixed batches of the held-out episodes (fixed noise)."""
        if self.val_dataset is None:
            return {}
        n = len(self.val_dataset)
        bs = min(self.batch_size, n)
        nb = min(int(self.tcfg.get("val_batches", 4)), max(1, n // bs))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: nb * bs].tolist()
        sums: dict[str, float] = {}
        model = self.model
        model.eval()
        for b in range(nb):
            raw = collate_windows(self.val_dataset.__getitems__(idx[b * bs : (b + 1) * bs]))
            batch = self.processor.training_batch(raw, self.device)
            torch.manual_seed(mix_seed(self.seed, 0x7A1, b))  # the same flow noise at every validation
            with self._autocast():
                losses = model(batch)
            for k, v in losses.items():
                if torch.is_tensor(v):
                    sums[k] = sums.get(k, 0.0) + float(v.float()) / nb
        model.train()
        return sums

    # -- run -----------------------------------------------------------------------------------

    def loader(self):
        from torch.utils.data import DataLoader

        self.sampler.start = dataclasses.replace(self.data_pos)
        nw = int(self.tcfg.get("num_workers") or 0)
        kw: dict[str, Any] = {}
        if nw > 0:
            kw = {"worker_init_fn": _worker_init(self.seed, self.data_pos.epoch, self.info.rank),
                  "persistent_workers": False, "prefetch_factor": 4}
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=nw, collate_fn=collate_windows,
                          pin_memory=self.device.type == "cuda", **kw)

    def run(self, run_dir: Path) -> Path:
        info, tcfg = self.info, self.tcfg
        run_dir = Path(run_dir)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricLog(run_dir, self.cfg, enabled=info.is_main)
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        log.line(f"start step={self.step} steps={self.total_steps} params={n_params} strategy={self.strategy} "
                 f"world_size={info.world_size} device={self.device} bf16={self.bf16} windows={len(self.dataset)} "
                 f"resume={self.resume_dir}")
        bar = None
        if info.is_main and tcfg.get("progress", True):
            from tqdm import tqdm

            bar = tqdm(total=self.stop_at, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)
        # Metric lines reach the console too: above the bar, or plainly when there is no bar.
        log.echo = (lambda m: bar.write(m, file=sys.stderr)) if bar is not None else (lambda m: print(m, flush=True))
        log_every, ckpt_every = max(1, int(tcfg.log_every)), int(tcfg.ckpt_every or 0)
        val_every = int(tcfg.get("val_every") or 0) or ckpt_every
        eval_every = self.eval_every
        it = iter(self.loader())
        t_wait = t_side = 0.0
        t_start = time.perf_counter()
        n_seen = 0
        acc: dict[str, float] = {}
        acc_n = 0
        try:
            while self.step < self.stop_at:
                t0 = time.perf_counter()
                raw = next(it)
                t_wait += time.perf_counter() - t0
                metrics = self.train_step(raw)
                n_seen += self.batch_size * info.world_size
                for k, v in metrics.items():
                    acc[k] = acc.get(k, 0.0) + v
                acc_n += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.step % log_every == 0 or self.step == self.stop_at:
                    elapsed = time.perf_counter() - t_start - t_side  # training time only
                    m = dist_utils.all_reduce_mean(info, {k: v / acc_n for k, v in acc.items()})
                    m["lr"] = metrics["lr"]
                    m["samples_per_s"] = n_seen / max(elapsed, 1e-9)
                    m["data_wait_frac"] = t_wait / max(elapsed, 1e-9)
                    m["epoch"] = self.data_pos.epoch + self.data_pos.position / self.sampler.batches_per_epoch
                    log.log(self.step, m)
                    acc, acc_n, n_seen, t_wait, t_side, t_start = {}, 0, 0, 0.0, 0.0, time.perf_counter()
                t0 = time.perf_counter()
                if self.val_dataset is not None and val_every and self.step % val_every == 0:
                    log.log(self.step, dist_utils.all_reduce_mean(info, self.validation_loss()), prefix="val")
                if ckpt_every and self.step % ckpt_every == 0:
                    self._save_logged(run_dir, log)
                if eval_every and self.step % eval_every == 0:
                    if self.saved_step != self.step:
                        self._save_logged(run_dir, log)
                    self._closed_loop_eval(run_dir, log)
                t_side += time.perf_counter() - t0  # validation, checkpoints, eval: not training throughput
            if self.saved_step != self.step:
                self._save_logged(run_dir, log)
        except KeyboardInterrupt:
            if not info.distributed and self.step > 0:
                p = self.save(run_dir)
                log.line(f"interrupted step={self.step}; checkpoint {p}")
            raise
        finally:
            if bar is not None:
                bar.close()
            log.line(f"end step={self.step}")
            log.close()
        return run_dir

    def _save_logged(self, run_dir: Path, log: MetricLog) -> None:
        path = self.save(run_dir)
        self.saved_step = self.step
        if path is not None:
            log.line(f"checkpoint step={self.step} path={path}")

    def _closed_loop_eval(self, run_dir: Path, log: MetricLog) -> None:
        """Closed-loop rollouts of this step's checkpoint (rank 0) through ``vla.evaluation``."""
        if self.info.is_main:
            step_dir = run_dir / "checkpoints" / ckpt.step_dirname(self.step)
            out_dir = run_dir / "eval" / step_dir.name
            results = closed_loop_eval(step_dir, self.cfg, self.eval_tasks, out_dir, self.device)
            log.log(self.step, results, prefix="eval")
            log.line(f"eval step={self.step} results={out_dir / 'eval_info.json'}")
        dist_utils.barrier(self.info)


def closed_loop_eval(step_dir: Path, cfg: DictConfig, tasks: list[str], out_dir: Path,
                     device: torch.device) -> dict[str, float]:
    """Roll out checkpoint ``step_dir`` per the ``eval`` section; write eval_info.json; return success rates."""
    from vla.evaluation import run_evaluation, write_outputs
    from vla.policies import VLAPolicy

    e = OmegaConf.to_container(cfg.eval, resolve=True)
    policy = VLAPolicy.from_checkpoint(str(step_dir), device=str(device), num_flow_steps=int(e["num_flow_steps"]),
                                       n_action_steps=min(int(e["n_action_steps"]), int(cfg.model.horizon)))
    env_kwargs = dict(policy.env_kwargs())
    for k in ("cameras", "image_size"):
        if e.get(k) is not None:
            env_kwargs[k] = e[k]
    videos = int(e.get("videos") or 0)
    result = run_evaluation(policy, e["env"], tasks, int(e["episodes"]), n_envs=int(e["n_envs"]),
                            instruction_split=str(e["instruction_split"]), seed_start=e.get("seed_start"),
                            max_steps=e.get("max_episode_steps"), video_dir=out_dir if videos else None,
                            videos_per_task=videos, env_kwargs=env_kwargs, progress=False)
    write_outputs(result, out_dir, chart_title=f"{step_dir.parent.parent.name} {step_dir.name}")
    out = {"success_rate": float(result["overall"]["success_rate"])}
    for task, st in result["per_task"].items():
        out[f"success_rate/{task}"] = float(st["success_rate"])
    return out


def _fmt_losses(losses: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items() if torch.is_tensor(v))


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, tuple | list):
        return [_jsonable(v) for v in d]
    return d


def train(cfg: DictConfig) -> Path:
    """Train per ``cfg`` (composed ``configs/train.yaml``); return the run dir. Works under torchrun."""
    info = dist_utils.init(str(cfg.get("device", "auto")))
    trainer = None
    try:
        if cfg.get("resume") and not cfg.get("run_dir"):
            # Continue in the resumed run's folder (logs append, checkpoints continue).
            step_dir = ckpt.resolve_checkpoint(cfg.resume)
            cfg = cfg.copy()
            OmegaConf.set_struct(cfg, False)
            cfg.run_dir = str(step_dir.parent.parent)
        trainer = Trainer(cfg, info)
        run_dir = None
        if info.is_main:
            from vla.config import make_run_dir

            run_dir = make_run_dir(cfg, "train")
        run_dir = Path(dist_utils.broadcast_object(info, str(run_dir) if run_dir else None))
        return trainer.run(run_dir)
    finally:
        # Release the DDP/FSDP wrappers (they hold the process group) before the group is destroyed:
        # a gloo group freed after destroy_process_group can hang joining its worker threads.
        del trainer
        gc.collect()
        dist_utils.shutdown(info)
