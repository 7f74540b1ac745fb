"""The trained VLA as a :class:`Policy`: raw env observations in, raw-unit action chunks out.

What happens per model call (all inside the policy, never by the caller):

1. the :class:`vla.processor.Processor` normalizes state, converts images and tokenizes the
   instruction (``observation_batch``); with ``n_obs_steps > 1`` the policy keeps each env's last
   observations (the first one repeated before the episode start, as in training windows) or takes
   them already stacked (``images`` u8[T, H, W, 3], ``state`` f32[T, S]);
2. ``VLA.sample`` runs the prefix once (KV cache), decodes the subtask plan greedily when it is
   time to re-plan, otherwise feeds the env's last decoded plan back in as given, then integrates
   ``num_flow_steps`` Euler steps from Gaussian noise for the action chunk (and the future frame
   when the model has a frame head);
3. the chunk is unnormalized back to env units; the base class queues ``n_action_steps`` of it
   (or temporally ensembles overlapping chunks).

Re-planning: the plan is re-decoded every ``replan_every`` env steps (default: every chunk). When
one env of a batch is due, the whole batch is re-decoded (one model call instead of two; other
envs just get a fresher plan). The plan text is exposed per env as ``current_plan(i)`` (remaining
subtasks) and ``current_subtask(i)`` for video overlays and evaluation records.

Reproducibility: noise comes from a ``torch.Generator`` seeded with ``seed`` (re-seeded by
:meth:`reseed`), or, per call, from ``noise_seed``; the same checkpoint, seed and observations
give the same actions locally and through ``vla serve``. In a rollout (``vla eval``) each episode
draws from its own stream, seeded by the policy's seed and the episode's (:meth:`seed_episode`, which
the rollout engine calls at every episode start), so an episode's noise does not depend on which other
episodes share its batch: a seed replays the same rollout at any ``n_envs`` when chunks are asked
for at fixed steps (``vla eval n_envs=1`` or ``sync_chunks=false``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vla.observation import ObservationSpec, validate_observation

from .base import Chunk, Observation, Policy

PLAN_SEPARATOR = "; "  # how the dataset joins the remaining subtasks into one plan string


def split_plan(text: str) -> list[str]:
    """``"reach the handle; pull the drawer"`` -> ``["reach the handle", "pull the drawer"]``."""
    return [p.strip() for p in text.split(PLAN_SEPARATOR.strip()) if p.strip()]


class VLAPolicy(Policy):
    """A VLA model + processor behind the policy interface.

    Build from a checkpoint with :meth:`from_checkpoint`, or directly from an in-memory model and
    processor (tests, training-time evaluation).
    """

    name = "vla"

    def __init__(
        self,
        model: Any,
        processor: Any,
        n_action_steps: int = 8,
        replan_every: int | None = None,
        temporal_ensemble: float | None = None,
        num_flow_steps: int | None = 10,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
        use_cache: bool = True,
        train_config: dict | None = None,
        env_options: dict | None = None,
        trained_on: dict | None = None,
    ) -> None:
        cfg = model.cfg
        if int(n_action_steps) > cfg.horizon:
            raise ValueError(f"n_action_steps={n_action_steps} exceeds the model's horizon {cfg.horizon}")
        super().__init__(n_action_steps, temporal_ensemble)
        self.model = model.eval()
        self.processor = processor
        self.cfg = cfg
        self.device = torch.device(device)
        self.replan_every = int(replan_every) if replan_every else self.n_action_steps
        if self.replan_every < 1:
            raise ValueError(f"replan_every: expected >= 1 (env steps), got {replan_every}")
        self.num_flow_steps = int(num_flow_steps or cfg.flow_steps)
        self.use_cache = bool(use_cache)
        self.train_config = dict(train_config or {})
        self.env_options = dict(env_options or {})   # the training store's (e.g. tabletop layout)
        self.trained_on = dict(trained_on or {})     # the training store's env family and tasks
        self.n_obs_steps = int(cfg.n_obs_steps)
        self.generator = torch.Generator(device="cpu")
        self._episode_generators: dict[int, torch.Generator] = {}  # slot -> its episode's noise stream
        self.reseed(seed)
        self._plans: dict[int, torch.Tensor] = {}  # slot -> plan token ids (L,) incl. <plan>, no padding
        self._text_cache: dict[str, torch.Tensor] = {}  # "n:instruction" -> encoded instruction (n, D)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        n_action_steps: int = 8,
        replan_every: int | None = None,
        temporal_ensemble: float | None = None,
        num_flow_steps: int | None = 10,
        seed: int | None = 0,
        use_ema: bool = True,
    ) -> VLAPolicy:
        """Load a run dir, its checkpoints dir or a step folder (``vla.checkpoint.load_policy_bundle``)."""
        from vla.checkpoint import load_policy_bundle

        model, processor, config = load_policy_bundle(path, device=device, use_ema=use_ema)
        return cls(model, processor, n_action_steps=n_action_steps, replan_every=replan_every,
                   temporal_ensemble=temporal_ensemble, num_flow_steps=num_flow_steps, seed=seed, device=device,
                   train_config=config.get("train") or {}, env_options=config.get("env_options"),
                   trained_on=config.get("store"))

    def reseed(self, seed: int | None) -> None:
        """Restart the noise stream (``None``: a nondeterministic seed); episode streams are dropped."""
        self.seed = int(seed) if seed is not None else int(torch.seed() % (2**63))
        self.generator.manual_seed(self.seed)
        self._episode_generators.clear()

    def seed_episode(self, env_index: int, episode_seed: int) -> None:
        """From now until ``reset(env_index)``, env ``env_index``'s flow noise comes from its own stream,
        seeded by (policy seed, ``episode_seed``): the episode's actions no longer depend on the other
        envs of the batch or on the order episodes started in."""
        key = np.random.SeedSequence([self.seed % 2**63, int(episode_seed) % 2**63]).generate_state(1, np.uint64)[0]
        self._episode_generators[int(env_index)] = torch.Generator(device="cpu").manual_seed(int(key) % 2**63)

    # ---- what the env must look like ------------------------------------------------------------
    @property
    def cameras(self) -> dict[str, tuple[int, int]]:
        h, w = self.cfg.image_hw
        return {cam: (h, w) for cam in self.cfg.cameras}

    def env_kwargs(self) -> dict[str, Any]:
        """``make_env`` keyword arguments that build the env this model was trained on: cameras, image
        size and the training store's env options (a tabletop ``layout``)."""
        h, w = self.cfg.image_hw
        if h != w:
            raise ValueError(f"model images are {h}x{w}; envs render square images (image_size)")
        return {**self.env_options, "cameras": tuple(self.cfg.cameras), "image_size": int(h)}

    def metadata(self) -> dict[str, Any]:
        """What a client must know to build requests (sent first by ``vla serve``)."""
        h, w = self.cfg.image_hw
        return {
            "cameras": {cam: [h, w] for cam in self.cfg.cameras},
            "image_size": h if h == w else [h, w],
            "state_dim": int(self.cfg.state_dim),
            "action_dim": int(self.cfg.action_dim),
            "horizon": int(self.cfg.horizon),
            "n_obs_steps": int(self.cfg.n_obs_steps),
            "n_action_steps": self.n_action_steps,
            "replan_every": self.replan_every,
            "has_planner": bool(self.cfg.planner),
            "env_options": dict(self.env_options),
            "has_frame_head": self.cfg.frame != "off",
            "model_config": self.cfg.to_dict(),
        }

    # ---- state ----------------------------------------------------------------------------------
    def reset(self, env_index: int | None = None) -> None:
        super().reset(env_index)
        if env_index is None:
            self._plans.clear()
            self._text_cache.clear()
            self._episode_generators.clear()
        else:
            self._plans.pop(int(env_index), None)
            self._episode_generators.pop(int(env_index), None)

    # ---- inference ------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_chunks(
        self,
        obs_list: list[Observation],
        instructions: list[str],
        infos: list[dict] | None = None,
        env_indices: list[int] | None = None,
        decode_plan: bool | None = None,
        noise_seed: int | None = None,
    ) -> list[Chunk]:
        """One chunk per observation, in one batched model call.

        ``decode_plan``: ``None`` re-decodes when an env's plan is older than ``replan_every`` steps
        (or missing); ``True``/``False`` force it (``False`` reuses each env's last plan, decoding
        only for envs that have none).
        """
        n = len(obs_list)
        env_indices = list(range(n)) if env_indices is None else [int(i) for i in env_indices]
        spec = ObservationSpec.from_config(self.cfg)
        obs_list = [validate_observation(obs, spec, f"observation {k} (env {env_indices[k]})")
                    for k, obs in enumerate(obs_list)]
        cfg = self.cfg
        slots = [self.slot(i) for i in env_indices]
        have_plan = [i in self._plans for i in env_indices]
        if decode_plan is None:
            replan = any(not hp or s.steps - s.plan_step >= self.replan_every for hp, s in zip(have_plan, slots))
        else:
            replan = bool(decode_plan) or not all(have_plan)
        model_obs = [self.stacked_observation(i, o) for i, o in zip(env_indices, obs_list)]
        batch = dict(self.processor.observation_batch(model_obs, list(instructions), self.device))
        if cfg.text != "bytes":  # a pretrained encoder runs once per distinct instruction, not per chunk
            batch["instruction_embeds"] = self.model.cached_instruction_embeds(batch, list(instructions),
                                                                               self._text_cache)
        if cfg.planner and not replan:
            batch["plan_tokens"], batch["plan_mask"] = self._stored_plans(env_indices)
        noise, frame_noise = self._draw_noise(env_indices, noise_seed)
        out = self.model.sample(batch, noise=noise, decode_plan=replan, use_cache=self.use_cache,
                                num_steps=self.num_flow_steps, frame_noise=frame_noise)
        actions = self.processor.unnormalize_actions(out["actions"])  # (N, H, A) raw units
        actions = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
        frames = None
        if out.get("frame") is not None:
            f = ((out["frame"].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, 3, s, s)
            frames = f.permute(0, 2, 3, 1).cpu().numpy()  # (N, s, s, 3)
        chunks = []
        for k, (i, s) in enumerate(zip(env_indices, slots)):
            plan = None
            if cfg.planner and out.get("plan_tokens") is not None:
                if replan:
                    self._plans[i] = self._trim_plan(out["plan_tokens"][k])
                    s.plan_step = s.steps
                plan = split_plan(out["plan_text"][k])
            chunks.append(Chunk(actions[k], plan=plan, frame=None if frames is None else frames[k]))
        return chunks

    def _draw_noise(self, env_indices: list[int], noise_seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flow noise for the batch: actions f32[N, H, A] and, with a frame head, frames f32[N, 3, s, s].
        ``noise_seed`` given: one fresh stream for the call; else each env with an episode stream draws its
        row from it, and the rest share the policy's stream (one draw for the batch when no env has one)."""
        cfg, n = self.cfg, len(env_indices)
        shapes = [(cfg.horizon, cfg.action_dim)] + ([(3, cfg.frame_size, cfg.frame_size)] if cfg.frame != "off" else [])
        own = [self._episode_generators.get(i) for i in env_indices] if noise_seed is None else [None] * n
        if all(g is None for g in own):
            gen = self.generator if noise_seed is None else torch.Generator().manual_seed(int(noise_seed))
            drawn = [torch.randn(n, *shape, generator=gen) for shape in shapes]
        else:  # row by row: an env's noise is the same whichever envs share the batch
            rows = [[torch.randn(*shape, generator=g or self.generator) for shape in shapes] for g in own]
            drawn = [torch.stack([r[j] for r in rows]) for j in range(len(shapes))]
        drawn = [d.to(self.device) for d in drawn]
        return drawn[0], (drawn[1] if len(drawn) > 1 else None)

    def _trim_plan(self, tokens: torch.Tensor) -> torch.Tensor:
        """A decoded plan row (L,) without the padding after its <eos> (kept: <plan> ... <eos>)."""
        tokens = tokens.detach().cpu()
        eos = (tokens == self.model.plan_tok.eos_id).nonzero()
        if len(eos):
            return tokens[: int(eos[0, 0]) + 1]
        return tokens[tokens != self.model.plan_tok.pad_id]

    def _stored_plans(self, env_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The envs' last decoded plans, right-padded: ids i64[N, L] and mask bool[N, L]."""
        rows = [self._plans[i] for i in env_indices]
        length = max(len(r) for r in rows)
        pad = self.model.plan_tok.pad_id
        ids = torch.full((len(rows), length), pad, dtype=torch.long)  # (N, L)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)  # (N, L)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = r
            mask[k, : len(r)] = True
        return ids.to(self.device), mask.to(self.device)
