"""Process group, device, data and expert parallelism, applied to a model from outside it.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is one process. NCCL on GPUs,
gloo on CPUs. Every multi-process run gets a (dp, ep) device mesh of world_size / W x W ranks,
W = parallel.ep: ranks [k*W, (k+1)*W) form an EP group; ranks with the same EP index form an
expert-data-parallel ("dp") group. Every rank sees different data (data parallelism over all
ranks).

Expert parallelism (W > 1): each MoE layer gets a moe.all_to_all.AllToAllDispatcher (FP8 rows on
the wire when given the experts' recipe; all layers' all-to-alls timed by one CommTimer when
given); its experts keep only their E / W experts of w1/w2, held as DTensors of the full (E, ...)
shape on the ep mesh, placement Shard(0), so DCP saves each expert once and reshards it at load.
A forward pre-hook hands the module the local experts as plain tensors (the model code never sees
a DTensor); autograd brings the gradient back onto the DTensor parameter.

Data parallelism, parallel.backend:
- ddp: DDP when W = 1. Under EP, `reduce_gradients` instead (DDP's one process group cannot serve
  both parameter kinds): each rank's loss is the mean over its own tokens, the global loss the
  mean over ranks, so the EP=1 gradient is (1 / world) sum_r grad_r. Dense gradients: all-reduce
  over all ranks, divide by world size. Expert gradients already hold the sum over their EP group
  (the all-to-all backward brought every EP rank's contribution): all-reduce over dp, divide by
  world size.
- fsdp: FSDP2 `fully_shard` per block and the root over all ranks; under EP the experts are their
  own FSDP unit over the dp group (their DTensor on ep then becomes a 2D (dp, ep) shard); their
  gradient is scaled by 1 / W on its way out of the module, so FSDP's mean over dp makes the
  1 / world of the EP sum as above. Every rank thus holds
  1 / world of every parameter, gradient and optimizer state. Blocks all-gather bf16 (fp32
  masters, fp32 gradient reduction) when run.dtype=bfloat16; the routers and the root (embedding,
  final norm, output) gather fp32, which is what the one-process run computes with. FP8 experts'
  weights gather as E4M3 + scales, each rank quantizing its own shard (parallel.fp8_all_gather,
  moe/fp8/fsdp_all_gather.py).
Gradient norms (`global_grad_norm`) sum every rank's local squares once per distinct shard, so one
function serves every layout.
"""

from __future__ import annotations

import datetime
import functools
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
    mesh: object = None  # DeviceMesh ("dp", "ep") when world_size > 1
    backend: str = "ddp"  # parallel.backend

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def edp_group(self):
        """Ranks holding the same experts (same EP index): expert gradients reduce over these."""
        return self.mesh.get_group("dp")

    @property
    def world_mesh(self):
        """A 1D mesh of every rank (the dense parameters' FSDP mesh), from the same root as the
        dp and ep meshes."""
        if self.ep == 1:
            return self.mesh["dp"]
        if self.ep == self.world_size:
            return self.mesh["ep"]
        return self.mesh["dp", "ep"]._flatten("dp_ep")

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.backend == "fsdp"

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
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size // par.ep, par.ep), mesh_dim_names=("dp", "ep"))
    return DistEnv(rank, world_size, local_rank, device, par.ep, mesh, par.backend)


# ---- expert parallelism ------------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _use_local_shards(module: nn.Module, args, grad_scale: float | None = None) -> None:
    """Forward pre-hook: swap the DTensor expert weights for their local shards (differentiable).
    grad_scale: under FSDP, 1 / W, so that FSDP's mean over the dp group makes the 1 / world of
    the module docstring (FSDP's own divide factor is not applied alike by every torch version
    when the dp group is one rank)."""
    module._ep_params = {name: module._parameters[name] for name in ("w1", "w2")}
    for name, param in module._ep_params.items():
        local = param.to_local()
        module._parameters[name] = local if grad_scale is None else _ScaleGrad.apply(local, grad_scale)


def _restore_params(module: nn.Module, args, output) -> None:
    for name, param in module.__dict__.pop("_ep_params", {}).items():
        module._parameters[name] = param


