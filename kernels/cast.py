"""fp32 <-> bf16 casts at copy speed. Off the training path since 72c0dad: the rowwise weight
gradient, its one user, moved to our Triton GEMM, which writes fp32 itself; bench/gemm.py still
times the replaced path (CUTLASS bf16 out, then this cast) beside it.

    cast(x, dtype) -> x.to(dtype), same bytes (round to nearest even), contiguous in, contiguous out

Why not `x.to(dtype)`: torch's CUDA copy from bf16 to fp32 runs `unrolled_elementwise_kernel`
(no vector loads): 2.16 TB/s on an H200 against 3.98 TB/s here (bench.kernels cast family,
kernels_cast.json). The CUTLASS rowwise GEMM writes the expert weight gradient in bf16 only, so
fp32 master weights need that cast every step: at Mixtral-8x7B width (8.4 GB moved for w1 and
w2) 3.9 ms with torch, 2.1 ms here. fp32 -> bf16 is at copy speed in torch already (4.37 TB/s, as here): callers use `.to`.

One program casts BLOCK consecutive elements (16 per thread: 64-byte fp32 / 32-byte bf16 vector
accesses); the grid covers the tensor, the tail under a mask. Triton's CPU interpreter truncates
fp32 -> bf16 instead of rounding to nearest even (the GPU's cvt.rn) and flushes subnormals: under
the interpreter the kernel moves integer bits (round to nearest even on the fp32 bits, NaN to
the quiet NaN), so tests compare bit for bit; the GPU code is the plain cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import triton_interpret, use_triton
from kernels.reference import check_cast_args, torch_cast

_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _bf16_bits(x):
    """The bf16 bit pattern (int32, low 16 bits) of fp32 x rounded to nearest even; NaN -> 0x7FC0."""
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r & 0xFFFF)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr, INTERPRET: tl.constexpr):
    """y = x.to(y's dtype). INTERPRET: x and y come as integer views and the kernel moves bits
    (the interpreter's own casts truncate and flush subnormals; module docstring)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if EVEN:
        x = tl.load(x_ptr + offs)
    else:
        x = tl.load(x_ptr + offs, mask=mask)
    if INTERPRET:
        if x.dtype == tl.int32:  # fp32 bits -> bf16 bits
            y = _bf16_bits(x.to(tl.float32, bitcast=True)).to(tl.int16)
        else:  # bf16 bits (int16) -> fp32 bits
            y = (x.to(tl.int32) & 0xFFFF) << 16
    else:
        y = x.to(y_ptr.dtype.element_ty)
    if EVEN:
        tl.store(y_ptr + offs, y)
    else:
        tl.store(y_ptr + offs, y, mask=mask)


def _cast_impl(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_cast_args(x, dtype)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        interpret = triton_interpret()
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
        xk, yk = (x.view(bits[x.dtype]), y.view(bits[dtype])) if interpret else (x, y)
        _cast_kernel[(triton.cdiv(n, _BLOCK),)](
            xk, yk, n, BLOCK=_BLOCK, EVEN=n % _BLOCK == 0, INTERPRET=interpret, num_warps=_NUM_WARPS
        )
    return y


triton_cast = torch.library.custom_op("fp8moe::cast", mutates_args=())(_cast_impl)


@triton_cast.register_fake
def _(x, dtype):
    check_cast_args(x, dtype)
    return x.new_empty(x.shape, dtype=dtype)


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as `dtype` (fp32 <-> bf16; the same dtype returns x itself). Eager calls skip the custom
    op's dispatch; torch.compile traces the op."""
    if x.dtype == dtype:
        return x
    if not use_triton(x):
        return torch_cast(x, dtype)
    if torch.compiler.is_compiling():
        return triton_cast(x, dtype)
    return _cast_impl(x, dtype)
