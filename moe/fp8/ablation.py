"""The FP8 experts with only some of their GEMMs in FP8, to find where FP8 costs loss (fp8.gemms).

Shape letters (README.md): M routed rows, H hidden, F expert FFN, X = 2F (SwiGLU) or F (GELU),
E experts, P padded rows.

A diagnostic, never the production path: fp8.gemms=all runs moe/fp8/grouped_mlp.py's fused
Function, and this file only runs for forward, dgrad or wgrad. Correctness over speed. Each GEMM
kind runs either in FP8, its operands quantized by the recipe's own quantizers and multiplied by
the same entry points as the fused path (moe/fp8/gemm.py, so fp8.fast_accum and
fp8.promotion_interval apply), or in BF16, exactly as the BF16 experts run it (torch._grouped_mm
in forward, and in backward the products autograd forms for it):

    forward   h = x w1^T, a = act(h), y = a w2^T          FP8 under fp8.gemms=forward
    dgrad     da = dy w2, dx = dh w1                      FP8 under fp8.gemms=dgrad
    wgrad     dw2 = dy^T a, dw1 = dh^T x per expert       FP8 under fp8.gemms=wgrad

Between the GEMMs everything follows the fused path: h is kept for backward as fp8.intermediate
says (FP8 rows under the recipe's row scales, or BF16); dh = act'(h) * da and the recomputed
a = act(h) are fp32 (kernels/reference_act.py's torch_act_bwd, the function the fused kernel
computes) and quantized from fp32 where an FP8 GEMM reads them. BF16 GEMMs read them rounded to
BF16. x is kept in BF16 for the backward (the fused path keeps only its FP8 column copy): memory a
diagnostic can spend.

Refused with FP8 dispatch (parallel.fp8_dispatch under expert parallelism): those rows arrive
already in FP8, so no GEMM of them could be BF16.
"""

from __future__ import annotations

import torch

from kernels.act_quant import act_quant_fwd
from kernels.common import dequantize
from kernels.quantize import quantize_rows
from kernels.quantize_grouped import quantize_cols_grouped
from kernels.quantize_weight import QuantizedWeight
from kernels.reference_act import torch_act_bwd
from kernels.swiglu import swiglu_fwd
from moe.dispatch import ExpertInput
from moe.experts import activation_fn
from moe.fp8.gemm import grouped_mm, grouped_mm_wgrad
from moe.fp8.recipe import Fp8Recipe


