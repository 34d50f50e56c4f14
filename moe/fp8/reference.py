"""Pure-torch emulation of the FP8 GroupedMLP recipe, forward and backward, written out step by step.

Shape letters (README.md): M routed rows, H hidden size, F expert FFN hidden size, X GEMM1's
output width: 2F (SwiGLU) or F (GELU), E experts.

Independent of the kernels and of moe/fp8/grouped_mlp.py: every FP8 operand is quantized and
dequantized in fp32 by the scale rule of kernels/common.py, GEMMs run in fp32 per expert, and
GEMM outputs are rounded to bf16 where the fast path writes bf16. The fast path must match this
closely (tests: 1% relative L2); this in turn must stay within FP8's error of an fp64 MLP (8%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import FP8_DTYPE, FP8_MAX, FP32_MIN_NORMAL
from moe.experts import activation_fn
from moe.fp8.recipe import Fp8Recipe


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float() / FP8_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.clamp_min(FP32_MIN_NORMAL)  # the kernels' floor (kernels/common.py)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def fake_quant_lastdim(x: torch.Tensor, tile: int, pow2: bool) -> torch.Tensor:
    """Quantize-dequantize with one scale per `tile` consecutive values of the last dim (0: all)."""
    shape = x.shape
    tile = tile or shape[-1]
    xt = x.float().reshape(*shape[:-1], shape[-1] // tile, tile)
    s = _scale(xt.abs().amax(-1, keepdim=True), pow2)
    q = (xt * torch.reciprocal(s)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * s).reshape(shape)


def fake_quant_weight(w_ENK: torch.Tensor, recipe: Fp8Recipe, along: str) -> torch.Tensor:
    """Weights: rowwise scales along the GEMM's reduction dim `along` ('K' = last, 'N' = middle);
    blockwise 128x128 blocks, the same blocks for either orientation. Quantized as the fast
    path does: from the parameter's bf16 copy, every recipe (quantizing the fp32 values here
    instead put the block's output 3.5% from the module's, H200)."""
    w_ENK = w_ENK.to(torch.bfloat16)
    if recipe.block:
        E, N, K = w_ENK.shape
        b = w_ENK.float().reshape(E, N // 128, 128, K // 128, 128)
        s = _scale(b.abs().amax(dim=(2, 4), keepdim=True), recipe.pow2_scales)
        q = (b * torch.reciprocal(s)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return (q.float() * s).reshape(E, N, K)
    if along == "K":
        return fake_quant_lastdim(w_ENK, 0, recipe.pow2_scales)
    return fake_quant_lastdim(w_ENK.transpose(1, 2), 0, recipe.pow2_scales).transpose(1, 2)


def fake_quant_groups_along_tokens(x_MK: torch.Tensor, counts: list[int], recipe: Fp8Recipe) -> torch.Tensor:
    """The weight-gradient operands: each expert's rows quantized along tokens, per column
    (rowwise) or per 128-token tile counted from the group's start (blockwise)."""
    out = torch.empty_like(x_MK, dtype=torch.float32)
    start = 0
    for n in counts:
        g = x_MK[start : start + n].float()
        if n:
            if recipe.block:
                pad = (-n) % 128
                gp = F.pad(g.t(), (0, pad))  # (K, n + pad): zero padding never raises an amax
                out[start : start + n] = fake_quant_lastdim(gp, 128, recipe.pow2_scales)[:, :n].t()
            else:
                out[start : start + n] = fake_quant_lastdim(g.t(), 0, recipe.pow2_scales).t()
        start += n
    return out


def _act_grad(h_MX: torch.Tensor, da_MF: torch.Tensor, activation: str) -> torch.Tensor:
    h = h_MX.detach().float().requires_grad_()
    (dh,) = torch.autograd.grad(activation_fn(h, activation), h, da_MF.float())
    return dh


def _per_expert(a_MK: torch.Tensor, b_ENK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = a_MK.new_zeros(a_MK.shape[0], b_ENK.shape[1])
    start = 0
    for e, n in enumerate(counts):
        out[start : start + n] = a_MK[start : start + n] @ b_ENK[e].t()
        start += n
    return out


def _wgrad(a_MN: torch.Tensor, b_MK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = a_MN.new_zeros(len(counts), a_MN.shape[1], b_MK.shape[1])
    start = 0
    for e, n in enumerate(counts):
        out[e] = a_MN[start : start + n].t() @ b_MK[start : start + n]
        start += n
    return out


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def fp8_grouped_mlp_reference(x_MH, w1_EXH, w2_EHF, counts: list[int], dy_MH, activation: str, recipe: Fp8Recipe):
    """Returns (y, dx, dw1, dw2) in fp32, as the FP8 recipe computes them."""
    blk, pow2 = recipe.block, recipe.pow2_scales
    rows = lambda t: fake_quant_lastdim(t, blk, pow2)  # noqa: E731 - activations / gradients, 1xK or 1x128
    groups = lambda t: fake_quant_groups_along_tokens(t, counts, recipe)  # noqa: E731
    # forward
    h = _bf16(_per_expert(rows(x_MH), fake_quant_weight(w1_EXH, recipe, "K"), counts))
    h_saved = rows(h)  # h is kept in FP8 for backward
    y = _bf16(_per_expert(rows(activation_fn(h, activation)), fake_quant_weight(w2_EHF, recipe, "K"), counts))
    # backward
    da = _bf16(_per_expert(rows(dy_MH), fake_quant_weight(w2_EHF, recipe, "N").transpose(1, 2), counts))
    a_re = activation_fn(h_saved, activation)  # recomputed from the FP8 copy
    dw2 = _wgrad(groups(dy_MH), groups(a_re), counts)
    dh = _act_grad(h_saved, da, activation)
    dx = _bf16(_per_expert(rows(dh), fake_quant_weight(w1_EXH, recipe, "N").transpose(1, 2), counts))
    dw1 = _wgrad(groups(dh), groups(x_MH), counts)
    return y, dx, _bf16(dw1), _bf16(dw2)


def fp64_grouped_mlp(x_MH, w1_EXH, w2_EHF, counts: list[int], dy_MH, activation: str):
    """The exact answer the recipe approximates: fp64 MLP per expert with autograd."""
    x = x_MH.detach().double().requires_grad_()
    w1 = w1_EXH.detach().double().requires_grad_()
    w2 = w2_EHF.detach().double().requires_grad_()
    y = _per_expert(activation_fn(_per_expert(x, w1, counts), activation), w2, counts)
    y.backward(dy_MH.double())
    return y.detach(), x.grad, w1.grad, w2.grad
