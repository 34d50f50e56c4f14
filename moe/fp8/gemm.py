"""The two FP8 grouped GEMM shapes of an MoE block, per recipe, on GPU and as a CPU emulation.

Legend: M routed rows, P padded rows (each expert's group starts at a multiple of `align`),
K reduction dim, N output dim, E experts.

    grouped_mm(a_MK, b_ENK)        out[rows of e] = a[rows of e] @ b[e]^T     (forward, dgrad)
    grouped_mm_wgrad(a_NP, b_KP)   out[e] = a[:, tokens of e] @ b[:, tokens of e]^T   (wgrad)

Engines, by measurement (see bench/results/gemm.json): the rowwise forward and dgrad go to
CUTLASS through `torch._scaled_grouped_mm` (1060-1090 TFLOP/s raw on the large DESIGN.md
shapes); the rowwise weight gradient and every blockwise GEMM go to our Triton kernels
(kernels/grouped_gemm.py): blockwise because nothing else takes 1x128 x 128x128 scales on
Hopper, the rowwise wgrad because CUTLASS writes it in bf16 only, so fp32 master weights paid a
cast (2.1 ms at Mixtral-8x7B width, H200) and held a bf16 copy (1.75 GiB) that put the block's
peak above BF16's; ours scales in its epilogue and writes fp32. The rowwise forward/dgrad are
emulated on a CPU (dequantize to fp32, then `torch._grouped_mm`: the same arithmetic up to
accumulation order, which is what the numerics tests rely on); the Triton ops take their torch
references there.
"""

from __future__ import annotations

import torch

from kernels.grouped_gemm import fp8_grouped_mm, fp8_grouped_mm_wgrad, fp8_grouped_mm_wgrad_rowwise
from moe.fp8.recipe import Fp8Recipe


def dequantize(q: torch.Tensor, scale: torch.Tensor, rows_per_scale: int, cols_per_scale: int) -> torch.Tensor:
    """fp32 values of an FP8 tensor (..., R, C) whose scale is (..., R/rows_per_scale, C/cols_per_scale)."""
    s = scale
    if rows_per_scale > 1:
        s = s.repeat_interleave(rows_per_scale, dim=-2)
    if cols_per_scale > 1:
        s = s.repeat_interleave(cols_per_scale, dim=-1)
    return q.float() * s[..., : q.shape[-2], : q.shape[-1]]


def _row_scale_2d(scale: torch.Tensor) -> torch.Tensor:
    """Rowwise scales (R,) become (R, 1) so `dequantize` broadcasts them along the row."""
    return scale.unsqueeze(-1) if scale.dim() == 1 else scale


def emulated_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, block: int) -> torch.Tensor:
    """CPU emulation of `grouped_mm`: dequantize both operands to fp32, then a grouped GEMM."""
    K = a_q.shape[1]
    if block:
        a = dequantize(a_q, a_scale, 1, block)
        b = dequantize(b_q, b_scale, block, block)
    else:
        a = dequantize(a_q, _row_scale_2d(a_scale), 1, K)
        b = dequantize(b_q, b_scale.unsqueeze(-1), 1, K)
    return torch._grouped_mm(a, b.transpose(-2, -1), offs=group_end_E)


def grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, recipe: Fp8Recipe, out_dtype=torch.bfloat16):
    """(M, K) x (E, N, K) -> (M, N) in `out_dtype`; scales per `recipe` (see module docstring)."""
    if recipe.name == "blockwise":
        return fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, out_dtype)
    if not a_q.is_cuda:
        return emulated_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, 0).to(out_dtype)
    # use_fast_accum=False: Hopper's FP8 tensor-core accumulator keeps ~14 bits unless partial sums
    # are promoted (DeepSeek-V3 measured ~2% relative error at K=4096 without promotion).
    return torch._scaled_grouped_mm(
        a_q, b_q.transpose(-2, -1), a_scale, b_scale, offs=group_end_E, out_dtype=out_dtype,
        use_fast_accum=False,
    )


def grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end_E, recipe: Fp8Recipe, out_dtype=torch.bfloat16):
    """(N, P) x (K, P) -> (E, N, K): per expert, a sum over that expert's (padded) tokens.
    Rowwise scales are (N, E) and (K, E), blockwise (N, P/128) and (K, P/128)."""
    if recipe.name == "blockwise":
        return fp8_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end_E, out_dtype)
    return fp8_grouped_mm_wgrad_rowwise(a_q, a_scale, b_q, b_scale, padded_end_E, out_dtype)
