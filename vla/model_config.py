"""`VLAConfig`: the model's configuration (presets in ``configs/model/``, switches in their groups).

Lives beside `vla.model` (which re-exports it) so the model file reads top-down in one sitting.
The data-dependent fields (``cameras``, ``image_size``, ``state_dim``, ``action_dim``) come from the
episode store: `VLAConfig.from_store(model_cfg, store)`. YAML's ``on``/``off`` are accepted for the
boolean switches. Invalid values and unsupported switch combinations are refused with the field,
the allowed values and what came.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class VLAConfig:
    """Model configuration. ``cameras``/``image_size``/``state_dim``/``action_dim`` come from the store."""

    cameras: list[str] | None = None
    image_size: int | list[int] | None = None  # int (square) or [H, W]; every camera has this size
    state_dim: int | None = None
    action_dim: int | None = None
    patch_size: int = 8
    vision: str = "patch"  # patch: one linear map per raw patch (ViT) | conv: a strided conv stem per view
    vision_film: bool = False  # conv only: the instruction scales/shifts the stem's features (FiLM)
    vision_coords: bool = False  # conv only: x/y coordinate channels join the pixels (CoordConv)
    vision_keypoints: int = 0  # conv only: K spatial-softmax keypoints per view, one more token per view (0 = off)
    state_dropout: float = 0.0  # training: each sample's state input is zeroed with this chance; 1.0 = no state at all
    goal_loss_weight: float = 0.0  # the goal head's weight (state at the next gripper switch); 0 = off; discrete: point
    goal_head: str = "token"  # token: a linear read-out of the state token | point: soft-argmax over the first
    #                           camera's patches, then a small MLP from that image point to the state
    goal_condition: bool = False  # point head only: the state token also reads the goal (training: the true goal
    #                               plus noise; inference: the goal head's prediction), so a right choice steers;
    #                               discrete head: one goal token between the plan and the action bins
    goal_condition_noise: float = 0.1  # std of the noise on the true goal in training (normalized state units)
    goal_patch_loss_weight: float = 0.0  # point head only: cross-entropy of its patch scores against the patch
    #                                      that holds the goal's projection in the first camera (0 = off)
    goal_offset: bool = False  # point head with the patch target: each patch also says where inside itself the goal
    #                            lies (a sub-patch offset, trained at the goal's patch), so the point is finer than
    #                            the patch grid (a 16 px patch of the 96 px front view spans ~13-17 cm of table)
    n_obs_steps: int = 1
    horizon: int = 16
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    action_width: int = 64
    frame_width: int = 64
    mlp_ratio: float = 2.0
    gelu: str = "tanh"  # tanh | erf: the GELU of the MLPs and the conv stem. The presets say erf (as fast as a
    #                     multiply on the CPU in bf16, the tanh form ~5x slower); tanh is the default so a checkpoint
    #                     saved before the key existed loads as it was trained
    max_instruction_tokens: int = 48
    max_plan_tokens: int = 48  # the whole plan block: <plan> + text + <eos>
    experts: str = "mot"  # mot | dense
    action_head: str = "flow"  # flow | discrete
    planner: bool = True
    actions_read_plan: bool = True  # planner on: the state/action/frame tokens attend to the plan; false: the plan
    #                                 is a side output (decoded and shown, trained on the vlm) the actions never read
    frame: str = "off"  # off | aux | condition
    knowledge_insulation: bool = False
    frame_size: int = 32
    frame_camera: str | None = None  # default: the first camera
    frame_loss_weight: float = 0.1
    plan_loss_weight: float = 1.0
    flow_steps: int = 10
    flow_samples: int = 1  # training: noisy copies of each action chunk in the flow loss, all against one prefix (the
    #                        action expert is small, the images are not; MAR's diffusion batch multiplier)
    plan_rows: int = 0  # training, plan a side output (actions_read_plan=false): only the first N rows of a batch
    #                     run the plan block and its loss, the rest skip it (the plan is learnt early; 0 = all rows)
    action_bins: int = 256
    rope_theta: float = 10000.0
    text: str = "bytes"  # bytes | minilm (pretrained all-MiniLM-L6-v2, `vla.text_encoder`)
    text_finetune: bool = False  # minilm: train the encoder too (default frozen)
    plan_vocab: str = "bytes"  # bytes | words (`vla.tokenizer.PlanVocab`)
    plan_words: list[str] | None = None  # words: the fixed plan words, filled from the store's subtask table
    copy_slots: int = 16  # words: plans may copy any of the instruction's first copy_slots words
    plan_subtasks: list[str] | None = None  # words: the store's subtask labels, the plan grammar's shapes (None: none)
    plan_max_subtasks: int | None = None  # words: the most subtasks a decoded plan may have (the store's longest)

    def __post_init__(self) -> None:
        for name in ("planner", "actions_read_plan", "knowledge_insulation", "text_finetune", "vision_film",
                     "vision_coords"):  # on/off
            v = getattr(self, name)
            if isinstance(v, str) and v.lower() in ("on", "off", "true", "false"):
                setattr(self, name, v.lower() in ("on", "true"))
            elif not isinstance(v, bool):
                raise ValueError(f"VLAConfig.{name} must be a bool (or 'on'/'off'), got {v!r}")
        if self.cameras is None or isinstance(self.cameras, str) or not list(self.cameras):
            raise ValueError(f"VLAConfig.cameras must be a non-empty list of camera names (from the store), "
                             f"got {self.cameras!r}")
        self.cameras = [str(c) for c in self.cameras]
        for name in ("state_dim", "action_dim", "patch_size", "n_obs_steps", "horizon", "d_model", "n_layers",
                     "n_heads", "head_dim", "action_width", "frame_width", "max_instruction_tokens",
                     "max_plan_tokens", "frame_size", "flow_steps", "action_bins"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VLAConfig.{name} must be a positive int, got {v!r}"
                                 + (" (fill it from the store)" if name in ("state_dim", "action_dim") else ""))
        for name, least in (("flow_samples", 1), ("plan_rows", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"VLAConfig.{name} must be an int >= {least}, got {v!r}")
        if self.flow_samples > 1 and (self.action_head != "flow" or self.frame == "condition"):
            raise ValueError(f"VLAConfig.flow_samples={self.flow_samples} needs action_head='flow' and frame 'off' or "
                             f"'aux' (with frame='condition' the frame shares the chunk's flow time), got "
                             f"action_head={self.action_head!r}, frame={self.frame!r}")
        if self.plan_rows and not (self.planner and not self.actions_read_plan):
            raise ValueError(f"VLAConfig.plan_rows={self.plan_rows} needs the plan as a side output (planner=side: "
                             f"planner on, actions_read_plan false; the rows without a plan must not change what the "
                             f"actions read), got planner={self.planner}, actions_read_plan={self.actions_read_plan}")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"VLAConfig.gelu must be 'tanh' or 'erf', got {self.gelu!r}")
        h, w = self.image_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"VLAConfig.image_size {[h, w]} is not divisible by patch_size {self.patch_size}")
        for flag, what in (("vision_film", "FiLM modulates the conv stem"),
                           ("vision_coords", "coordinate channels enter the conv stem")):
            if getattr(self, flag) and self.vision != "conv":
                raise ValueError(f"VLAConfig.{flag}=true needs vision='conv' ({what}), got vision={self.vision!r}")
        if self.vision == "conv" and not conv_strides(self.patch_size):
            raise ValueError(f"VLAConfig.vision='conv' needs patch_size = a product of 2s and 3s (e.g. 8, 12, 16), "
                             f"got {self.patch_size}")
        if self.frame != "off" and self.frame_size % self.patch_size:
            raise ValueError(f"VLAConfig.frame_size {self.frame_size} is not divisible by patch_size {self.patch_size}")
        k = self.vision_keypoints
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"VLAConfig.vision_keypoints must be an int >= 0 (0 = off), got {k!r}")
        if k and self.vision != "conv":
            raise ValueError(f"VLAConfig.vision_keypoints={k} needs vision='conv' (keypoints of the conv stem's "
                             f"feature maps), got vision={self.vision!r}")
        if not 0.0 <= float(self.state_dropout) <= 1.0:
            raise ValueError(f"VLAConfig.state_dropout must be in [0, 1] (a probability), got {self.state_dropout!r}")
        self.state_dropout = float(self.state_dropout)
        g = self.goal_loss_weight
        if isinstance(g, bool) or not isinstance(g, int | float) or not g >= 0.0:
            raise ValueError(f"VLAConfig.goal_loss_weight must be a number >= 0 (0 = no goal head), got {g!r}")
        self.goal_loss_weight = float(g)
        if self.goal_head not in ("token", "point"):
            raise ValueError(f"VLAConfig.goal_head must be 'token' or 'point', got {self.goal_head!r}")
        if g and self.action_head != "flow" and self.goal_head != "point":
            raise ValueError(f"VLAConfig.goal_loss_weight={g} with goal_head={self.goal_head!r} needs "
                             f"action_head='flow' (the token goal head reads the action expert's state token); with "
                             f"action_head={self.action_head!r} use goal_head='point' (it reads the prefix)")
        if self.goal_condition and not (g and self.goal_head == "point"):
            raise ValueError("VLAConfig.goal_condition=true needs the point goal head (goal_loss_weight > 0 and "
                             f"goal_head='point': the goal is read off the prefix before the state token), got "
                             f"goal_loss_weight={g}, goal_head={self.goal_head!r}")
        if not float(self.goal_condition_noise) >= 0.0:
            raise ValueError(f"VLAConfig.goal_condition_noise must be >= 0 (a std), got {self.goal_condition_noise!r}")
        self.goal_condition_noise = float(self.goal_condition_noise)
        gp = self.goal_patch_loss_weight
        if isinstance(gp, bool) or not isinstance(gp, int | float) or not gp >= 0.0:
            raise ValueError(f"VLAConfig.goal_patch_loss_weight must be a number >= 0 (0 = off), got {gp!r}")
        self.goal_patch_loss_weight = float(gp)
        if gp and not (g and self.goal_head == "point"):
            raise ValueError(f"VLAConfig.goal_patch_loss_weight={gp} needs the point goal head (goal_loss_weight > 0 "
                             f"and goal_head='point'), got goal_loss_weight={g}, goal_head={self.goal_head!r}")
        if not isinstance(self.goal_offset, bool):
            raise ValueError(f"VLAConfig.goal_offset must be true or false, got {self.goal_offset!r}")
        if self.goal_offset and not gp:
            raise ValueError("VLAConfig.goal_offset=true needs the patch target (goal_patch_loss_weight > 0: the "
                             f"offset is trained at the goal's patch), got goal_patch_loss_weight={gp}")
        if self.head_dim % 2:
            raise ValueError(f"VLAConfig.head_dim must be even (rotary embeddings), got {self.head_dim}")
        for width in ("d_model", "action_width", "frame_width"):
            if getattr(self, width) % 2:
                raise ValueError(f"VLAConfig.{width} must be even (time embedding), got {getattr(self, width)}")
        choices = {"experts": ("mot", "dense"), "action_head": ("flow", "discrete"),
                   "frame": ("off", "aux", "condition"), "vision": ("patch", "conv"), "text": ("bytes", "minilm"),
                   "plan_vocab": ("bytes", "words")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"VLAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.action_head == "discrete" and self.frame == "condition":
            raise ValueError("VLAConfig: frame='condition' needs action_head='flow' (the discrete head decodes actions "
                             "token by token and cannot be integrated jointly with the frame); use frame='aux'")
        if self.knowledge_insulation and self.experts == "dense":
            raise ValueError("VLAConfig: knowledge_insulation needs experts='mot'; with dense experts the action "
                             "tokens share the vlm weights, so there is nothing to insulate")
        if self.frame_camera is None:
            self.frame_camera = self.cameras[0]
        if self.frame_camera not in self.cameras:
            raise ValueError(f"VLAConfig.frame_camera {self.frame_camera!r} is not one of cameras {self.cameras}")
        if self.plan_vocab == "words":
            if self.plan_words is None or isinstance(self.plan_words, str):
                raise ValueError(f"VLAConfig.plan_words must be the list of plan words (filled from the store's "
                                 f"subtask table by VLAConfig.from_store) when plan_vocab='words', "
                                 f"got {self.plan_words!r}")
            self.plan_words = [str(w) for w in self.plan_words]
            if self.plan_subtasks is not None:
                if isinstance(self.plan_subtasks, str) or not all(isinstance(t, str) for t in self.plan_subtasks):
                    raise ValueError(f"VLAConfig.plan_subtasks must be a list of subtask labels (filled from the "
                                     f"store by VLAConfig.from_store) or None, got {self.plan_subtasks!r}")
                self.plan_subtasks = list(self.plan_subtasks)
            if self.plan_max_subtasks is not None and (isinstance(self.plan_max_subtasks, bool) or not isinstance(
                    self.plan_max_subtasks, int) or self.plan_max_subtasks < 1):
                raise ValueError(f"VLAConfig.plan_max_subtasks must be an int >= 1 or None, "
                                 f"got {self.plan_max_subtasks!r}")
        if isinstance(self.copy_slots, bool) or not isinstance(self.copy_slots, int) or self.copy_slots < 0:
            raise ValueError(f"VLAConfig.copy_slots must be an int >= 0, got {self.copy_slots!r}")
        if self.text == "minilm" and self.max_instruction_tokens < 2:
            raise ValueError(f"VLAConfig.max_instruction_tokens must be >= 2 with text='minilm' ([CLS] and [SEP]), "
                             f"got {self.max_instruction_tokens}")
        if self.max_plan_tokens < 2 or self.max_instruction_tokens < 1:
            raise ValueError(f"VLAConfig.max_plan_tokens must be >= 2 (<plan> and <eos>), got {self.max_plan_tokens}")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        if isinstance(s, int) and not isinstance(s, bool) and s > 0:
            return s, s
        if isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s):
            return int(s[0]), int(s[1])
        raise ValueError(f"VLAConfig.image_size must be a positive int or [H, W] (from the store), got {s!r}")

    @property
    def num_views(self) -> int:
        return len(self.cameras) * self.n_obs_steps

    @property
    def tokens_per_view(self) -> int:
        """Image tokens of one view: its patches, then (with ``vision_keypoints``) one keypoint token."""
        h, w = self.image_hw
        return (h // self.patch_size) * (w // self.patch_size) + (1 if self.vision_keypoints else 0)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens at the head of the prefix: every view's `tokens_per_view`."""
        return self.num_views * self.tokens_per_view

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> VLAConfig:
        d = {**dict(d), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VLAConfig: unknown keys {unknown}; expected some of {sorted(known)}")
        if isinstance(d.get("cameras"), tuple):
            d["cameras"] = list(d["cameras"])
        return cls(**d)

    @classmethod
    def from_store(cls, model_cfg: Mapping[str, Any], store: Any) -> VLAConfig:
        """Fill the data-dependent fields from an `EpisodeStore` (cameras default to all of the store's)."""
        d = dict(model_cfg)
        cams = list(d.get("cameras") or store.cameras)
        missing = [c for c in cams if c not in store.cameras]
        if missing:
            raise ValueError(f"VLAConfig.from_store: cameras {missing} are not in the store "
                             f"(has {list(store.cameras)})")
        sizes = {c: tuple(store.cameras[c]) for c in cams}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"VLAConfig.from_store: all cameras must have one image size, got {sizes}")
        if d.get("plan_vocab") == "words":
            d["plan_words"] = plan_words_from_store(store, int(d.get("copy_slots", 16)),
                                                    int(d.get("max_plan_tokens", cls.max_plan_tokens)))
            # the plan grammar (`vla.tokenizer.PlanGrammar`): subtask shapes and the longest plan's length
            d["plan_subtasks"] = [str(t) for t in store.subtask_table]
            d["plan_max_subtasks"] = max((len(p.split("; ")) for p in store_plans(store)), default=None)
        return cls.from_dict(d, cameras=cams, image_size=list(sizes[cams[0]]), state_dim=int(store.state_dim),
                             action_dim=int(store.action_dim))


