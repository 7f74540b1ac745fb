"""`vla plan`: ask a trained policy for its subtask plan in a scene.

    vla plan checkpoint=RUN_DIR env=metaworld task=drawer-open-v3 seed=1000000
    vla plan checkpoint=RUN_DIR instruction="open the drawer" image=scene.png

Prints the decoded plan, the remaining subtasks one per line. When the model has a frame head,
also writes ``plan.png`` (the current image beside the predicted future frame) into the run dir
and prints its path. The scene comes from an env reset (``env``/``task``/``seed``; the instruction
defaults to the env's) or from an image file for single-camera models (``image``; the state then
defaults to the middle of the training range, i.e. a normalized state of zeros).

``instruction=`` values may contain commas and quotes: they are quoted for Hydra here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf


def quote_free_text(argv: list[str], keys: tuple[str, ...] = ("instruction",)) -> list[str]:
    """Quote ``key=free text`` overrides so Hydra takes commas, brackets and colons literally."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and value and value[0] not in "'\"":
            value = "'" + value.replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        out.append(arg)
    return out


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """An image file as u8[H, W, 3] at the model's size (area resize)."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image={path}: file not found")
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"image={path}: not a readable image (expected PNG/JPG)")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = size
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img, dtype=np.uint8)


def scene_from_config(cfg: Any, policy: Any) -> tuple[dict, str]:
    """(raw observation, instruction) from ``env/task/seed`` or ``image/state``."""
    instruction = cfg.instruction
    family = cfg.env.family if cfg.get("env") else None
    if family or cfg.task:
        if not (family and cfg.task):
            raise ValueError("a scene from an env needs both env=FAMILY and task=TASK")
        from vla.envs import EVAL_SEED_START, make_env

        env = make_env(family, cfg.task, instruction_split=cfg.instruction_split, **policy.env_kwargs())
        try:
            obs, info = env.reset(seed=int(EVAL_SEED_START if cfg.seed is None else cfg.seed))
        finally:
            env.close()
        return obs, instruction or str(info["instruction"])
    if not cfg.image:
        raise ValueError("vla plan needs a scene: image=PATH, or env=FAMILY task=TASK [seed=N]")
    if not instruction:
        raise ValueError("image=... needs instruction=\"...\" (there is no env to take it from)")
    cams = policy.cfg.cameras
    if len(cams) != 1:
        raise ValueError(f"image=... works for single-camera models; this one uses {cams}: use env=... task=...")
    if cfg.state is None:
        dim = policy.cfg.state_dim
        state = np.asarray(policy.processor.normalizer.unnormalize("state", np.zeros(dim, np.float32)), np.float32)
    else:
        state = np.asarray(list(cfg.state), np.float32)
        if state.shape != (policy.cfg.state_dim,):
            raise ValueError(f"state: expected {policy.cfg.state_dim} numbers, got {state.shape[0]}")
    return {"images": {cams[0]: load_image(cfg.image, policy.cfg.image_hw)}, "state": state}, instruction


def write_frame_figure(current: np.ndarray, predicted: np.ndarray, path: Path, scale_to: int = 256) -> Path:
    """PNG: the current image and the predicted future frame side by side, both upscaled to ``scale_to``."""
    import cv2

    tiles = []
    for img, label in ((current, "now"), (predicted, "predicted")):
        h, w = img.shape[:2]
        s = max(1, round(scale_to / h))
        tile = cv2.resize(img, (w * s, h * s), interpolation=cv2.INTER_NEAREST)
        tile = cv2.resize(tile, (scale_to, scale_to), interpolation=cv2.INTER_NEAREST)
        cv2.putText(tile, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    gap = np.full((scale_to, 8, 3), 255, np.uint8)
    fig = np.concatenate([tiles[0], gap, tiles[1]], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(fig, cv2.COLOR_RGB2BGR))
    return path


def main(argv: list[str]) -> int:
    from vla.config import compose, make_run_dir

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(OmegaConf.to_yaml(compose("plan", [])))
        return 0
    cfg = compose("plan", quote_free_text(argv))
    pcfg = OmegaConf.to_container(cfg.policy, resolve=True)
    if pcfg["name"] != "vla":
        raise ValueError(f"vla plan decodes a checkpoint's plan: expected policy=vla, got policy={pcfg['name']}")
    if not pcfg.get("checkpoint"):
        raise ValueError("vla plan needs checkpoint=PATH (a run dir, its checkpoints dir or a step folder)")
    from vla.policies import make_policy

    policy = make_policy({**pcfg, "seed": cfg.noise_seed})
    if not policy.cfg.planner:
        raise ValueError(f"checkpoint {pcfg['checkpoint']} was trained with planner=off: it has no plan to decode")
    obs, instruction = scene_from_config(cfg, policy)
    chunk = policy.predict_chunk(obs, instruction)
    print(f"instruction: {instruction}")
    print("plan:")
    for step in chunk.plan or ["(empty plan)"]:
        print(f"  {step}")
    if chunk.frame is not None:
        run_dir = make_run_dir(cfg, "plan")
        current = obs["images"][policy.cfg.frame_camera]
        path = write_frame_figure(current, chunk.frame, run_dir / "plan.png")
        print(f"frame: {path}")
    return 0
