"""fp32 arithmetic shared by the activation + FP8 quantization kernels (act_quant.py forward,
act_quant_bwd.py backward): hardware exp2 and reciprocal, FMA contraction on, one reciprocal
per scale. Per element an activation is 6 sm_90 instructions for SwiGLU (FMUL, MUFU.EX2, FADD,
MUFU.RCP, 2 FMUL) and 16 for GELU; bench/NOTES.md lists what the kernels cost in all.

Numerics contract (u = 2^-24; ex2.approx.ftz.f32 is within 2^-22.5 relative and
rcp.approx.ftz.f32 within 1 ulp, PTX ISA):
- SwiGLU: |a - exact| <= (2|g| + 11) u |a|. The |g| term is the rounding of g * log2(e) before
  ex2, which grows the error only where silu(g) is tiny (g < -14: silu < 1e-5 |g|). The
  backward's sigmoid is the same; its dsilu error is bounded likewise against the sum of the
  magnitudes of its terms (it cancels near g = -1.28).
- GELU: |a - exact| <= (1.5 x^2 + 18) u |a|: x * x rounded before ex2, then the erfc fit (5 u).
- Quantization: `tl_fp8_quantize_by(x, inv)` as the scale rule has it (kernels/common.py), inv =
  1 / scale once per scale (`inv_scale`): the reference's RN(1 / scale) exactly for power-of-two
  scales, within 1.5 ulp of it otherwise, so a byte differs from the reference's only where its
  x * (1 / scale) lies within 3 u of an E4M3 rounding boundary. No clamp on the GPU: |x| <= amax,
  so |x * inv| <= 448 (1 + 4u), below 464 where rounding would leave 448, and the cast saturates.
- Scales: kernels/common.py's rule bit for bit on the amax (`tl_fp8_scale`, no division), so
  they differ from the reference's only as far as the amax does.
tests/test_kernels_act_math.py checks the fp32 values and tests/test_kernels_act_quant.py the FP8
outputs against kernels/reference_act.py (exact to a few ulp) within these bounds plus the
reference's own error.
"""

from __future__ import annotations

import triton
import triton.language as tl


_NEG_LOG2E = tl.constexpr(-1.4426950408889634)  # exp(-g) = exp2(g * -log2(e))
_NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)  # exp(-x^2/2) = exp2(x * x * -log2(e)/2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# Phi(-|x|) = exp(-x^2/2) R(t), t = 1 / (1 + 0.4 |x|): R is a degree-8 polynomial, a weighted
# least-squares fit (Lawson's iteration towards minimax relative error) of 0.5 erfcx(|x|/sqrt 2)
# on |x| in [0, 13]: 6.7e-8 relative in exact arithmetic, 3.1e-7 (5 u) evaluated in fp32 with
# FMAs. Degree 9 reaches only 2.7e-7 in fp32 (rounding dominates), degree 7 5.8e-7.
_PHI_T_SCALE = tl.constexpr(0.4)
_Q8, _Q7, _Q6, _Q5, _Q4, _Q3, _Q2, _Q1, _Q0 = (tl.constexpr(c) for c in (
    -0.04007517173886299, 0.20264780521392822, -0.37739667296409607, 0.2546594738960266,
    -0.014566930942237377, 0.15920163691043854, 0.15561926364898682, 0.1599234640598297,
    -1.2905459698231425e-05))  # fmt: skip
# FMA contraction stays on whatever Triton's default becomes (3.9 warns it will turn it off).
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)


# ---- per scale: once per row / column / tile -------------------------------------------------------


@triton.jit
def inv_scale(scale, INTERP: tl.constexpr):
    """1 / scale for `tl_fp8_quantize_by`, once per scale: exact for power-of-two scales (the
    exponent negated), so that the exact E4M3 ties x * (1 / scale) has with bf16 x (1 in 16
    values at a power-of-two scale) round to even as the reference's; otherwise rcp.approx,
    within 1 ulp. 5 instructions where the IEEE reciprocal (`tl_fp8_inverse`) takes 17, in every
    thread holding the scale (a [128] column-scale vector sits in 16 threads of the backward's
    tile)."""
    bits = scale.to(tl.int32, bitcast=True)
    pow2_inv = ((254 << 23) - bits).to(tl.float32, bitcast=True)  # scales lie in [2^-126, 2^120]
    return tl.where((bits & 0x7FFFFF) == 0, pow2_inv, _rcp(scale, INTERP))


# ---- per element: hardware approximations --------------------------------------------------------


@triton.jit
def _rcp(d, INTERP: tl.constexpr):
    """~1 / d within 1 ulp: rcp.approx.ftz.f32, one MUFU.RCP. Triton's `/` is div.full.f32,
    8 SASS instructions (range checks around the same MUFU.RCP) that no d here needs: 1 + exp
    and 1 + 0.4 |x| are >= 1 (past 2^126, after exp overflows, 0 is the right answer) and
    scales are normal with normal reciprocals. The interpreter runs no PTX."""
    if INTERP:
        return 1.0 / d
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True,
                                     pack=1)  # fmt: skip


@triton.jit
def _sigmoid(g, INTERP: tl.constexpr):
    """1 / (1 + exp(-g)): FMUL, MUFU.EX2, FADD, MUFU.RCP. exp2 overflows to inf for g < -88,
    giving s = 0 (the reference clamps there and gives 1.6e-38)."""
    return _rcp(1.0 + tl.exp2(g * _NEG_LOG2E), INTERP)


@triton.jit
def _phi_neg_abs(x, INTERP: tl.constexpr):
    """(Phi(-|x|), exp(-x^2/2)), Phi the standard normal CDF: the erfc side, accurate in relative
    terms for every x (no 1 - erf cancellation). Past |x| = 13.2 exp2 flushes to 0."""
    t = _rcp(1.0 + tl.abs(x) * _PHI_T_SCALE, INTERP)
    r = _Q8 * t + _Q7
    r = r * t + _Q6
    r = r * t + _Q5
    r = r * t + _Q4
    r = r * t + _Q3
    r = r * t + _Q2
    r = r * t + _Q1
    r = r * t + _Q0
    ex = tl.exp2(x * x * _NEG_HALF_LOG2E)
    return ex * r, ex


@triton.jit
def act(g, u, SWIGLU: tl.constexpr, INTERP: tl.constexpr):
    """a = silu(g) * u (SwiGLU) or x * Phi(x) (GELU, g is x, u unused)."""
    if SWIGLU:
        a = g * _sigmoid(g, INTERP) * u
    else:
        q, ex = _phi_neg_abs(g, INTERP)
        a = tl.maximum(g, 0.0) - tl.abs(g) * q  # x (1 - q) for x >= 0, x q below: one FMA
    return a


@triton.jit
def act_bwd(da, g, u, SWIGLU: tl.constexpr, INTERP: tl.constexpr):
    """(d gate, d up, a) for SwiGLU; (dh, dh, a) for GELU (g is h, u unused)."""
    if SWIGLU:
        s = _sigmoid(g, INTERP)
        silu = g * s
        dg = (da * u) * (s * (1.0 + g * (1.0 - s)))
        du = da * silu
        a = silu * u
    else:
        q, ex = _phi_neg_abs(g, INTERP)
        phi = tl.where(g >= 0.0, 1.0 - q, q)
        dg = da * (phi + g * (ex * _INV_SQRT_2PI))
        du = dg
        a = tl.maximum(g, 0.0) - tl.abs(g) * q
    return dg, du, a
