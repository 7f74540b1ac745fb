"""Process-group plumbing for ``torchrun``: one code path for 1 CPU, 1 GPU or many of either.

``torchrun --nproc_per_node=N -m vla train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; ``init()`` reads them, picks the backend (nccl on CUDA, gloo on CPU),
binds the CUDA device, and returns a ``DistInfo``. Without those variables it is a no-op
(world size 1). ``wrap_model`` applies DDP or FSDP per ``trainer.strategy``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits. ``world_size == 1`` means no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when present, else CPU; otherwise ``torch.device(name)``."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if the environment names one; return this process's place."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 0, 1, dev, False)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), dev, False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, dev, True)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if ``init`` created it."""
    import torch.distributed as dist

    if info.initialized_here and dist.is_initialized():
        if info.distributed:
            # Flush every rank's pending collectives first: a gloo group torn down while the peer still
            # has queued work blocks forever in its destructor (seen in tests/test_ddp.py under load).
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.distributed and dist.is_initialized():
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """Send a picklable object from rank 0 to every rank (identity when not distributed)."""
    import torch.distributed as dist

    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging only)."""
    import torch.distributed as dist

    if not info.distributed or not values:
        return values
    keys = list(values)  # the same order on every rank (same code path)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def pick_strategy(strategy: str, num_params: int, info: DistInfo, fsdp_min_params: int = 100_000_000) -> str:
    """``auto`` -> ``none`` for one process; ``fsdp`` on CUDA for models of ``fsdp_min_params`` or more
    (the base preset and larger); else ``ddp``."""
    if strategy not in ("auto", "ddp", "fsdp", "none"):
        raise ValueError(f"trainer.strategy: expected one of auto|ddp|fsdp|none, got '{strategy}'")
    if not info.distributed:
        return "none"
    if strategy != "auto":
        return strategy
    large = num_params >= fsdp_min_params
    return "fsdp" if (large and info.device.type == "cuda") else "ddp"


def wrap_model(model: nn.Module, strategy: str, info: DistInfo, bf16: bool = False) -> nn.Module:
    """Wrap ``model`` for data-parallel training. ``strategy`` is already resolved (none|ddp|fsdp)."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # static_graph: the set of used parameters is fixed per run (the switches decide it), so DDP can
        # learn it once instead of searching the autograd graph for unused parameters every step.
        return DDP(model, device_ids=ids, static_graph=True)
    if strategy == "fsdp":
        # FSDP2 (`fully_shard`): parameters become DTensors sharded over the ranks; it runs on CUDA (nccl)
        # and on CPU (gloo), so the same path is tested on a CPU machine.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kw = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
        # One shard unit for the whole model: the MoT layers run their experts' pieces (norms, QKV, MLP)
        # interleaved inside one joint attention rather than through each layer's forward, so per-layer
        # units would never be gathered. Parameters, gradients and optimizer state stay sharded between
        # steps (ZeRO-3 at rest); the full parameters exist only during forward/backward.
        fully_shard(model, **kw)
        return model
    raise ValueError(f"unknown strategy '{strategy}'")


def unwrap(model: nn.Module) -> nn.Module:
    """The user module under DDP (FSDP2 shards the module in place, so it is its own user module)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` was sharded by ``fully_shard`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU copy of the module's state dict; under FSDP only rank 0 gets tensors
    (a collective: every rank must call it)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    # copy=True: on CPU .cpu() would alias the live parameters, which the EMA swap then overwrites.
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into a plain, DDP or FSDP model (every rank passes the full dict)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    unwrap(model).load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state to checkpoint: ``optimizer.state_dict()``, or under FSDP the full,
    name-keyed state gathered on rank 0 (a collective)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def set_threads(num_threads: int | None, info: DistInfo) -> None:
    """CPU intra-op threads: ``trainer.num_threads`` if set, else the cores shared out among the
    local ranks (unless the user set OMP_NUM_THREADS)."""
    if info.device.type != "cpu":
        return
    n = int(num_threads or 0)
    if n <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Without them oneDNN emulates bf16 and autocast is slower than fp32, so ``auto`` stays fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(value: Any, device: torch.device) -> bool:
    """``trainer.bf16``: ``auto``, true or false.

    ``auto`` = bf16 autocast on CUDA devices that support it and on CPUs with native bf16
    (`cpu_has_native_bf16`); weights, optimizer state and the residual stream stay fp32.
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"trainer.bf16: expected auto|true|false, got '{value}'")
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_has_native_bf16()
    return bool(value)