def conv_strides(patch_size: int) -> list[int]:
    """Strides of the conv stem that reaches `patch_size` (2s first, then 3s); [] if there is none."""
    strides, n = [], patch_size
    for s in (2, 3):
        while n % s == 0 and n > 1:
            strides.append(s)
            n //= s
    return strides if n == 1 and strides else []
def store_plans(store: Any) -> list[str]:
    """The full plan of every episode of ``store``: its distinct consecutive subtask labels joined by "; "."""
    import numpy as np

    from vla.datasets.sampler import join_plan

    names, labels = list(store.subtask_table), store.lowdim("subtask")
    plans = []
    for s, e in zip(store.episode_starts, store.episode_ends):
        lab = np.asarray(labels[int(s):int(e)])
        if not len(lab):
            continue
        first = np.concatenate([[0], np.flatnonzero(np.diff(lab)) + 1])  # first row of each label segment
        plans.append(join_plan([names[int(j)] for j in lab[first]]))
    return plans


def plan_words_from_store(store: Any, copy_slots: int, max_plan_tokens: int) -> list[str]:
    """The plan vocabulary's fixed words from the store's subtask table; refuses a plan longer than the
    limit, or one that the plan decoding rules (`vla.tokenizer.banned_next_words`) would block.

    Every later (remaining-subtask) plan of an episode is a suffix of its full plan, starting at a
    subtask, so checking the full plans covers every training target (the rules look only within a
    subtask and at the subtask before).
    """
    from vla.tokenizer import PlanVocab, plan_rule_violation

    vocab = PlanVocab.from_subtasks(list(store.subtask_table), copy_slots)
    plans = store_plans(store)
    if plans:
        longest = max(plans, key=vocab.length)
        if vocab.length(longest) > max_plan_tokens:
            raise ValueError(f"model.max_plan_tokens={max_plan_tokens} is too small for the longest plan in "
                             f"{getattr(store, 'path', 'the store')}: {longest!r} needs {vocab.length(longest)} "
                             f"tokens (<plan> + {vocab.length(longest) - 2} words + <eos>); "
                             f"raise model.max_plan_tokens to at least {vocab.length(longest)}")
    for plan in dict.fromkeys(plans):
        why = plan_rule_violation(plan)
        if why:
            raise ValueError(f"plan {plan!r} in {getattr(store, 'path', 'the store')} breaks the plan decoding "
                             f"rules ({why}; see docs/text.md \"Decoding rules\"): a word-plan model could never "
                             "decode it; relabel the subtasks (or use model.plan_vocab=bytes)")
    return vocab.words


