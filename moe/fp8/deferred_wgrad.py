"""The FP8 experts' weight gradients made once a step, in the last micro-batch's backward.

Under gradient accumulation each micro-batch's FP8 weight-gradient GEMM adds into the fp32 .grad:
at ~1024 tokens an expert that read and write (8 bytes an expert-weight element, every
micro-batch), not the tensor cores, bounds it (bench/NOTES.md). Deferred, a micro-batch's backward
keeps the FP8 column operands its two weight-gradient GEMMs would read (dyt and at for w2, dht
and xt for w1: one byte a padded token and feature, with their scales) in a slot of a
`WgradStash`, and returns no gradient for the expert weights; the last micro-batch's backward runs
each weight's GEMM once over every micro-batch's tokens (kernels/grouped_gemm_wgrad_segments.py)
and returns the sum, which AccumulateGrad (and DDP's all-reduce hook on it) takes as it would
any gradient. The experts' fp32 .grad then does not exist before the step's last backward.

The same sums as accumulating per micro-batch, up to fp32 rounding: rowwise scales are applied
once per micro-batch segment in both (tests/test_deferred_wgrad.py compares trainer steps).

    with deferring_expert_wgrad(model, micro_batches, on) as mark_last:
        for each micro-batch: mark_last(is_last); forward; backward

Where a weight is not a leaf (an expert-parallel shard's local view), under torch.compile, or
on a module the context did not reach, the experts make their gradients per micro-batch as before.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from kernels.grouped_gemm_wgrad_segments import fp8_grouped_mm_wgrad_segments

Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # a_q, a_s, b_q, b_s, ends


class WgradStash:
    """One expert module's weight-gradient operands across a step's micro-batches: per weight
    name, `micro_batches` slots of (a_q, a_scale, b_q, b_scale, padded_end), allocated at the
    first micro-batch and freed when that weight's gradient is made."""

    def __init__(self, micro_batches: int) -> None:
        if micro_batches < 2:
            raise ValueError(f"a WgradStash defers over micro_batches >= 2, got {micro_batches}")
        self.micro_batches = micro_batches
        self.last = False  # the trainer marks the step's last micro-batch (`deferring_expert_wgrad`)
        self._slots: dict[str, list[torch.Tensor]] = {}
        self._count: dict[str, int] = {}

    def pending(self) -> list[str]:
        """Weights with stashed operands whose gradient has not been made."""
        return [name for name, n in self._count.items() if n]

    def take(self, name: str, operands: Operands, rowwise: bool, promotion_interval: int,
             into: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # fmt: skip
        """Stash this micro-batch's operands of weight `name`. At the last micro-batch, make the
        weight's fp32 gradient over every stashed micro-batch: added into `into` where given
        (None returned), else returned. Operands that no longer fit the slots (another shape)
        first have the earlier micro-batches' gradient made the same way, so none is lost."""
        out = None
        slots = self._slots.get(name)
        if slots is not None and (self._count[name] == self.micro_batches or
                                  any(s.shape[1:] != o.shape or s.dtype != o.dtype for s, o in zip(slots, operands))):
            out = self._flush(name, rowwise, promotion_interval, into)  # fmt: skip
        if name not in self._slots:
            self._slots[name] = [torch.empty((self.micro_batches, *o.shape), dtype=o.dtype, device=o.device)
                                 for o in operands]  # fmt: skip
            self._count[name] = 0
        n = self._count[name]
        for slot, o in zip(self._slots[name], operands):
            slot[n].copy_(o)
        self._count[name] = n + 1
        if self.last:
            flushed = self._flush(name, rowwise, promotion_interval, out if out is not None else into)
            out = flushed if out is None else out
        return out

    def _flush(self, name: str, rowwise: bool, promotion_interval: int,
               into: Optional[torch.Tensor]) -> Optional[torch.Tensor]:  # fmt: skip
        n = self._count.pop(name)
        slots = [s[:n] for s in self._slots.pop(name)]
        grad = fp8_grouped_mm_wgrad_segments(*slots, rowwise=rowwise, promotion_interval=promotion_interval,
                                             into=into)  # fmt: skip
        return None if into is not None and grad is into else grad


def deferrable(w: torch.Tensor) -> bool:
    """Whether w's gradient may be returned once a step: a leaf that AccumulateGrad owns, in eager
    mode (a compiled graph cannot keep Python state across micro-batches)."""
    return w.is_leaf and w.requires_grad and not torch.compiler.is_compiling()


@contextlib.contextmanager
def deferring_expert_wgrad(model: nn.Module, micro_batches: int, on: bool) -> Iterator[Callable[[bool], None]]:
    """Around a step's micro-batches: every module declaring `wgrad_stash` gets a WgradStash
    (on=True, micro_batches >= 2). Yields mark_last(is_last), called before each micro-batch.
    Raises if a weight's operands are still stashed when the step ends (its gradient would be
    lost: a last backward that did not reach the module)."""
    owners = [m for m in model.modules() if hasattr(type(m), "wgrad_stash")] if on and micro_batches > 1 else []
    for m in owners:
        m.wgrad_stash = WgradStash(micro_batches)

    def mark_last(is_last: bool) -> None:
        for m in owners:
            m.wgrad_stash.last = is_last

    try:
        yield mark_last
        left = [f"{type(m).__name__}.{name}" for m in owners for name in m.wgrad_stash.pending()]
        if left:
            raise RuntimeError(f"the step ended with weight-gradient operands stashed for {left}: the last "
                               f"micro-batch's backward did not make their gradients (run.defer_expert_wgrad)")
    finally:
        for m in owners:
            m.wgrad_stash = None
