"""`vla.training`: the application that trains a VLA from an episode store (`vla train`).

- ``loop``        the training loop: :class:`Trainer` and ``train(cfg) -> run_dir``
- ``data``        open the store, pick train/validation episodes, model fields from the store
- ``data_order``  the seeded, resumable batch order (``ResumableBatchSampler``, ``DataPosition``)
- ``optim``       learning-rate schedule, AdamW over ``VLA.optimizer_groups``, the loss wrapper
- ``resume``      what a checkpoint must agree on to be resumed, and the saved RNG states
- ``metrics``     train.log, metrics.jsonl, TensorBoard, wandb
- ``augment``, ``ema``, ``distributed``  image augmentation, weight EMA, DDP/FSDP helpers

It sits above the core (``vla.model``, ``vla.processor``, ``vla.checkpoint``...), which never
imports it.
"""

from vla.training.loop import Trainer, train

__all__ = ["Trainer", "train"]