def check_batch(cfg: VLAConfig, batch: Mapping[str, Any], training: bool) -> None:
    """Refuse a model batch that does not match ``cfg``, naming the key, the expected and the given shape.

    The batch format is the one `vla.processor.Processor` produces (see its module docstring).
    """
    import torch

    h, w = cfg.image_hw
    b = batch["images"].shape[0] if isinstance(batch.get("images"), torch.Tensor) else None
    want: dict[str, tuple] = {"images": (b, cfg.num_views, 3, h, w), "state": (b, cfg.state_dim * cfg.n_obs_steps),
                              "instruction_tokens": (b, None), "instruction_mask": (b, None)}
    if cfg.plan_vocab == "words" and cfg.planner:
        want.update(instruction_word_pos=(b, cfg.copy_slots))
    if training:
        want.update(actions=(b, cfg.horizon, cfg.action_dim), action_is_pad=(b, cfg.horizon))
        if cfg.planner:
            want.update(plan_tokens=(b, None), plan_mask=(b, None))
        if cfg.frame != "off":
            want.update(future_frame=(b, 3, cfg.frame_size, cfg.frame_size), future_is_pad=(b,))
    elif "plan_tokens" in batch:
        want.update(plan_tokens=(b, None), plan_mask=(b, None))
    for key, shape in want.items():
        x = batch.get(key)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"model batch: '{key}' must be a tensor of shape {_fmt(shape)}, "
                             f"got {type(x).__name__} (build batches with vla.processor.Processor)")
        if x.dim() != len(shape) or any(s is not None and s != g for s, g in zip(shape, x.shape)):
            raise ValueError(f"model batch: '{key}' expected shape {_fmt(shape)}, got {list(x.shape)}")
    for a, m in (("instruction_tokens", "instruction_mask"), ("plan_tokens", "plan_mask")):
        if a in want and batch[a].shape != batch[m].shape:
            raise ValueError(f"model batch: '{a}' {list(batch[a].shape)} and '{m}' {list(batch[m].shape)} differ")


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join("B" if i == 0 else ("L" if s is None else str(s)) for i, s in enumerate(shape)) + "]"
