"""fp32 arithmetic shared by the activation + FP8 quantization kernels (act_quant.py forward,
act_quant_bwd.py backward), line for line the reference's in kernels/reference.py: polynomial
exp / erfc, IEEE-rounded divisions, no FMA contraction, so kernel and reference agree bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels import reference as ref
from kernels.common import tl_round_to_fp8_grid

# fp32 constants shared with the reference (exactly representable, so both sides use the same).
_LOG2E = tl.constexpr(ref._EXP_LOG2E)
_LN2_HI = tl.constexpr(ref._EXP_LN2_HI)
_LN2_LO = tl.constexpr(ref._EXP_LN2_LO)
_EXP_SHIFTER = tl.constexpr(ref._EXP_SHIFTER)
_E6, _E5, _E4, _E3 = (tl.constexpr(c) for c in ref._EXP_COEF[:4])
_PHI_CLAMP = tl.constexpr(ref._PHI_CLAMP)
_PHI_T_SCALE = tl.constexpr(ref._PHI_T_SCALE)
_R10, _R9, _R8, _R7, _R6, _R5, _R4, _R3, _R2, _R1, _R0 = (tl.constexpr(c) for c in ref._PHI_COEF)
_INV_SQRT_2PI = tl.constexpr(ref._INV_SQRT_2PI)
_INV_448 = tl.constexpr(0.0022321429569274187)  # RN(1 / 448) in fp32
# No fused multiply-add: every fp32 operation rounds on its own, as in the torch reference.
_LAUNCH = dict(enable_fp_fusion=False)


# ---- fp32 math, line for line the reference's (kernels/reference.py) ---------------------------


@triton.jit
def _exp(x):
    x = tl.minimum(tl.maximum(x, -87.0), 87.0)
    shifted = x * _LOG2E + _EXP_SHIFTER
    n = shifted - _EXP_SHIFTER
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _E6 * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * ((shifted.to(tl.int32, bitcast=True) - (0x4B400000 - 127)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _recip(d):
    """RN(1 / d), the IEEE reciprocal, for normal d > 0 whose reciprocal is normal (|log2 d| < 126).

    Not tl.math.div_rn: its slow-path subroutine call makes ptxas keep every live register of
    the tile around it (spills). An approximate reciprocal (div.full.f32, <= 2 ulp), a Newton
    step (faithful), then Markstein's step, which rounds correctly for every d except an
    all-ones significand, d = (2 - 2^-23) 2^e, whose reciprocal 2^-(e+1) (1 + 2^-23) is set
    directly (checked against exact rationals from starts 2 ulp off; on GPU by
    tests/test_kernels_act.py::test_kernel_division_is_ieee[cuda]). If that test ever fails,
    `return tl.math.div_rn(1.0, d)` is the slower, exact fallback.
    """
    y = 1.0 / d
    y = tl.fma(tl.fma(-d, y, 1.0), y, y)
    y = tl.fma(tl.fma(-d, y, 1.0), y, y)
    bits = d.to(tl.int32, bitcast=True)
    all_ones = ((253 - (bits >> 23)) << 23) | 1
    return tl.where((bits & 0x7FFFFF) == 0x7FFFFF, all_ones.to(tl.float32, bitcast=True), y)


@triton.jit
def _fp8_scale(amax, POW2: tl.constexpr):
    """tl_fp8_scale (kernels/common.py) bit for bit, dividing by 448 with Markstein's step
    instead of div.rn (same reason as `_recip`); exact for amax >= 2^-100."""
    q0 = amax * _INV_448
    scale = tl.fma(tl.fma(-q0, 448.0, amax), _INV_448, q0)
    if POW2:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.where(amax == 0.0, 1.0, scale)


@triton.jit
def _sigmoid_silu(g):
    s = _recip(1.0 + _exp(-g))
    return s, g * s


@triton.jit
def _phi(x):
    """(xc, Phi(xc), exp(-xc*xc/2)), xc = x clamped to +-12.5."""
    xc = tl.minimum(tl.maximum(x, -_PHI_CLAMP), _PHI_CLAMP)
    ex = _exp(xc * xc * -0.5)
    t = _recip(1.0 + tl.abs(xc) * _PHI_T_SCALE)
    r = _R10 * t + _R9
    r = r * t + _R8
    r = r * t + _R7
    r = r * t + _R6
    r = r * t + _R5
    r = r * t + _R4
    r = r * t + _R3
    r = r * t + _R2
    r = r * t + _R1
    r = r * t + _R0
    erfc = ex * r
    return xc, tl.where(xc >= 0.0, 1.0 - 0.5 * erfc, 0.5 * erfc), ex


@triton.jit
def _act(g, u, SWIGLU: tl.constexpr):
    if SWIGLU:
        s, silu = _sigmoid_silu(g)
        a = silu * u
    else:
        xc, phi, ex = _phi(g)
        a = g * phi
    return a


@triton.jit
def _act_bwd(da, g, u, SWIGLU: tl.constexpr):
    """(d gate, d up, a) for SwiGLU; (dh, dh, a) for GELU (g is h, u unused)."""
    if SWIGLU:
        s, silu = _sigmoid_silu(g)
        dsilu = s * (1.0 + g * (1.0 - s))
        dg = (da * u) * dsilu
        du = da * silu
        a = silu * u
    else:
        xc, phi, ex = _phi(g)
        dg = da * (phi + xc * (ex * _INV_SQRT_2PI))
        du = dg
        a = g * phi
    return dg, du, a


@triton.jit
def _quant(x, scale, inv, INTERP: tl.constexpr):
    """clamp(x / scale, +-448) -> E4M3: the rule of kernels/common.py bit for bit, but the IEEE
    division is x * inv plus one fma correction, inv = RN(1 / scale) computed once per scale.
    By Markstein's theorem that is the correctly rounded quotient (checked against exact
    rationals on 2e5 random pairs, and bitwise on GPU), 3 instructions instead of a `div.rn`
    per element. A zero x keeps its sign (the correction would turn -0 into +0). Exception:
    |x| < 2^-100 (the residual leaves the normal range) can come out one fp32 ulp off, which
    matters only if its whole row or group is that small (else it quantizes to zero anyway)."""
    q = tl.minimum(tl.maximum(_div(x, scale, inv), -448.0), 448.0)
    if INTERP:  # the interpreter's own cast mis-rounds (kernels/common.py)
        q = tl_round_to_fp8_grid(q)
    return q.to(tl.float8e4nv)


@triton.jit
def _div(x, scale, inv):
    """x / scale correctly rounded, given inv = RN(1 / scale) (see `_quant`)."""
    q0 = x * inv
    return tl.where(q0 == 0.0, q0, tl.fma(tl.fma(-q0, scale, x), inv, q0))


@triton.jit
def _inv(scale):
    """RN(1 / scale); scales are normal (amax >= 5e-36) and at most 448 * 2^126 / 448."""
    return _recip(scale)
