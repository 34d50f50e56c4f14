"""Tensorwise quantization to FP8: one given scale for the whole tensor, and the tensor's amax.

    quantize_tensor(x, scale, fp8_dtype) -> (q fp8 with x's shape, amax fp32 0-dim)

Delayed scaling knows its scale before it reads x (it comes from the amax history), so the cast
and the amax that feeds the history are one pass: one read of x, one write of q, plus one fp32
per program (the partial amaxes, reduced by a tiny torch amax). Current scaling takes x's amax
first (a separate read; inherent: the scale must exist before the first element is cast).

Partial amaxes instead of an atomic max: deterministic, and no float atomics in the interpreter.
E4M3 (max 448) or E5M2 (max 57344): the clamp bound is a constexpr, the format is q's dtype.
Scale rule and quantization (x * (1 / scale)): kernels/common.py. Under Triton's interpreter the
fp32 -> fp8 cast can round wrongly across a binade (kernels/common.py): there the kernel rounds
to the format's grid first. Launch shape (4096 elements, 8 warps a program) is a first guess, not
yet swept on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, TL_FP32_MIN_NORMAL, tl_fp8_inverse, tl_round_to_fp8_grid, triton_interpret
from kernels.contracts import check_quantize_tensor_args
from kernels.dispatch import kernel_op
from kernels.reference import torch_quantize_tensor

_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _quantize_tensor_kernel(
    x_ptr, scale_ptr, q_ptr, partial_amax_ptr, N,
    FMAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_amax_ptr + pid, tl.max(tl.abs(x), axis=0))
    # The clamp stays on the GPU: a delayed scale comes from earlier steps' amaxes, so |x * inv|
    # can pass FMAX by any factor (and E5M2's bound is its own). Scales below the rule's floor
    # act as the floor (see torch_quantize_tensor).
    q = x * tl_fp8_inverse(tl.maximum(tl.load(scale_ptr), TL_FP32_MIN_NORMAL))
    q = tl.minimum(tl.maximum(q, -FMAX), FMAX)
    if INTERPRET:  # the interpreter's cast is exact only for values on the format's grid
        q = tl_round_to_fp8_grid(q, MANT_BITS, MIN_EXP)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def triton_quantize_tensor(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 cast of x by one scale, and x's amax; see the module docstring."""
    check_quantize_tensor_args(x, scale, fp8_dtype)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return q, torch.zeros((), dtype=torch.float32, device=x.device)
    grid = triton.cdiv(n, _BLOCK)
    partial = torch.empty(grid, dtype=torch.float32, device=x.device)
    e4m3 = fp8_dtype == torch.float8_e4m3fn
    _quantize_tensor_kernel[(grid,)](
        x, scale, q, partial, n,
        FMAX=torch.finfo(fp8_dtype).max, MANT_BITS=3 if e4m3 else 2, MIN_EXP=-6 if e4m3 else -14,
        INTERPRET=triton_interpret(), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return q, partial.amax()


def _fake_quantize_tensor(x, scale, fp8_dtype=FP8_DTYPE):
    check_quantize_tensor_args(x, scale, fp8_dtype)
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((), dtype=torch.float32)


quantize_tensor = kernel_op("quantize_tensor", triton_quantize_tensor, _fake_quantize_tensor, torch_quantize_tensor)
