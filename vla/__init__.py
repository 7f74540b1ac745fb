"""vla: an open vision-language-action robotics stack.

One transformer reads camera images and a language instruction, writes a text plan of
subtasks, and through Mixture-of-Transformers experts generates continuous action chunks by
flow matching (and optionally a future camera frame). Sub-packages:

- ``vla``            the core: model, attention, flow, tokenizer, processor, normalization,
                     observation format, checkpoint (folder ``vla/``); it imports no application
- ``vla.training``, ``vla.evaluation``, ``vla.serving``, ``vla.commands`` (the CLI), ``vla.bench``
                     the applications built on the core (see docs/architecture.md)
- ``vla.envs``       MuJoCo Gymnasium environments and scripted experts (folder ``envs/``)
- ``vla.policies``   the policy interface and its implementations (folder ``policies/``)
- ``vla.datasets``   the Zarr episode store and window sampler (folder ``datasets/``)
- ``vla.configs``    Hydra configs (folder ``configs/``)
"""

__version__ = "0.1.0"
