"""Pure-torch references of the activation + FP8 quantization kernels (kernels/act_quant.py,
kernels/act_quant_bwd.py), and of their fp32 activation math (kernels/act_math.py).

The activations are written out in + - * / so that the reference rounds identically on every
backend: torch.exp on CPU and numpy's exp (Triton's interpreter) disagree in the last bit for
~40% of inputs, and a GPU's expf is not guaranteed to match libdevice's. Every line below is one
fp32 rounding (never fused). The kernels compute the same functions with hardware exp2 /
reciprocals and FMAs instead, within tests/test_kernels_act_quant.py's bound.
Accuracy against fp64 (measured over 4M points): exp <= 5 ulp; Phi <= 8 ulp for x >= 0 and
relative 70 ulp at x = -12.5 (the rounding of x*x, amplified by exp); beyond |x| = 12.5 Phi
saturates (Phi(-12.5) = 4e-36 instead of ~0). GELU is the exact-erf form, F.gelu's default.

Shape letters (README.md): M rows (grouped by expert), F expert FFN hidden size, X = 2F (SwiGLU:
[gate | up]) or F (GELU) columns of h, E experts, P padded rows; Xb = X // 128, Pb = P // 128.
"""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE, dequantize
from kernels.contracts import check_act_quant_args, check_act_quant_bwd_args
from kernels.fp8_stats import check_stats_arg
from kernels.reference import torch_quantize_cols_grouped, torch_quantize_rows

# exp(x) = 2**n * p(r), x = n*ln2 + r, |r| <= ln2/2: n = round(x / ln2) by adding 1.5 * 2**23
# (the sum's low mantissa bits are n: no float->int conversion), ln2 split in two (hi has 15
# significant bits, so n*hi is exact), p the degree-6 Taylor polynomial (error 1.2e-7 there).
_EXP_LOG2E = 1.4426950216293335
_EXP_SHIFTER = 12582912.0  # 1.5 * 2**23, bits 0x4B400000
_EXP_LN2_HI = 0.693145751953125
_EXP_LN2_LO = 1.428606765330187e-06
_EXP_COEF = (0.0013888889225199819, 0.008333333767950535, 0.0416666679084301, 0.1666666716337204,
             0.5, 1.0, 1.0)  # 1/6!, ..., 1/1!, 1/0!  # fmt: skip
# Phi(x) = 1 - erfc(z)/2 for x >= 0 and erfc(z)/2 for x < 0, z = |x|/sqrt(2), with
# erfc(z) = exp(-z*z) * R(t), t = 1 / (1 + 0.4 z): R is a degree-10 least-squares Chebyshev fit
# on z in [0, 12.5/sqrt(2)] (relative error 1.7e-9 in exact arithmetic), highest power first.
_PHI_CLAMP = 12.5
_PHI_T_SCALE = 0.2828427255153656  # 0.4 / sqrt(2)
_PHI_COEF = (-0.041673850268125534, 0.26790285110473633, -0.676068127155304, 0.8065094351768494,
             -0.5256134271621704, 0.42137980461120605, 0.067561574280262, 0.23205183446407318,
             0.22195617854595184, 0.22600671648979187, -1.3042147656960879e-05)  # fmt: skip
_INV_SQRT_2PI = 0.3989422917366028


def _torch_exp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-87.0, 87.0)  # keeps 2**n and 1 / (1 + exp) normal floats
    shifted = x * _EXP_LOG2E + _EXP_SHIFTER
    n = shifted - _EXP_SHIFTER
    r = (x - n * _EXP_LN2_HI) - n * _EXP_LN2_LO
    p = torch.full_like(r, _EXP_COEF[0])
    for c in _EXP_COEF[1:]:
        p = p * r + c
    return p * ((shifted.view(torch.int32) - (0x4B400000 - 127)) << 23).view(torch.float32)


def _torch_div(num: float, den: torch.Tensor) -> torch.Tensor:
    """IEEE num / den (a python scalar over a CUDA tensor is a rounded reciprocal times num)."""
    return torch.full((), num, dtype=torch.float32, device=den.device) / den


