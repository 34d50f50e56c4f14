"""A bf16 (or fp16) weight gradient brought to its fp32 parameter in one pass: `grad_to_fp32` writes
it as a new fp32 tensor (the cast's backward), `add_grad_` adds it into the fp32 .grad that earlier
micro-batches left (AccumulateGrad's add with the cast fused into it).

Why a kernel: torch's CUDA copy between different dtypes takes its dynamic-casting path (one element
a thread, no vector loads) for bf16 -> fp32; at Mixtral width that cast of the expert gradients ran
at ~1.9 TB/s, where this kernel reads 2 bytes and writes 4 at the copy's speed. Under gradient
accumulation the fused add moves 10 bytes an element where the cast and AccumulateGrad's add moved
18 (2 + 4, then 4 + 4 + 4). bench/NOTES.md has the measurements.

The sum is the reference's to the bit: one fp32 add of the same two values. Shape letter
(README.md): N a gradient's elements, flattened.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import use_triton

BLOCK = 4096  # elements a program: 8 warps, 16 a thread (two 16-byte bf16 loads)
GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _grad_to_fp32_kernel(g_ptr, into_ptr, out_ptr, N, ADD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x = tl.load(into_ptr + offs, mask=mask, other=0.0) + x
    tl.store(out_ptr + offs, x, mask=mask)


def _check(g: torch.Tensor, into: torch.Tensor | None) -> None:
    if g.dtype not in GRAD_DTYPES:
        raise ValueError(f"the gradient must be one of {GRAD_DTYPES}, got {g.dtype}")
    if into is not None and (into.dtype != torch.float32 or into.shape != g.shape or into.device != g.device):
        raise ValueError(f"into must be a float32 tensor of the gradient's shape {tuple(g.shape)} on {g.device}, "
                         f"got {into.dtype} {tuple(into.shape)} on {into.device}")  # fmt: skip


def _launch(g: torch.Tensor, into: torch.Tensor | None, out: torch.Tensor) -> None:
    N = g.numel()
    if N:
        _grad_to_fp32_kernel[(triton.cdiv(N, BLOCK),)](g, out if into is None else into, out, N, ADD=into is not None,
                                                       BLOCK=BLOCK, num_warps=8)  # fmt: skip


def _kernel_takes(g: torch.Tensor, *others: torch.Tensor) -> bool:
    """Contiguous operands on a GPU (or the interpreter); a strided one takes torch's ops."""
    return use_triton(g) and g.is_contiguous() and all(t.is_contiguous() for t in others)


def grad_to_fp32(g: torch.Tensor) -> torch.Tensor:
    """g in float32 (a new tensor, g's shape, contiguous): `g.to(torch.float32)`, in one pass."""
    _check(g, None)
    if g.dtype == torch.float32 or not _kernel_takes(g):
        return g.to(torch.float32)
    out = torch.empty(g.shape, dtype=torch.float32, device=g.device)
    _launch(g, None, out)
    return out


def add_grad_(into: torch.Tensor, g: torch.Tensor) -> None:
    """into (float32) += g in float32, in place: `into.add_(g.to(torch.float32))`, in one pass."""
    _check(g, into)
    if not _kernel_takes(g, into):
        into.add_(g.to(torch.float32))
        return
    _launch(g, into, into)
