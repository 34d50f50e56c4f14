"""The two FP8 grouped GEMM shapes of an MoE block, per recipe, on GPU and as a CPU emulation.

Shape letters (README.md): M routed rows, P padded rows (each expert's group starts at a multiple
of `align`), K reduction dim, N output dim, E experts.

    grouped_mm(a_MK, b_ENK)        out[rows of e] = a[rows of e] @ b[e]^T     (forward, dgrad)
    grouped_mm_wgrad(a_NP, b_KP)   out[e] = a[:, tokens of e] @ b[:, tokens of e]^T   (wgrad)
    grouped_mm_wgrad_accumulate_(into_ENK, a_NP, b_KP)    into[e] += the same, in the epilogue

Engines, by measurement (bench/results/gemm.json): the rowwise forward and dgrad go to CUTLASS
through `torch._scaled_grouped_mm`; the rowwise weight gradient and every blockwise GEMM go to
our Triton kernels (kernels/grouped_gemm*.py): blockwise because nothing else takes 1x128 x
128x128 scales on Hopper, the rowwise wgrad because CUTLASS writes it in bf16 only, so fp32
master weights paid a cast and held a bf16 copy that put the block's peak memory above BF16's;
ours scales in its epilogue and writes fp32. On a CPU the rowwise forward/dgrad are emulated
(kernels/reference_gemm.py: dequantize to fp32, then a grouped GEMM; the same arithmetic up to
accumulation order, which is what the numerics tests rely on); the Triton entry points take
their torch references there.

Accumulation knobs (moe/fp8/recipe.py): the rowwise CUTLASS GEMMs promote into fp32 unless
`recipe.fast_accum`; the blockwise GEMMs promote every `recipe.promotion_interval` products. Both
change what the tensor core rounds, so the CPU emulation (exact fp32 sums) ignores them.
"""

from __future__ import annotations

import torch

from kernels.common import dequantize
from kernels.grouped_gemm import fp8_grouped_mm
from kernels.grouped_gemm_wgrad import (fp8_grouped_mm_wgrad, fp8_grouped_mm_wgrad_accumulate_,
                                       fp8_grouped_mm_wgrad_rowwise)
from kernels.reference_gemm import emulated_grouped_mm
from moe.fp8.recipe import Fp8Recipe


def grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, recipe: Fp8Recipe, out_dtype=torch.bfloat16):
    """(M, K) x (E, N, K) -> (M, N) in `out_dtype`; scales per `recipe` (see module docstring):
    rowwise a_scale (M,) and b_scale (E, N), blockwise (M, K/128) and (E, N/128, K/128)."""
    if recipe.name == "blockwise":
        return fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, out_dtype, recipe.promotion_interval)
    if not on_cutlass(a_q):
        return emulated_grouped_mm(dequantize(a_q, a_scale), dequantize(b_q, b_scale), group_end_E).to(out_dtype)
    return cutlass_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, out_dtype, recipe.fast_accum)


def on_cutlass(a_q: torch.Tensor) -> bool:
    """Whether the rowwise 2d x 3d GEMM runs on CUTLASS (a GPU) rather than the CPU emulation."""
    return a_q.is_cuda


def cutlass_grouped_mm(a_q, a_scale, b_q, b_scale, group_end_E, out_dtype, fast_accum: bool) -> torch.Tensor:
    """torch._scaled_grouped_mm with the rowwise recipe's scales a_scale (M,), b_scale (E, N).

    fast_accum=False (the recipe's default): Hopper's FP8 tensor-core accumulator keeps ~14 bits
    unless partial sums are promoted into fp32 (CUTLASS's FP8 mainloop does, every few wgmma
    k-blocks; DeepSeek-V3 measured ~2% relative error at K=4096 without promotion). True: no
    promotion (CUTLASS's FP8FastAccum schedules), the fp8.fast_accum ablation."""
    return torch._scaled_grouped_mm(
        a_q, b_q.transpose(-2, -1), a_scale, b_scale, offs=group_end_E, out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )  # fmt: skip


def grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end_E, recipe: Fp8Recipe, out_dtype=torch.bfloat16):
    """(N, P) x (K, P) -> (E, N, K): per expert, a sum over that expert's (padded) tokens.
    Rowwise scales are (N, E) and (K, E), blockwise (N, P/128) and (K, P/128)."""
    if recipe.name == "blockwise":
        return fp8_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end_E, out_dtype, recipe.promotion_interval)
    return fp8_grouped_mm_wgrad_rowwise(a_q, a_scale, b_q, b_scale, padded_end_E, out_dtype)


def grouped_mm_wgrad_accumulate_(into, a_q, a_scale, b_q, b_scale, padded_end_E, recipe: Fp8Recipe) -> None:
    """into (E, N, K) fp32 += `grouped_mm_wgrad`'s product, added in the GEMM's epilogue (both
    recipes' weight gradients run on our Triton kernels)."""
    fp8_grouped_mm_wgrad_accumulate_(into, a_q, a_scale, b_q, b_scale, padded_end_E, rowwise=recipe.name != "blockwise",
                                     promotion_interval=recipe.promotion_interval)  # fmt: skip
