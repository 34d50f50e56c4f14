"""SwiGLU of the BF16 experts and the dense SwiGLU MLPs, forward and backward, one pass each;
moe/swiglu_down.py's autograd Function calls them (its backward recomputes a from h).

Shape letters (README.md): M rows, F FFN hidden size, X = 2F columns of h ([gate | up], gate first).

    swiglu_fwd(h_MX) -> a_MF = silu(gate) * up                       (h's dtype)
    swiglu_bwd(h_MX, da_MF) -> dh_MX = [d gate | d up]                (h's dtype)

fp32 math whatever the dtypes (fp32, bf16, fp16 in and out), rounded once on the store: the
activation arithmetic of the FP8 experts' kernels (kernels/act_math.py: hardware exp2 and
reciprocal, FMAs), within its numerics contract of kernels/reference_act.py's fp32 values, which
kernels/reference_swiglu.py (the reference) rounds to the output dtype. A program owns a
BLOCK_M x BLOCK_F tile of a and reads the matching gate and up tiles (F need not be a power of
two: the tile is masked); h and da may have any row stride, their columns contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.act_math import LAUNCH_OPTIONS, act, act_bwd
from kernels.common import tl_round_bf16_if, triton_interpret
from kernels.dispatch import kernel_op
from kernels.reference_swiglu import check_swiglu_args, torch_swiglu_bwd, torch_swiglu_fwd

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # values of a a program computes (a whole row block of narrow F)


@triton.jit
def _store(ptr, v, mask, ROUND_BF16: tl.constexpr):
    tl.store(ptr, tl_round_bf16_if(v, ROUND_BF16).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(h_ptr, M, F, stride_h, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's rows (int64), columns, mask, and its tile of gate and up as fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    rows = rows.to(tl.int64)
    gate_ptr = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptr + F, mask=mask, other=0.0).to(tl.float32)
    return rows, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(
    h_ptr, a_ptr, M, F, stride_h,
    INTERP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    rows, cols, mask, g, u = _tile(h_ptr, M, F, stride_h, BLOCK_M, BLOCK_F)
    _store(a_ptr + rows[:, None] * F + cols[None, :], act(g, u, True, INTERP), mask, ROUND_BF16)


@triton.jit
def _swiglu_bwd_kernel(
    h_ptr, da_ptr, dh_ptr, M, F, stride_h, stride_da,
    INTERP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    rows, cols, mask, g, u = _tile(h_ptr, M, F, stride_h, BLOCK_M, BLOCK_F)
    da = tl.load(da_ptr + rows[:, None] * stride_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dg, du, _ = act_bwd(da, g, u, True, INTERP)
    dgate_ptr = dh_ptr + rows[:, None] * (2 * F) + cols[None, :]
    _store(dgate_ptr, dg, mask, ROUND_BF16)
    _store(dgate_ptr + F, du, mask, ROUND_BF16)


def _launch(M: int, F: int) -> tuple[tuple[int, int], int, int, int]:
    """(grid, BLOCK_M, BLOCK_F, num_warps): _TILE values a program, columns in blocks of up to 1024."""
    block_f = min(triton.next_power_of_2(F), 1024)
    block_m = max(1, _TILE // block_f)
    return (triton.cdiv(M, block_m), triton.cdiv(F, block_f)), block_m, block_f, 8


def _cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _flags(out: torch.Tensor) -> dict:
    interp = triton_interpret()
    return dict(INTERP=interp, ROUND_BF16=interp and out.dtype == torch.bfloat16)


def triton_swiglu_fwd(h_MX: torch.Tensor) -> torch.Tensor:
    """a_MF = silu(gate) * up in h's dtype; see the module docstring."""
    a_MF = _fake_swiglu_fwd(h_MX)
    M, F = a_MF.shape
    if M == 0 or F == 0:
        return a_MF
    h_MX = _cols(h_MX)
    grid, BLOCK_M, BLOCK_F, num_warps = _launch(M, F)
    _swiglu_fwd_kernel[grid](h_MX, a_MF, M, F, h_MX.stride(0), **_flags(a_MF), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F,
                             num_warps=num_warps, **LAUNCH_OPTIONS)  # fmt: skip
    return a_MF


def _fake_swiglu_fwd(h_MX):
    check_swiglu_args(h_MX)
    return h_MX.new_empty((h_MX.shape[0], h_MX.shape[1] // 2))


def triton_swiglu_bwd(h_MX: torch.Tensor, da_MF: torch.Tensor) -> torch.Tensor:
    """dh_MX in h's dtype; see the module docstring."""
    dh_MX = _fake_swiglu_bwd(h_MX, da_MF)
    M, F = da_MF.shape
    if M == 0 or F == 0:
        return dh_MX
    h_MX, da_MF = _cols(h_MX), _cols(da_MF)
    grid, BLOCK_M, BLOCK_F, num_warps = _launch(M, F)
    _swiglu_bwd_kernel[grid](h_MX, da_MF, dh_MX, M, F, h_MX.stride(0), da_MF.stride(0), **_flags(dh_MX),
                             BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=num_warps, **LAUNCH_OPTIONS)  # fmt: skip
    return dh_MX


def _fake_swiglu_bwd(h_MX, da_MF):
    check_swiglu_args(h_MX, da_MF)
    return torch.empty_like(h_MX, memory_format=torch.contiguous_format)


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    """Triton for 16/32-bit tensors on a GPU; fp64 (gradcheck, an fp64 model) takes the reference,
    and so does the CPU even under Triton's interpreter: the activation sits in every MLP, and
    interpreted it would slow every CPU model test. tests/test_swiglu.py runs the launchers under
    the interpreter itself."""
    return all(t.is_cuda and t.dtype in _KERNEL_DTYPES for t in tensors)


swiglu_fwd = kernel_op(
    "swiglu_fwd", triton_swiglu_fwd, _fake_swiglu_fwd, torch_swiglu_fwd, use_kernel=lambda h_MX: _kernel_ok(h_MX)
)
swiglu_bwd = kernel_op(
    "swiglu_bwd", triton_swiglu_bwd, _fake_swiglu_bwd, torch_swiglu_bwd,
    use_kernel=lambda h_MX, da_MF: _kernel_ok(h_MX, da_MF),
)  # fmt: skip