def _torch_sigmoid_silu(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _torch_div(1.0, 1.0 + _torch_exp(-g))
    return s, g * s


def _torch_phi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xc, Phi(xc), exp(-xc*xc/2)) with xc = x clamped to +-12.5: the normal CDF and the pieces
    of the normal density."""
    xc = x.clamp(-_PHI_CLAMP, _PHI_CLAMP)
    ex = _torch_exp(xc * xc * -0.5)
    t = _torch_div(1.0, 1.0 + xc.abs() * _PHI_T_SCALE)
    r = torch.full_like(t, _PHI_COEF[0])
    for c in _PHI_COEF[1:]:
        r = r * t + c
    erfc = ex * r
    return xc, torch.where(xc >= 0.0, 1.0 - 0.5 * erfc, 0.5 * erfc), ex


def torch_act(h_MX: torch.Tensor, activation: str) -> torch.Tensor:
    """fp32 a_MF of fp32 h: silu(gate) * up for SwiGLU (gate = first half), x * Phi(x) for GELU."""
    if activation == "swiglu":
        gate, up = h_MX.chunk(2, dim=1)
        return _torch_sigmoid_silu(gate)[1] * up
    return h_MX * _torch_phi(h_MX)[1]


def torch_act_bwd(da_MF: torch.Tensor, h_MX: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dh_MX, a_MF): the gradient w.r.t. h of sum(da * act(h)), and act(h) recomputed."""
    if activation == "swiglu":
        gate, up = h_MX.chunk(2, dim=1)
        s, silu = _torch_sigmoid_silu(gate)
        dsilu = s * (1.0 + gate * (1.0 - s))
        return torch.cat([(da_MF * up) * dsilu, da_MF * silu], dim=1), silu * up
    xc, phi, ex = _torch_phi(h_MX)
    return da_MF * (phi + xc * (ex * _INV_SQRT_2PI)), h_MX * phi


def torch_act_quant_fwd(
    h_MX: torch.Tensor, activation: str = "swiglu", block_k: int = 0, pow2_scale: bool = False, save_input: bool = True,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """FP8 a = act(h) for GEMM2, and h itself in FP8 for the backward (empty unless save_input).

    Scales follow block_k for both: one per row (0) or per 1x128 tile (128); a's amax is taken on
    the fp32 activation of the bf16 h. stats: the two casts' statistics, a then h (2 operands).
    """
    check_act_quant_args(h_MX, activation, block_k)
    check_stats_arg(stats, h_MX, 2)
    stats_a, stats_h = (None, None) if stats is None else stats.view(2, -1).unbind(0)
    h = h_MX.float()
    a_q, a_scale = torch_quantize_rows(torch_act(h, activation), block_k, pow2_scale, stats=stats_a)
    if not save_input:
        return a_q, a_scale, h_MX.new_empty(0, dtype=FP8_DTYPE), h_MX.new_empty(0, dtype=torch.float32)
    h_q, h_scale = torch_quantize_rows(h, block_k, pow2_scale, stats=stats_h)
    return a_q, a_scale, h_q, h_scale


def torch_act_quant_bwd(
    da_MF: torch.Tensor, h_fp8: torch.Tensor, h_scale: torch.Tensor, activation: str, group_end_E: torch.Tensor,
    align: int = 16, block: int = 0, pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dh = act'(h) * da from the FP8 h of the forward, in the three layouts the backward GEMMs read.

    Returns (dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E):
      dh_q  (M, X) fp8, scale (M,) over the whole X-wide row (block=0) or (M, Xb): dgrad1
      dht_q (X, P) and at_q (F, P) fp8: dh and the recomputed a = act(h), each group's rows
            transposed into its padded columns exactly as `torch_quantize_cols_grouped` lays
            them out (scales (X, E) and (F, E), or (X, Pb) and (F, Pb)): wgrad1 and wgrad2
      padded_end_E int32.
    Rows past group_end_E[-1] belong to no group: their dh row is zeros (scale 1) and they are
    absent from the transposed copies.
    """
    check_act_quant_bwd_args(da_MF, h_fp8, h_scale, activation, group_end_E, align, block)
    dh_MX, a_MF = torch_act_bwd(da_MF.float(), dequantize(h_fp8, h_scale), activation)
    rows_M = torch.arange(h_fp8.shape[0], device=h_fp8.device)
    dh_MX = torch.where((rows_M < group_end_E[-1])[:, None], dh_MX, 0.0)
    dh_q, dh_scale = torch_quantize_rows(dh_MX, block, pow2_scale)
    dht_q, dht_scale, padded_end_E = torch_quantize_cols_grouped(dh_MX, group_end_E, align, block, pow2_scale)
    at_q, at_scale, _ = torch_quantize_cols_grouped(a_MF, group_end_E, align, block, pow2_scale)
    return dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E
