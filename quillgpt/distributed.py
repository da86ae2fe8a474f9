"""Data parallel (DDP) and sharded (FSDP) training, applied to an unchanged model from outside.

`quill train` under `torchrun --nproc_per_node=N -m quillgpt train ...` finds torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL on GPUs, gloo on CPU)
and wraps the model: `DistributedDataParallel`, or with `--fsdp` PyTorch's `fully_shard` on each
transformer block and on the whole model. Only rank 0 logs and writes files. All communication
is PyTorch's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import QuillError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device, fsdp: bool) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group, if launched by it; the device this rank trains on."""
    if not launched_by_torchrun():
        if fsdp:
            raise QuillError("--fsdp needs several processes: launch with "
                             "torchrun --nproc_per_node=N -m quillgpt train ... --fsdp")
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, fsdp), device


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per transformer block, then the root), or the model itself."""
    if not info.enabled:
        return model
    if info.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        blocks = getattr(getattr(model, "transformer", None), "h", [])
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks (gloo has no AVG, so SUM / world_size)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (e.g. a stop signal)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Unsharded weights on the CPU (collective under FSDP; only rank 0 gets them)."""
    from .checkpoint import state_dict_for_saving

    if not info.fsdp:
        return state_dict_for_saving(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in sd.items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The optimizer's state dict: its own under DDP / one process, unsharded by parameter name
    under FSDP (collective; only rank 0 gets it)."""
    if not info.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optim_state: dict, info: DistInfo) -> None:
    """Load unsharded weights and optimizer state written by `full_*_state`."""
    if not info.fsdp:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # rank 0 holds the full state and broadcasts it tensor by tensor; the others pass nothing
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights if info.is_main else {}, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state if info.is_main else {}, options=options)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
