"""`vla train [hydra overrides ...]`: train a policy from a Zarr episode store.

    vla train dataset.path=data/drawer.zarr                      # tiny preset, CPU or GPU
    vla train dataset.path=... model=small trainer.steps=20000 trainer.batch_size=64
    vla train dataset.path=... trainer=debug                     # 2 steps + checkpoint (smoke test)
    vla train resume=outputs/2026-01-01/12-00-00_train           # continue exactly
    torchrun --nproc_per_node=2 -m vla train dataset.path=...    # DDP (gloo on CPU, nccl on GPU)

The loop is ``vla.training.train``; the config is ``configs/train.yaml``.
"""

from __future__ import annotations

HELP = __doc__ + """
Config groups: model (tiny|small|base...), experts (mot|dense), action_head (flow|discrete),
planner (on|off), frame (off|aux|condition), knowledge_insulation (on|off), trainer (default|debug).
Key options: dataset.path, dataset.tasks, dataset.normalization, trainer.steps, trainer.batch_size,
trainer.lr, trainer.strategy, seed, device, resume, init_from, run_dir, eval.every, eval.env, wandb.enabled.
Print the composed config with `vla train --cfg [overrides]`.
"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(HELP)
        return 0
    from omegaconf import OmegaConf

    from vla.config import compose

    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    cfg = compose("train", overrides)
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from vla.training import train

    run_dir = train(cfg)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run dir: {run_dir}")
    return 0
