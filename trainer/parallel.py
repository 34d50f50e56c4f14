"""Process group, device, data and expert parallelism, applied to a built model from outside it.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is one process. NCCL on GPUs,
gloo on CPUs. Data parallelism is DDP or FSDP2 (`fully_shard` per block, then the root).

Expert parallelism (parallel.ep = W > 1): a (dp, ep) device mesh of world_size / W x W ranks.
Ranks [k*W, (k+1)*W) form an EP group; ranks with the same EP index form an expert-data-parallel
("dp") group. Every rank sees different data (data parallelism over all ranks). Each MoE layer
gets a moe.all_to_all.AllToAllDispatcher (FP8 rows on the wire when given the experts' recipe;
all layers' all-to-alls timed by one CommTimer when given); its experts keep only their local
slice of w1/w2, held as DTensors of the full (E, ...) shape, placements (Replicate() over dp,
Shard(0) over ep), so DCP saves each expert shard once and the optimizer state follows. A
forward pre-hook hands the module the local shards as plain tensors (the model code never sees
a DTensor); autograd brings the gradient back onto the DTensor parameter.

Gradients under EP (`reduce_gradients`, called by the trainer instead of wrapping in DDP, whose
one process group cannot serve both parameter kinds): each rank's loss is the mean over its own
tokens, the global loss the mean over ranks, so the EP=1 gradient is (1 / world) sum_r grad_r.
Non-expert gradients: all-reduce (sum) over all ranks, divide by world size. Expert gradients
already hold the sum over their EP group (the all-to-all backward brought every EP rank's
contribution): all-reduce over the dp group, divide by world size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe.comm_timer import CommTimer
from moe.fp8.recipe import Fp8Recipe
from trainer.config import ParallelConfig, RunConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ep: int = 1  # expert-parallel size
    mesh: object = None  # DeviceMesh ("dp", "ep") when ep > 1

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def edp_group(self):
        """Ranks holding the same experts (same EP index): expert gradients reduce over these."""
        return self.mesh.get_group("dp")

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
    par.validate(world_size=world_size)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    mesh = None
    if par.ep > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size // par.ep, par.ep), mesh_dim_names=("dp", "ep"))
    return DistEnv(rank, world_size, local_rank, device, par.ep, mesh)


# ---- expert parallelism ------------------------------------------------------------------------


def _use_local_shards(module: nn.Module, args) -> None:
    """Forward pre-hook: swap the DTensor expert weights for their local shards (differentiable)."""
    module._ep_params = {name: module._parameters[name] for name in ("w1", "w2")}
    for name, param in module._ep_params.items():
        module._parameters[name] = param.to_local()


def _restore_params(module: nn.Module, args, output) -> None:
    for name, param in module.__dict__.pop("_ep_params", {}).items():
        module._parameters[name] = param


def apply_expert_parallel(
    model: nn.Module, env: DistEnv, *, fp8_recipe: Fp8Recipe | None = None, timer: CommTimer | None = None
) -> nn.Module:
    """Shard every MoE layer's experts over the EP group and install the all-to-all dispatcher.

    Call on a built, initialised model (every rank built the same full weights from one seed),
    after the FP8 conversion: each rank keeps experts [r*Z, (r+1)*Z) of every layer.
    fp8_recipe: the FP8 experts' recipe to send E4M3 rows quantized by it; None sends BF16 rows
    (FP8 experts then quantize after receiving).
    timer: shared by every layer's dispatcher, so it sums the whole model's all-to-alls.
    """
    if env.ep == 1:
        return model
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from moe.all_to_all import AllToAllDispatcher

    ep_rank = env.mesh.get_local_rank("ep")
    for layer in model.moe_layers():
        experts = layer.experts
        E = layer.num_experts
        Z = E // env.ep  # ParallelConfig.validate checked that EP divides E
        for name in ("w1", "w2"):
            full = getattr(experts, name)
            local = full.detach()[ep_rank * Z : (ep_rank + 1) * Z].clone()
            shard = DTensor.from_local(
                local, env.mesh, [Replicate(), Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        experts.num_experts = Z
        experts.register_forward_pre_hook(_use_local_shards)
        experts.register_forward_hook(_restore_params, always_call=True)
        layer.dispatcher = AllToAllDispatcher(env.ep_group, E, fp8_recipe, timer)
    return model


def _is_expert_param(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


@torch.no_grad()
def reduce_gradients(model: nn.Module, env: DistEnv) -> None:
    """Under EP: average gradients as DDP would over one global batch (module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a parameter without gradient on one rank must still join the collective
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dense = [p.grad for p in params if not _is_expert_param(p)]
    flat = torch._utils._flatten_dense_tensors(dense)
    dist.all_reduce(flat)
    flat /= env.world_size
    for g, reduced in zip(dense, torch._utils._unflatten_dense_tensors(flat, dense)):
        g.copy_(reduced)
    experts = [p.grad.to_local() for p in params if _is_expert_param(p)]
    if experts:
        flat = torch._utils._flatten_dense_tensors(experts)
        if env.world_size // env.ep > 1:
            dist.all_reduce(flat, group=env.edp_group)
        flat /= env.world_size
        for g, reduced in zip(experts, torch._utils._unflatten_dense_tensors(flat, experts)):
            g.copy_(reduced)


@torch.no_grad()
def clip_grad_norm_ep(model: nn.Module, max_norm: float, env: DistEnv) -> torch.Tensor:
    """Global gradient norm under EP (after `reduce_gradients`), clipped like clip_grad_norm_.

    Non-expert gradients are identical on every rank; expert shards are summed over the EP group.
    """
    dense_sq = torch.zeros((), dtype=torch.float32, device=env.device)
    expert_sq = torch.zeros((), dtype=torch.float32, device=env.device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for g in grads:
        if _is_expert_param(g):
            expert_sq += g.to_local().float().pow(2).sum()
        else:
            dense_sq += g.float().pow(2).sum()
    dist.all_reduce(expert_sq, group=env.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if _is_expert_param(g) else g).mul_(coef)
    return total


def apply_data_parallel(model: nn.Module, env: DistEnv, par: ParallelConfig) -> nn.Module:
    """Wrap for data parallelism; a single process (or EP, see `reduce_gradients`) returns the
    model unchanged."""
    if not env.distributed or env.ep > 1:
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