def ablation_grouped_mlp(
    inp: ExpertInput, w1_EXH: torch.Tensor, w2_EHF: torch.Tensor, wq1: QuantizedWeight, wq2: QuantizedWeight,
    activation: str, recipe: Fp8Recipe, dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The experts' (M, H) output with recipe.gemms in FP8 and the other GEMMs in `dtype`;
    wq1, wq2: the FP8 weights (both orientations) the FP8 GEMMs read."""
    if recipe.gemms == "all":
        raise ValueError("fp8.gemms=all runs the fused FP8 experts (moe/fp8/grouped_mlp.py), not the ablation path")
    if inp.fp8 is not None:
        raise ValueError(
            f"fp8.gemms={recipe.gemms} needs BF16 rows at the experts, but the dispatch sent FP8 rows: "
            "set parallel.fp8_dispatch=false (or fp8.gemms=all)"
        )
    x_MH = inp.rows(dtype).contiguous()  # gathered from the tokens (differentiable) or the rows
    return _AblationFunction.apply(x_MH, w1_EXH, w2_EHF, inp.group_end_E(), activation, recipe, wq1, wq2)


def _bf16_mm(a_MK: torch.Tensor, b_EKN: torch.Tensor, group_end_E: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ b[e], as the BF16 experts compute it."""
    return torch._grouped_mm(a_MK, b_EKN, offs=group_end_E)


def _bf16_wgrad(a_MN: torch.Tensor, b_MK: torch.Tensor, group_end_E: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e]^T @ b[rows of e], (E, N, K): the weight gradient autograd forms for
    torch._grouped_mm with a column-major (transposed-view) weight."""
    return torch._grouped_mm(a_MN.t(), b_MK, offs=group_end_E)


class _AblationFunction(torch.autograd.Function):
    """x_MH: the rows in the compute dtype; w1_EXH, w2_EHF: the parameters (the BF16 GEMMs read
    them cast to x's dtype, as the BF16 experts do); wq1, wq2: their FP8 copies."""

    @staticmethod
    def forward(ctx, x_MH, w1_EXH, w2_EHF, group_end_E, activation, recipe, wq1, wq2):
        block, pow2, dtype = recipe.block, recipe.pow2_scales, x_MH.dtype
        fp8_h = recipe.intermediate == "fp8"
        if recipe.gemms == "forward":
            x_q, x_s = quantize_rows(x_MH, block, pow2)
            h_MX = grouped_mm(x_q, x_s, wq1.q_ENK, wq1.scale, group_end_E, recipe)
            a_q, a_s, h_q, h_s = act_quant_fwd(h_MX, activation, block, pow2, fp8_h)
            y_MH = grouped_mm(a_q, a_s, wq2.q_ENK, wq2.scale, group_end_E, recipe).to(dtype)
        else:
            h_MX = _bf16_mm(x_MH, w1_EXH.to(dtype).transpose(-2, -1), group_end_E)
            # a as the BF16 experts compute it: SwiGLU's fp32 kernel (moe/swiglu_down.py), GELU's plain op
            a_MF = swiglu_fwd(h_MX) if activation == "swiglu" else activation_fn(h_MX, activation)
            y_MH = _bf16_mm(a_MF, w2_EHF.to(dtype).transpose(-2, -1), group_end_E)
            if fp8_h:
                h_q, h_s = quantize_rows(h_MX, block, pow2)  # the rule act_quant_fwd saves h by
        h_saved, h_s = (h_q, h_s) if fp8_h else (h_MX, None)
        ctx.save_for_backward(x_MH, w1_EXH, w2_EHF, group_end_E, h_saved, h_s)
        ctx.activation, ctx.recipe, ctx.wq = activation, recipe, (wq1, wq2)
        return y_MH

    @staticmethod
    def backward(ctx, dy_MH):
        x_MH, w1_EXH, w2_EHF, group_end_E, h_saved, h_s = ctx.saved_tensors
        recipe, (wq1, wq2) = ctx.recipe, ctx.wq
        block, align, pow2, dtype = recipe.block, recipe.align, recipe.pow2_scales, x_MH.dtype
        dy_MH = dy_MH.to(dtype).contiguous()
        h_MX = dequantize(h_saved, h_s) if h_s is not None else h_saved.float()

        if recipe.gemms == "dgrad":
            dy_q, dy_s = quantize_rows(dy_MH, block, pow2)
            da_MF = grouped_mm(dy_q, dy_s, wq2.qt_EKN, wq2.scale_t, group_end_E, recipe)
        else:
            da_MF = _bf16_mm(dy_MH, w2_EHF.to(dtype), group_end_E)
        dh_MX, a_MF = torch_act_bwd(da_MF.float(), h_MX, ctx.activation)
        rows_M = torch.arange(dh_MX.shape[0], device=dh_MX.device)
        dh_MX = torch.where((rows_M < group_end_E[-1])[:, None], dh_MX, 0.0)  # rows of no expert
        if recipe.gemms == "dgrad":
            dh_q, dh_s = quantize_rows(dh_MX, block, pow2)
            dx_MH = grouped_mm(dh_q, dh_s, wq1.qt_EKN, wq1.scale_t, group_end_E, recipe).to(dtype)
        else:
            dx_MH = _bf16_mm(dh_MX.to(dtype), w1_EXH.to(dtype), group_end_E)

        if recipe.gemms == "wgrad":
            cols = lambda t: quantize_cols_grouped(t, group_end_E, align, block, pow2)  # noqa: E731
            (dyt_q, dyt_s, padded_end_E), (at_q, at_s, _) = cols(dy_MH), cols(a_MF)
            dw2_EHF = grouped_mm_wgrad(dyt_q, dyt_s, at_q, at_s, padded_end_E, recipe, w2_EHF.dtype)
            (dht_q, dht_s, _), (xt_q, xt_s, _) = cols(dh_MX), cols(x_MH)
            dw1_EXH = grouped_mm_wgrad(dht_q, dht_s, xt_q, xt_s, padded_end_E, recipe, w1_EXH.dtype)
        else:
            dw2_EHF = _bf16_wgrad(dy_MH, a_MF.to(dtype), group_end_E).to(w2_EHF.dtype)
            dw1_EXH = _bf16_wgrad(dh_MX.to(dtype), x_MH, group_end_E).to(w1_EXH.dtype)
        return dx_MH, dw1_EXH, dw2_EHF, None, None, None, None, None
