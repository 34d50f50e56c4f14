"""Gradient accumulation fused into the op that makes an expert weight's gradient.

Under gradient accumulation every micro-batch after the first adds its weight gradients into the
.grad the earlier ones left. Through autograd that is a product written, then AccumulateGrad's add
(a read of both, a write): for the experts, two passes over every expert weight gradient a
micro-batch. Modules that declare `accumulate_grads` (moe/experts.py GroupedMLP and its FP8
subclass) add into .grad themselves while the trainer holds `adding_grads_in_place` on: the FP8
weight-gradient GEMMs in their epilogue, the BF16 experts in their weight cast's backward
(kernels/grad_cast.py), and backward hands AccumulateGrad no gradient for those weights. A hook
that waits on AccumulateGrad then sees none: the trainer keeps the plain path on DDP's syncing
micro-batch (its all-reduce starts there) and under FSDP (which accumulates sharded gradients).

    with adding_grads_in_place(model, on):
        ... one micro-batch's forward and backward ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def grad_to_add_into(w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """w.grad where backward may add w's gradient into it: w a leaf (not an FSDP or EP shard's
    local view) whose gradient so far is a plain contiguous fp32 tensor of its shape, outside a
    compiled graph (which may not mutate what it reads as a leaf's gradient); else None."""
    g = None if w is None else w.grad
    if g is None or not w.is_leaf or type(g) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    return g if g.dtype == torch.float32 and g.shape == w.shape and g.is_contiguous() else None


@contextlib.contextmanager
def adding_grads_in_place(model: nn.Module, on: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: every module declaring `accumulate_grads`
    adds its weights' gradients into their .grad where `grad_to_add_into` allows (on=True)."""
    owners = [m for m in model.modules() if hasattr(type(m), "accumulate_grads")]
    for m in owners:
        m.accumulate_grads = on
    try:
        yield
    finally:
        for m in owners:
            m.accumulate_grads = False
