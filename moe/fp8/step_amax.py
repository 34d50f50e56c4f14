"""The rowwise FP8 expert weights' amaxes, taken by the optimizer step that writes the weights.

The rowwise recipe quantizes each expert weight once per step from its fp32 master, after a pass
over the whole master (4 bytes an element read) that only finds its per-row and per-column amaxes
(kernels/quantize_weight.py). The optimizer holds every new value in registers as it writes it:
kernels/adamw.py (amax) takes the amaxes there, and the quantizer takes them given.

    Fp8Training.convert             marks a rowwise Fp8GroupedMLP's w1 and w2 (`want_step_amax`)
    optimizer.step                  updates a marked weight with `amax_buffer(p)`, then `record(p)`
    the module's next quantization  `fresh_amax(w)`: the buffer where nothing changed w since
                                    (its version counter is the one recorded), else None (the
                                    quantizer takes its own: a checkpoint load, an optimizer
                                    without the kernel, any in-place write bumps the counter)

Weights held whole on a rank (plain tensors: one GPU, DDP) only: FSDP and expert parallelism
make them DTensors whose shards are quantized from other views (the optimizer leaves them alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.tensor import DTensor

_ATTR = "step_amax"  # the Parameter attribute holding its StepAmax


@dataclass
class StepAmax:
    buffer: Optional[torch.Tensor] = None  # int32 (E * N + E * K,): fp32 bits, rows then columns
    version: int = -1  # the weight's version counter when the buffer was written


def want_step_amax(p: torch.Tensor) -> None:
    """Ask the optimizer for p's rowwise amaxes at every step (p: (E, N, K))."""
    setattr(p, _ATTR, StepAmax())


def amax_buffer(p: torch.Tensor) -> Optional[torch.Tensor]:
    """The buffer the optimizer's step of p writes the amaxes into, or None: p not marked, or not a
    plain 3-D tensor."""
    holder = getattr(p, _ATTR, None)
    if holder is None or isinstance(p, DTensor) or p.dim() != 3:
        return None
    E, N, K = p.shape
    if holder.buffer is None or holder.buffer.device != p.device:
        holder.buffer = torch.zeros(E * N + E * K, dtype=torch.int32, device=p.device)
    return holder.buffer


def record(p: torch.Tensor) -> None:
    """After the step wrote p and its amaxes: p's version moves on (a kernel's write does not move
    it), and the amaxes belong to that version."""
    torch.autograd.graph.increment_version(p)
    getattr(p, _ATTR).version = p._version


def fresh_amax(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The amaxes of the parameter w's current values, or None where there are none (module
    docstring)."""
    holder = getattr(w, _ATTR, None)
    if holder is None or holder.buffer is None or torch.compiler.is_compiling():
        return None
    return holder.buffer if holder.version == w._version else None
