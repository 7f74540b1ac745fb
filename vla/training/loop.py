"""The training loop: one loop for every model variant (`vla train`).

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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vla import checkpoint as ckpt
from vla.evaluation.checkpoint import eval_schedule
from vla.flops import chunk_flops
from vla.training import chunk_loader, guard
from vla.training import distributed as dist_utils
from vla.training.augment import AugmentConfig, augment_images, draw_params
from vla.training.budget import TimeBudget
from vla.training.data import build_model_config, open_store, select_episodes, store_camera_projection
from vla.training.data_order import DataPosition, ResumableBatchSampler, mix_seed, sample_weights, worker_init
from vla.training.ema import EMA
from vla.training.metrics import MeanAccumulator, MetricLog, fmt_losses, jsonable, per_task_means, write_run_info
from vla.training.optim import LossModule, build_optimizer, lr_at
from vla.training.resume import check_checkpoints, check_resume_state, rng_state, set_rng_state
from vla.training.validation import validation_losses

# --------------------------------------------------------------------------------------------
# The loop (data order, optimizer, data set-up, resume checks and logging live beside this file)
# --------------------------------------------------------------------------------------------


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
        dist_utils.set_threads(tcfg.get("num_threads"), info)
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
        # Corrupt chunks met while training: skip their episodes (counted) or stop with a checkpoint.
        self.train_data = guard.GuardedWindows(self.dataset if self.store.in_memory else chunk_loader.cached_windows(
            self.dataset, chunk_loader.cache_capacity(4, 8, len(self.dataset.cameras))),
            guard.on_corrupt_mode(dcfg.get("on_corrupt")))
        self.val_data = guard.GuardedWindows(self.val_dataset, self.train_data.mode) if val_eps else None
        self.skipped: dict[int, str] = {}
        global_batch = self.batch_size * info.world_size
        if len(self.dataset) == 0:
            raise ValueError(f"dataset {dcfg.path}: no training windows in episodes {train_eps[:5]}...")
        if global_batch > len(self.dataset):
            raise ValueError(
                f"trainer.batch_size={self.batch_size} x {info.world_size} process(es) = {global_batch} is larger "
                f"than the dataset ({len(self.dataset)} windows in {len(train_eps)} episodes of {dcfg.path})"
            )

        # 2. the model config, checked against a checkpoint to resume or initialise from
        self.resume_dir, self.init_dir = check_checkpoints(cfg, self.model_cfg_dict)
        # 3. processor (normalizer from the store's statistics) and model
        self.normalizer = Normalizer(self.store.stats, mode=str(dcfg.normalization))
        self.tokenizer = ByteTokenizer(self.model_cfg.action_bins)
        self.processor = Processor(self.model_cfg, self.normalizer, self.tokenizer)
        if self.model_cfg.goal_patch_loss_weight > 0:
            self.processor.goal_camera = store_camera_projection(self.store, self.model_cfg.cameras[0],
                                                                 self.model_cfg.image_hw)
        torch.manual_seed(mix_seed(self.seed, 0x1D17))  # same init on every rank
        model = VLA(self.model_cfg)
        if self.init_dir is not None:
            weights = ckpt.load_tensors(self.init_dir / "ema.safetensors")
            ckpt.load_weights_checked(model, weights, f"init_from {self.init_dir}")
        self.raw_model = model.to(self.device)
        n_params = sum(p.numel() for p in model.parameters())
        self.strategy = dist_utils.pick_strategy(str(tcfg.get("strategy", "auto")), n_params, info,
                                                 int(tcfg.get("fsdp_min_params", 100_000_000)))
        self.bf16 = dist_utils.use_bf16(tcfg.get("bf16", "auto"), self.device)
        loss_module = LossModule(self.raw_model)
        if tcfg.get("compile"):
            loss_module.compile()  # in place: parameter names (checkpoints, EMA) stay the same
        self.model = dist_utils.wrap_model(loss_module, self.strategy, info, bf16=self.bf16)
        # FSDP2 shards parameters in place and DDP keeps them, so the raw model's groups hold the live ones.
        self.optimizer = build_optimizer(self.raw_model, tcfg)
        ema_decay = float(tcfg.get("ema_decay") or 0.0)
        self.ema = EMA(self.model, decay=ema_decay, warmup=bool(tcfg.get("ema_warmup", True))) if ema_decay else None
        self.augment = AugmentConfig.from_dict(OmegaConf.to_container(tcfg.augment, resolve=True)
                                               if tcfg.get("augment") is not None else None)
        self.goal_frames, self.goal_frames_batch = self._open_goal_frames(dcfg, train_eps)
        self._encode_instructions_once(train_eps)
        self.eval_every, self.eval_tasks = eval_schedule(cfg, self.store)
        self.step = 0
        self.saved_step = -1
        self.data_pos = DataPosition()
        self.sampler = self._make_sampler("random" if self.store.in_memory else "chunked")
        if self.resume_dir is not None:
            self._load_resume_state()

    # -- checkpoint state ----------------------------------------------------------------------

    def _load_resume_state(self) -> None:
        d = self.resume_dir
        if self.info.is_main:
            ckpt.clean_stale_temp(d.parent)  # temp folders of the killed run's last write
        st = ckpt.load_trainer_state(d)
        step, data = int(st["step"]), st["data"]
        check_resume_state(st, str(d), total_steps=self.total_steps, stop_at=self.stop_at,
                           num_samples=len(self.dataset), world_size=self.info.world_size,
                           optimizer_format=self._optimizer_format(), strategy=self.strategy)
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
        if data.get("order", "random") != self.order:  # continue in the checkpoint's data order
            self.sampler = self._make_sampler(data.get("order", "random"))
        self.sampler.start = dataclasses.replace(self.data_pos)
        rs = st["rng"]
        set_rng_state(rs[self.info.rank] if len(rs) > self.info.rank else rs[0])

    def _open_goal_frames(self, dcfg, train_eps: list[int]):
        """``dataset.goal_frames`` (a store of `vla collect goal_frames=N`) and how many join each batch."""
        path = dcfg.get("goal_frames")
        if not path:
            return None, 0
        from vla.datasets.goal_frames import GoalFrames

        n = dcfg.get("goal_frames_batch", 16)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"dataset.goal_frames_batch must be an int >= 1 (goal frames per batch), got {n!r}")
        if self.model_cfg.goal_loss_weight <= 0:
            raise ValueError(f"dataset.goal_frames={path} trains only the goal head: set model.goal_loss_weight > 0 "
                             f"(got {self.model_cfg.goal_loss_weight})")
        frames = GoalFrames(str(path))
        tasks = [self.store.episode_tasks[i] for i in train_eps]
        frames.check_compatible(self.store, self.model_cfg.cameras, tasks)
        if n > len(frames):
            raise ValueError(f"dataset.goal_frames_batch={n} is larger than the {len(frames)} frames of {path}")
        if self.model_cfg.planner:  # every plan must be expressible before step 1 (word plans copy from the text)
            self.processor.tokenize_plans(frames.plans, "cpu", frames.instructions)
        return frames, int(n)

    def _encode_instructions_once(self, train_eps: list[int]) -> None:
        """A frozen pretrained text encoder memoizes each distinct instruction (`VLA.encode_instruction`):
        fill that memo with every instruction of the training episodes and goal frames before step 1,
        exactly as the steps would (same tokens, device and autocast), so that step times are steady
        from the start (``trainer.time_budget_s`` times steps 10-30, which otherwise ran the encoder for
        each new paraphrase and read ~20 % slow, cutting the schedule short)."""
        if self.model_cfg.text != "minilm" or self.model_cfg.text_finetune:
            return
        episode_texts = self.store.episode_instructions
        texts = {episode_texts[i] for i in train_eps}
        if self.goal_frames is not None:
            texts |= set(self.goal_frames.instructions)
        ordered = sorted(texts)
        with torch.no_grad(), self._autocast():
            for k in range(0, len(ordered), 64):
                ids, mask = self.processor.tokenize_instructions(ordered[k:k + 64], self.device)
                self.raw_model.encode_instruction(ids, mask)

    def _with_goal_frames(self, raw: dict[str, Any], step: int) -> dict[str, Any]:
        """This step's batch plus ``goal_frames_batch`` goal frames, drawn by (seed, step, rank)."""
        if self.goal_frames is None:
            return raw
        from vla.datasets.goal_frames import concat_batches

        rng = np.random.default_rng([self.seed, 0x60A1, step, self.info.rank])
        idx = rng.choice(len(self.goal_frames), self.goal_frames_batch, replace=False)
        mc = self.model_cfg
        extra = self.goal_frames.batch(idx, list(mc.cameras), mc.n_obs_steps, mc.horizon, mc.action_dim,
                                       mc.frame_camera)
        return concat_batches(raw, extra)

    def _make_sampler(self, order: str) -> ResumableBatchSampler:
        """The data order: a permutation of all windows ("random"), or chunk-local for a store on disk."""
        args = (self.batch_size, self.info.world_size, self.info.rank, self.seed)
        self.order = order
        weights = sample_weights(self.cfg.dataset, self.dataset)
        if order == "chunked":
            if weights is not None:
                raise ValueError(f"dataset.balance={self.cfg.dataset.balance} needs the in-memory loader "
                                 "(dataset.in_memory=true); the disk loader reads chunk by chunk")
            return chunk_loader.disk_sampler(self.dataset, chunk_loader.ChunkCache(self.store, 0), *args)
        return ResumableBatchSampler(len(self.dataset), *args, weights=weights)

    def _optimizer_format(self) -> str:
        return "fqn" if self.strategy == "fsdp" else "torch"

    def save(self, run_dir: Path) -> Path | None:
        """Write a checkpoint (collective under FSDP; rank 0 writes). Returns the step folder on rank 0."""
        live = dist_utils.full_state_dict(self.model, self.info)
        guard.check_state_finite(live, "the live weights", self.step)  # a NaN checkpoint is never written
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
                "ema": self.ema.state_dict() if self.ema is not None else {},
                "rng": rngs,
                "data": {"epoch": self.data_pos.epoch, "position": self.data_pos.position,
                         "num_samples": len(self.dataset), "world_size": self.info.world_size, "seed": self.seed,
                         "order": self.order},
            }
            out = ckpt.save_checkpoint(
                run_dir / "checkpoints", self.step,
                model_state={k[strip:]: v for k, v in live.items()},
                ema_state={k[strip:]: v for k, v in ema_sd.items()} if ema_sd is not None else None,
                config={"model": jsonable(self.model_cfg_dict),
                        "train": OmegaConf.to_container(self.cfg, resolve=True),
                        "env_options": self.store.env_options,
                        # so the checkpoint evaluates without its store (copied off the training machine)
                        "store": {"env": self.store.env, "tasks": list(dict.fromkeys(self.store.episode_tasks))}},
                normalizer=self.normalizer.to_dict(),
                tokenizer=self.tokenizer.to_dict(),
                trainer_state=state,
                keep_last=int(self.tcfg.keep_last),
            )
        dist_utils.barrier(self.info)
        return out

    # -- one step ------------------------------------------------------------------------------

    def _augment(self, images: torch.Tensor, step: int,
                 goal_pixel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment this rank's images with parameters drawn for the global batch of step ``step``; a
        ``goal_pixel`` (B, 2) in the first camera moves with that camera's random shift."""
        if not self.augment.enabled:
            return images, goal_pixel
        b, v = images.shape[:2]
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 0xA11, step))
        params = draw_params(self.augment, b * self.info.world_size, v, gen)  # (B*W, V) each
        lo = self.info.rank * b
        params = {k: p[lo : lo + b] for k, p in params.items()}
        if goal_pixel is not None and int(self.augment.shift) > 0:
            s = int(self.augment.shift)
            d = torch.stack([params["dx"][:, 0], params["dy"][:, 0]], -1)  # (B, 2) crop offsets in [0, 2s]
            goal_pixel = goal_pixel - (d - s).to(goal_pixel)  # out[r] = in[r + d - s]: content moves by s - d
        return augment_images(images, self.augment, params), goal_pixel

    def _prepare(self, raw: dict[str, Any], step: int) -> dict[str, Any]:
        batch = self.processor.training_batch(raw, self.device)
        batch["images"], pixel = self._augment(batch["images"], step, batch.get("goal_pixel"))  # (B, V, 3, H, W)
        if pixel is not None:
            batch["goal_pixel"] = pixel
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
        n_demo = len(raw["task"])
        batch = self._prepare(self._with_goal_frames(raw, step), step)
        lr = lr_at(step, lr=float(self.tcfg.lr), min_lr=float(self.tcfg.min_lr),
                   warmup_steps=int(self.tcfg.warmup_steps), total_steps=self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        with self._autocast():
            losses = self.model(batch)
        loss = losses["loss"]
        guard.check_finite(step, "the loss", loss, raw, lambda: fmt_losses(losses))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = float(self.tcfg.grad_clip or 0.0)
        max_norm = clip if clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        guard.check_finite(step, "the gradient norm", gnorm, raw)  # before the step: weights stay finite
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.data_pos.advance(self.sampler.batches_per_epoch)
        out = {k: float(v.detach().float()) for k, v in losses.items() if torch.is_tensor(v) and v.ndim == 0}
        # Per-task losses (single process only: ranks' batches hold different tasks, so keys would differ).
        if "action_loss_per_sample" in losses and not self.info.distributed and len(set(raw["task"])) > 1:
            out.update(per_task_means(raw["task"], losses["action_loss_per_sample"][:n_demo]))
        out["grad_norm"] = float(gnorm)
        out["lr"] = lr
        return out

    def validation_loss(self) -> dict[str, float]:
        """Mean losses on up to ``val_batches`` fixed batches of the held-out episodes (fixed noise)."""
        if self.val_dataset is None:
            return {}
        return validation_losses(self.model, self.val_data, self.processor, self.device, self.batch_size,
                                 int(self.tcfg.get("val_batches", 4)), self.seed, self._autocast)

    # -- run -----------------------------------------------------------------------------------

    def loader(self):
        from torch.utils.data import DataLoader

        self.sampler.start = dataclasses.replace(self.data_pos)
        nw = int(self.tcfg.get("num_workers") or 0)
        kw: dict[str, Any] = {}
        if nw > 0:
            kw = {"worker_init_fn": worker_init(self.seed, self.data_pos.epoch, self.info.rank),
                  "persistent_workers": False, "prefetch_factor": 4}
        return DataLoader(self.train_data, batch_sampler=self.sampler, num_workers=nw,
                          collate_fn=guard.collate_guarded,
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
                 f"resume={self.resume_dir} on_corrupt={self.train_data.mode}")
        if getattr(self.store, "open_note", None):
            log.line(self.store.open_note)
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
        budget = TimeBudget.from_config(tcfg, self.resume_dir)
        flops, t_run, eval_s = None, time.perf_counter(), 0.0  # eval_s: closed-loop evaluations inside the run
        t_wait = t_side = 0.0
        t_start = time.perf_counter()
        n_seen = 0
        acc = MeanAccumulator()
        try:
            while self.step < self.stop_at:
                t0 = time.perf_counter()
                try:
                    raw = next(it)
                except (guard.CorruptDataError, guard.StoreError) as e:
                    self._stop_on_corrupt(run_dir, log, e)
                guard.note_skipped(raw, self.skipped, self.step, log.line)
                t_wait += time.perf_counter() - t0
                if flops is None and not info.distributed:  # FLOPs of one inference chunk, for `vla report`
                    first = self.processor.training_batch(raw, self.device)
                    flops = chunk_flops(self.raw_model, first, raw["instruction"])
                metrics = self.train_step(raw)
                if budget is not None and (fit := budget.after_step(self.step, info, self.total_steps)):
                    self.total_steps = self.stop_at = fit  # the schedule now spans what fits the budget
                    log.line(f"time budget {budget.budget_s:.0f} s: spent at step {fit}, stopping here (the probe's "
                             f"{budget.rate:.2f} steps/s was optimistic)" if budget.spent else
                             f"time budget {budget.budget_s:.0f} s: {budget.rate:.2f} steps/s -> steps={fit}"
                             + (" (planned again at this step from its rate since the probe)"
                                if budget.first_rate is not None else ""))
                    if bar is not None:
                        bar.total = fit
                n_seen += self.batch_size * info.world_size
                acc.add(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.step % log_every == 0 or self.step == self.stop_at:
                    elapsed = time.perf_counter() - t_start - t_side  # training time only
                    m = dist_utils.all_reduce_mean(info, acc.means())
                    m["lr"] = metrics["lr"]
                    m["samples_per_s"] = n_seen / max(elapsed, 1e-9)
                    m["data_wait_frac"] = t_wait / max(elapsed, 1e-9)
                    m["skipped_episodes"] = len(self.skipped)
                    m["epoch"] = self.data_pos.epoch + self.data_pos.position / self.sampler.batches_per_epoch
                    log.log(self.step, m)
                    acc.reset()
                    n_seen, t_wait, t_side, t_start = 0, 0.0, 0.0, time.perf_counter()
                t0 = time.perf_counter()
                if self.val_dataset is not None and val_every and self.step % val_every == 0:
                    try:
                        log.log(self.step, dist_utils.all_reduce_mean(info, self.validation_loss()), prefix="val")
                    except (guard.CorruptDataError, guard.StoreError) as e:
                        self._stop_on_corrupt(run_dir, log, e)
                if ckpt_every and self.step % ckpt_every == 0:
                    self._save_logged(run_dir, log)
                if eval_every and self.step % eval_every == 0:
                    if self.saved_step != self.step:
                        self._save_logged(run_dir, log)
                    t_eval = time.perf_counter()
                    self._closed_loop_eval(run_dir, log)
                    eval_s += time.perf_counter() - t_eval
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
            wall = time.perf_counter() - t_run - eval_s  # training only: a sweep's in-run evals are not its cost
            log.line(f"end step={self.step} wall_s={wall:.1f} eval_s={eval_s:.1f}")
            if info.is_main:
                write_run_info(run_dir, params=n_params, steps=self.step, wall_s=wall, eval_s=eval_s,
                               flops_per_chunk=flops)
            log.close()
        return run_dir

    def _save_logged(self, run_dir: Path, log: MetricLog) -> None:
        path = self.save(run_dir)
        self.saved_step = self.step
        if path is not None:
            log.line(f"checkpoint step={self.step} path={path}")

    def _stop_on_corrupt(self, run_dir: Path, log: MetricLog, e: Exception) -> None:
        """Checkpoint the last completed step (the failed batch is not consumed) and stop, naming the data."""
        if self.step > 0 and self.saved_step != self.step:
            self._save_logged(run_dir, log)
        guard.stop_on_corrupt(self.step, e, run_dir / "checkpoints", log.line)

    def _closed_loop_eval(self, run_dir: Path, log: MetricLog) -> None:
        """Closed-loop rollouts of this step's checkpoint (rank 0) through ``vla.evaluation``."""
        from vla.evaluation.checkpoint import evaluate_checkpoint

        if self.info.is_main:
            step_dir = run_dir / "checkpoints" / ckpt.step_dirname(self.step)
            out_dir = run_dir / "eval" / step_dir.name
            results = evaluate_checkpoint(step_dir, self.cfg, self.eval_tasks, out_dir, self.device)
            log.log(self.step, results, prefix="eval")
            log.line(f"eval step={self.step} results={out_dir / 'eval_info.json'}")
        dist_utils.barrier(self.info)


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
