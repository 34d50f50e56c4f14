"""Casts of fp32 weights to the compute dtype made once and shared by several forwards: a
training step's micro-batches (trainer/loop.py opens the scope with run.weight_cast=step).

    with weights_cast_once(model):
        for batch in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch)
            loss.backward()

Inside the scope every nn.Linear under autocast and every module that casts its own weights
(moe/experts.py GroupedMLP: it declares `_step_casts` and reads it in its forward) computes with
one copy of each fp32 weight, made by its first forward (a checkpointed block's recompute, on
any thread, reuses it too); on exit the copies are let go. Gradients are the same bits as a cast
in every forward: each forward makes its own autograd node around the shared copy (`CastWeight`),
whose backward casts the gradient back to fp32, as the cast's own backward does.

Why not one autocast region around the step, whose cache keeps casts of fp32 leaf parameters for
the region's life: the cached cast carries the graph node of the forward that made it, so every
later micro-batch's backward runs through that one old node, and autograd, which runs the newest
ready node first, runs it only after the whole rest of backward: every weight's bf16 gradient
then waits for backward's end, DDP's buckets become ready in another order and do not overlap
backward, and under CUDA a checkpointed recompute (on autograd's device thread, whose autocast
cache is its own) casts again anyway.

Copies are keyed by the weight's storage and version counter (moe/fp8/weight_cache.py), so a
weight changed in place inside a scope is cast again; the scope is still meant for spans where
the weights do not change (closed before the optimizer step), where FSDP's re-gathers bring
back the same values. Weights already in the compute dtype (FSDP's bf16 all-gathers) are not
cast, and a compiled graph casts inside itself (the version counter is not traceable).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from kernels.grad_cast import add_grad_, grad_to_fp32
from moe.fp8.weight_cache import WeightCache
from moe.grad_accumulation import grad_to_add_into


class CastWeight(torch.autograd.Function):
    """`w.to(dtype)` whose value `w_cast` was made without a graph (earlier, or just now): forward
    returns w_cast; backward brings the gradient to w's dtype in one pass (kernels/grad_cast.py),
    or with `add_in_place`, where moe/grad_accumulation.py allows, adds it into w.grad and returns
    none for w."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, w_cast: torch.Tensor, add_in_place: bool = False) -> torch.Tensor:
        ctx.w_dtype = w.dtype
        ctx.w = w if add_in_place else None
        return w_cast

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        into = grad_to_add_into(ctx.w)
        ctx.w = None
        if into is not None:
            add_grad_(into, grad)
            return None, None, None
        return (grad_to_fp32(grad) if ctx.w_dtype == torch.float32 else grad.to(ctx.w_dtype)), None, None


def _cast(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype)


class StepCasts:
    """The copies of one scope, one per (module, parameter name): under expert parallelism a
    module sees a new `to_local()` view of its DTensor weight every forward, the same storage."""

    def __init__(self) -> None:
        self._caches: dict[tuple[int, str], WeightCache] = {}

    def cast(self, module: nn.Module, name: str, w: torch.Tensor, dtype: torch.dtype,
             add_in_place: bool = False) -> torch.Tensor:  # fmt: skip
        """w in `dtype`, differentiable: the scope's copy, made on first use (`CastWeight`)."""
        if w.dtype == dtype or torch.compiler.is_compiling():
            return w.to(dtype)
        cache = self._caches.setdefault((id(module), name), WeightCache(_cast))
        return CastWeight.apply(w, cache.get(w, dtype), add_in_place)


def _swap_in(module: nn.Linear, args) -> None:
    """Forward pre-hook: inside a scope, the Linear's fp32 parameters replaced by the scope's
    copies, in the dtype autocast would cast them to (it then casts nothing of them)."""
    if torch.compiler.is_compiling():
        return
    casts = module.__dict__.get("_step_casts")
    device = module.weight.device.type
    if casts is None or not torch.is_autocast_enabled(device):
        return
    dtype = torch.get_autocast_dtype(device)
    swapped = {n: p for n, p in module._parameters.items() if p is not None and p.dtype == torch.float32}
    if swapped and dtype != torch.float32:
        module._swapped_params = swapped
        # Last parameter first, as autocast casts F.linear's arguments: each gradient then reaches
        # its parameter in the same order as through autocast's casts (DDP fills its buckets so).
        for name, p in reversed(swapped.items()):
            module._parameters[name] = casts.cast(module, name, p, dtype)


def _swap_out(module: nn.Linear, args, output) -> None:
    module._parameters.update(module.__dict__.pop("_swapped_params", {}))


@contextlib.contextmanager
def weights_cast_once(model: nn.Module) -> Iterator[StepCasts]:
    """The scope of the module docstring over every nn.Linear (not its FP8 subclasses) and every
    module declaring `_step_casts` in `model`. The first scope gives each Linear the two hooks
    that swap its parameters for the copies, for good: outside a scope they do nothing, and a
    compiled block, whose graph casts by itself, is not recompiled at every scope."""
    casts = StepCasts()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    owners = linears + [m for m in model.modules() if hasattr(type(m), "_step_casts")]
    for m in linears:
        if not m.__dict__.get("_step_cast_hooks", False):
            m.register_forward_pre_hook(_swap_in)
            m.register_forward_hook(_swap_out, always_call=True)
            m._step_cast_hooks = True
    try:
        for m in owners:
            m._step_casts = casts
        yield casts
    finally:
        for m in owners:
            m._step_casts = None