def apply_expert_parallel(
    model: nn.Module, env: DistEnv, *, fp8_recipe: Fp8Recipe | None = None, timer: CommTimer | None = None
) -> nn.Module:
    """Split every MoE layer's experts over the EP group and install the all-to-all dispatcher.

    On a meta-built model (the trainer's build) the shards are meta too, allocated later; on an
    initialised one every rank must hold the same full weights. Call after the FP8 conversion and
    before FSDP: each rank keeps experts [r*Z, (r+1)*Z) of every layer, r its EP index.
    fp8_recipe: the FP8 experts' recipe to send E4M3 rows quantized by it; None sends BF16 rows
    (FP8 experts then quantize after receiving).
    timer: shared by every layer's dispatcher, so it sums the whole model's all-to-alls.
    """
    if env.ep == 1:
        return model
    from torch.distributed.tensor import DTensor, Shard

    from moe.all_to_all import AllToAllDispatcher

    ep_mesh = env.mesh["ep"]
    ep_rank = ep_mesh.get_local_rank()
    for layer in model.moe_layers():
        experts = layer.experts
        E = layer.num_experts
        Z = E // env.ep  # ParallelConfig.validate checked that EP divides E
        for name in ("w1", "w2"):
            full = getattr(experts, name)
            local = full.detach()[ep_rank * Z : (ep_rank + 1) * Z]
            local = local if full.is_meta else local.clone()
            shard = DTensor.from_local(
                local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        experts.num_experts = Z
        scale = 1.0 / env.ep if env.fsdp else None
        experts.register_forward_pre_hook(functools.partial(_use_local_shards, grad_scale=scale))
        experts.register_forward_hook(_restore_params, always_call=True)
        layer.dispatcher = AllToAllDispatcher(env.ep_group, E, fp8_recipe, timer)
    return model


def _is_expert_param(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


@torch.no_grad()
def reduce_gradients(model: nn.Module, env: DistEnv) -> None:
    """DDP under EP: average gradients as DDP would over one global batch (module docstring)."""
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


def _copies(t: torch.Tensor, env: DistEnv) -> int:
    """How many ranks hold this very gradient shard: the world over the number of distinct shards."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return env.world_size
    mesh_shape = t.device_mesh.shape
    distinct = 1
    for size, placement in zip(mesh_shape, t.placements):
        if not isinstance(placement, Replicate):
            distinct *= size
    return env.world_size // distinct


@torch.no_grad()
def global_grad_norm(model: nn.Module, env: DistEnv) -> torch.Tensor:
    """The global gradient norm at any layout once gradients are reduced: plain tensors (one
    process, DDP, EP's dense part) and DTensor shards (EP experts, FSDP) alike. Each rank sums its
    local squares, each divided by the number of ranks holding that same shard, and one
    all-reduce adds them up."""
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in _grads(model):
        t = g.to_local() if hasattr(g, "to_local") else g
        if t.numel():
            by_copies.setdefault(_copies(g, env), []).append(t)
    sq = torch.zeros((), dtype=torch.float32, device=env.device)
    for copies, tensors in by_copies.items():
        norms = torch._foreach_norm(tensors)
        sq += torch.stack([n.float() for n in norms]).pow(2).sum() / copies
    all_reduce_(sq, env)
    return sq.sqrt()


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What torch.nn.utils.clip_grad_norm_ multiplies the gradients by: exactly 1.0 unless
    total + 1e-6 exceeds max_norm (never for max_norm=inf)."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


@torch.no_grad()
def scale_grads_(model: nn.Module, coef: torch.Tensor) -> None:
    """Every gradient (each rank's local shard) multiplied by coef, in place."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in _grads(model)]
    if local:
        torch._foreach_mul_(local, coef)


def clip_grad_norm_(model: nn.Module, max_norm: float, env: DistEnv) -> torch.Tensor:
    """The global gradient norm, and the gradients scaled as torch.nn.utils.clip_grad_norm_ would,
    at any layout (`global_grad_norm`). The trainer takes the two halves apart, to skip the scaling
    pass where the coefficient is 1 (trainer/loop.py)."""
    total = global_grad_norm(model, env)
    scale_grads_(model, clip_coefficient(total, max_norm))
    return total


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


# ---- data parallelism --------------------------------------------------------------------------


def _expose_router_output() -> None:
    """FSDP2 finds the tensors of a unit's output through pytree, to re-gather the unit's weights
    before their backward. The router returns a dataclass, one opaque leaf to pytree unless
    registered, and torch 2.11 then runs the router's backward on freed weights. Registering is
    once per process and changes nothing else."""
    from torch.utils import _pytree

    from moe.router import RouterOutput

    if RouterOutput not in _pytree.SUPPORTED_NODES:
        _pytree.register_dataclass(RouterOutput)


def apply_fsdp(
    model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None, fp8_all_gather: bool = False
) -> nn.Module:
    """FSDP2 over every rank, the experts over their dp group under EP (module docstring).
    param_dtype: what the blocks' all-gathers carry (None: the fp32 masters).
    fp8_all_gather: FP8 experts' weights travel as E4M3 + scales, each rank quantizing its shard
    (moe/fp8/fsdp_all_gather.py); BF16 experts and fp8.gemms ablations gather as above."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from moe.fp8.fsdp_all_gather import shard_as_fp8

    # Inputs keep their dtype: the residual stream stays fp32 between blocks, as in one process.
    blocks_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    _expose_router_output()
    world = env.world_mesh
    for block in model.layers:
        if block.is_moe:
            experts_mesh = env.mesh["dp"] if env.ep > 1 else world
            if fp8_all_gather:
                shard_as_fp8(block.ffn.experts, experts_mesh)
            fully_shard(block.ffn.router, mesh=world, mp_policy=fp32_mp)
            if env.ep > 1:
                fully_shard(block.ffn.experts, mesh=experts_mesh, mp_policy=blocks_mp)
        fully_shard(block, mesh=world, mp_policy=blocks_mp)
    fully_shard(model, mesh=world, mp_policy=fp32_mp)
    return model


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP for backend=ddp without EP; anything else returns the model unchanged."""
    if not env.distributed or env.ep > 1 or env.fsdp:
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
