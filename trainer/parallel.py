"""Process group, device and data parallelism, applied to a built model from outside it.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is one process. NCCL on GPUs,
gloo on CPUs. Data parallelism is DDP or FSDP2 (`fully_shard` per block, then the root).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ParallelConfig, RunConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(run: RunConfig, local_rank: int) -> torch.device:
    if run.device == "cuda" or (run.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(run: RunConfig, par: ParallelConfig) -> DistEnv:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(run, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if par.ep != 1:
        raise ValueError(
            f"parallel.ep={par.ep}: expert parallelism is not available in this version; use parallel.ep=1"
        )
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return DistEnv(rank, world_size, local_rank, device)


def apply_data_parallel(model: nn.Module, env: DistEnv, par: ParallelConfig) -> nn.Module:
    """Wrap for data parallelism; a single process returns the model unchanged."""
    if not env.distributed:
        return model
    if par.backend == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    # Buffers (router expert bias) are kept identical by all-reducing the load they are updated
    # from, so DDP need not broadcast them every forward.
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_(t: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=op)
    return t


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
