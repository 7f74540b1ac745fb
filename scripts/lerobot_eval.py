"""Evaluate a LeRobot policy checkpoint (ACT, Diffusion Policy, ...) in our environments, with our rollout engine.

    python scripts/lerobot_eval.py CHECKPOINT/pretrained_model --env tabletop --tasks pick-place \\
        --episodes 20 --seed-start 3000000 --out DIR [--layout slots] [--image-size 96]

For side-by-side comparisons: the same seeds, success test, episode limits and `eval_info.json` as
`vla eval`, so a LeRobot baseline and a vla policy are scored on identical scenes. Runs in a venv with
both LeRobot (0.4.x) and vla installed (`bash scripts/lerobot_venv.sh` builds one). Cameras come from the
checkpoint's image features (`observation.images.<camera>`); the instruction reaches the policy as
LeRobot's `task` key (ACT and Diffusion Policy ignore it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from vla.datasets.lerobot import IMAGE_PREFIX  # the LeRobot camera key prefix, shared with export/import
from vla.policies.base import Chunk, Policy

from vla.observation import Observation


def lerobot_batch(obs_list: list[Observation], instructions: list[str], cameras: list[str]) -> dict:
    """Our observations as a LeRobot batch: images f32[B, 3, H, W] in [0, 1], state f32[B, S], task list[str]."""
    missing = [c for c in cameras if c not in obs_list[0]["images"]]
    if missing:
        raise KeyError(f"lerobot_batch: the policy reads cameras {cameras}, the env renders "
                       f"{sorted(obs_list[0]['images'])}: {missing} missing")
    batch = {"observation.state": torch.as_tensor(np.stack([o["state"] for o in obs_list]), dtype=torch.float32),
             "task": list(instructions)}
    for cam in cameras:
        img = np.stack([o["images"][cam] for o in obs_list])  # (B, H, W, 3) u8
        batch[IMAGE_PREFIX + cam] = torch.as_tensor(img).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return batch


class LeRobotPolicy(Policy):
    """A LeRobot checkpoint behind our policy interface: one model call per chunk, queued like ours."""

    def __init__(self, path: str | Path, n_action_steps: int | None = None) -> None:
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        cfg = PreTrainedConfig.from_pretrained(str(path))
        self.model = get_policy_class(cfg.type).from_pretrained(str(path))
        self.model.eval()
        self.name = f"lerobot-{cfg.type}"
        on_cpu = {"device_processor": {"device": "cpu"}}
        self.pre, self.post = make_pre_post_processors(self.model.config, pretrained_path=str(path),
                                                       preprocessor_overrides=on_cpu)
        super().__init__(n_action_steps=n_action_steps or self.model.config.n_action_steps)
        self.cameras = [k[len(IMAGE_PREFIX):] for k in self.model.config.image_features]

    def predict_chunks(self, obs_list, instructions, infos=None, env_indices=None) -> list[Chunk]:
        with torch.inference_mode():
            batch = self.pre(lerobot_batch(obs_list, instructions, self.cameras))
            actions = self.post(self.model.predict_action_chunk(batch))  # (B, T, A) in env units
        return [Chunk(a) for a in actions.float().cpu().numpy()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a LeRobot pretrained_model folder (config.json, model.safetensors, processors)")
    ap.add_argument("--env", default="tabletop")
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--episodes", type=int, default=20, help="episodes per task")
    ap.add_argument("--seed-start", type=int, default=None, help="default: the env family's unseen evaluation seeds")
    ap.add_argument("--n-envs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--layout", default=None, help="tabletop layout (random | slots)")
    ap.add_argument("--instruction-split", default="paraphrase")
    ap.add_argument("--n-action-steps", type=int, default=None, help="default: the checkpoint's")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        import lerobot  # noqa: F401
    except ImportError:
        print("lerobot_eval: LeRobot is not installed in this venv; build one with `bash scripts/lerobot_venv.sh`",
              file=sys.stderr)
        return 2
    from vla.evaluation.evaluate import format_table, run_evaluation, write_outputs

    torch.set_num_threads(1)
    policy = LeRobotPolicy(args.checkpoint, args.n_action_steps)
    env_kwargs = {"cameras": tuple(policy.cameras), "image_size": args.image_size}
    if args.layout:
        env_kwargs["layout"] = args.layout
    t0 = time.time()
    result = run_evaluation(policy, args.env, args.tasks.split(","), args.episodes, n_envs=args.n_envs,
                            seed_start=args.seed_start, instruction_split=args.instruction_split,
                            video_dir=Path(args.out) / "videos", videos_per_task=2, env_kwargs=env_kwargs,
                            progress=False)
    write_outputs(result, args.out)
    print(format_table(result))
    print(json.dumps({"policy": policy.name, "eval_s": round(time.time() - t0, 1), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
