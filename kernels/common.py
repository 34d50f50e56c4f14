"""What every FP8 kernel and its reference agree on: the format, the scale rule, the dispatch.

Scale rule (all recipes): for a set of values with absolute maximum `amax`,
    scale = amax / 448            (fp32; the dequantization multiplier, x ~= q * scale)
    scale = 2 ** ceil(log2(scale)) when the recipe asks for power-of-two scales
    scale = max(scale, 2 ** -126) so that 1 / scale is finite (amax < 5.3e-36: tiny, not zero)
    scale = 1                     when amax == 0 (an all-zero row or group quantizes to zeros, never NaN)
    q     = clamp(x * (1 / scale), -448, 448).to(float8_e4m3fn)    (saturating cast)

Quantization multiplies by the scale's inverse, as TransformerEngine and torchao do, instead of
dividing: one FMUL per element where the IEEE quotient took five instructions (two products,
Markstein's two FMAs, the select that kept the sign of zero); the 128x1 grouped column kernel
took 17-24% less time for it (bench/NOTES.md). For power-of-two scales the product is the
quotient; otherwise it is within 1.5 fp32 ulp of it, so a byte differs from the quotient's only
where x / scale lies that close to an E4M3 rounding boundary, and then by one step.

How the rule is computed, so that kernels and references agree bit for bit (fp32 throughout):
- The divisions (amax / 448, 1 / scale) are IEEE round-to-nearest. Triton's `/` on fp32 lowers
  to the approximate `div.full.f32` on NVIDIA GPUs, so kernels never use it for a result:
  `tl_div_448` divides by 448 with Markstein's FMA step on RN(1/448); `tl_fp8_inverse` takes
  RN(1 / scale) once per scale (`tl_rcp_rn`: Newton steps), and `tl_fp8_quantize_by`
  multiplies by it. No `tl.math.div_rn` either: its slow path is a subroutine call, around
  which ptxas keeps every live register of the tile (the 128x64 blockwise column kernel: 254
  registers, 160 without).
  Both replacements are exact for every input that matters, checked exhaustively on the CPU
  (every fp32 significand, with the interpreter's exact fp32 FMA): amax / 448 for all 254
  normal binades (tiny amaxes scaled by 2**64 first, so that the FMA residual cannot
  underflow); 1 / s for s in [2**-62, 2**125] from any start within 4 ulp (div.full.f32 is
  within 2), after two Newton steps and the one significand (all ones) that they leave an ulp
  low. tests/test_kernels_scale_rule.py repeats both checks on the GPU, and checks the whole
  quantization against torch for every finite bf16 x.
  torch's tensor/tensor division is IEEE on CPU and CUDA, but `cuda_tensor / python_float`
  multiplies by a rounded reciprocal, so references divide by tensors (`torch_fp8_scale`,
  `torch_fp8_quantize`).
- "2 ** ceil(log2(scale))" is taken on the fp32 bits, `(bits + 0x7FFFFF) & 0x7F800000`, which is
  exact (no log2, whose GPU version is approximate); it maps scales below 2**-126 to 2**-126
  too. The floor matters because kernels multiply by 1 / scale: a subnormal scale's inverse
  overflows to inf (and flush-to-zero arithmetic makes the scale 0), so a GELU tile of values
  around -1e-38 once quantized to NaN and -448 on an H200.
- The fp8 cast rounds to nearest even on both sides (PTX `cvt.rn.satfinite.e4m3x2.f32`, torch's
  software conversion); the clamp comes first because torch's cast turns values past 448 into NaN
  (the GPU's cast saturates by itself, so kernels leave the clamp out: `tl_fp8_quantize_by`).
- Under Triton's interpreter (CPU tests) the kernels' casts are exact too: `tl_fp8_quantize_by`
  rounds to the E4M3 grid in fp32 first (see "exact casts under Triton's interpreter" below), so
  every kernel is compared with its reference bit for bit on the CPU as on the GPU.

Shape letters (README.md): M rows, K reduction dim, N output dim, E experts.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
FP32_MIN_NORMAL = 2.0**-126  # scale floor: 1 / scale stays finite (see the scale rule above)
TL_FP32_MIN_NORMAL = tl.constexpr(FP32_MIN_NORMAL)  # the same floor inside Triton kernels


def triton_interpret() -> bool:
    """True when Triton kernels run in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Launch the Triton kernel for tensors on a GPU, or on the CPU under the interpreter.

    Plain CPU tensors outside the interpreter take the pure-torch reference: that is the
    documented CPU path (tests and the tiny CPU model), never a fallback from a GPU.
    """
    return t.is_cuda or triton_interpret()


_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def tile_grid(n_outer: int, n_inner: int, inner_first: bool) -> tuple[tuple[int, int], bool]:
    """(grid, inner_first) over n_outer x n_inner tiles. inner_first: program_id(0) is the inner
    index, so consecutive programs take consecutive inner tiles of the same outer one (e.g. the
    column blocks of the same tokens, reading whole lines of their rows together); it falls back
    to outer-first when the outer tiles outnumber the grid's second dimension (65535). The
    kernel reads its tile back with `tl_tile_ids(inner_first)`."""
    inner_first = inner_first and n_outer <= _MAX_GRID_Y
    return ((n_inner, n_outer) if inner_first else (n_outer, n_inner)), inner_first


@triton.jit
def tl_tile_ids(INNER_FIRST: tl.constexpr):
    """(outer, inner) tile of this program in a `tile_grid` grid; INNER_FIRST: the flag it returned."""
    if INNER_FIRST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (host integers only)."""
    return (n + multiple - 1) // multiple * multiple


# ---- the scale rule, in torch and in Triton (must stay bitwise identical) ----------------------

_POW2_ROUND = 0x007FFFFF  # added to fp32 bits: carries into the exponent unless the mantissa is 0
_EXP_MASK = 0x7F800000


def torch_fp8_scale(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    """Dequantization scale (fp32) from an fp32 amax tensor, by the rule in the module docstring."""
    amax = amax.float()
    scale = amax / torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device)
    if pow2_scale:
        scale = ((scale.view(torch.int32) + _POW2_ROUND) & _EXP_MASK).view(torch.float32)
    scale = scale.clamp_min(FP32_MIN_NORMAL)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def torch_fp8_inverse(scale: torch.Tensor) -> torch.Tensor:
    """RN(1 / scale), fp32: a tensor over a tensor, IEEE on CPU and CUDA (see the module docstring)."""
    return torch.ones_like(scale, dtype=torch.float32) / scale.float()


def torch_fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(x * (1 / scale), -448, 448) cast to E4M3; `scale` broadcasts against `x`."""
    return (x.float() * torch_fp8_inverse(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 q * scale for an FP8 (any format) q and its scales, each scale spread over a block of q:
    along each dim, q.shape[d] / scale.shape[d] elements (1: broadcast, q's size: one each). A
    scale with fewer dims than q lines up with q's leading dims: per row (M,) for q (M, K), per
    expert (E,) or per row (E, N) for q (E, N, K); 1x128 tiles (M, K // 128), 128x128 blocks
    (E, N // 128, K // 128)."""
    s = scale.float()
    s = s.reshape(*s.shape, *[1] * (q.dim() - s.dim()))
    for d, (n, n_s) in enumerate(zip(q.shape, s.shape)):
        if n_s not in (1, n):
            s = s.repeat_interleave(-(-n // n_s), dim=d).narrow(d, 0, n)
    return q.float() * s


# Triton's jit decides at import whether kernels run in the interpreter; so does this constant.
_INTERPRETED = tl.constexpr(triton_interpret())
_INV_448 = tl.constexpr(0.0022321429569274187)  # RN(1 / 448) in fp32, exactly
_TWO_64, _TWO_M64, _TWO_M60 = tl.constexpr(1.8446744073709552e19), tl.constexpr(5.421010862427522e-20), \
    tl.constexpr(8.673617379884035e-19)  # fmt: skip


@triton.jit
def tl_div_448(amax):
    """RN(amax / 448) for fp32 amax >= 0 whose quotient is normal (smaller ones end at the scale
    rule's floor either way), inf and NaN passed through: Markstein's step on RN(1/448), with
    amax < 2**-60 scaled by 2**64 and back so that the residual FMA cannot underflow (see the
    module docstring for the exhaustive check)."""
    tiny = amax < _TWO_M60
    a = tl.where(tiny, amax * _TWO_64, amax)
    q0 = a * _INV_448
    q = tl.fma(tl.fma(-q0, 448.0, a), _INV_448, q0)
    q = tl.where(tiny, q * _TWO_M64, q)
    return tl.where(amax * 0.0 == 0.0, q, amax)  # inf * 0 and NaN * 0 are NaN


@triton.jit
def tl_rcp_rn(s):
    """RN(1 / s) for s in [2**-62, 2**125] without a division: div.full.f32 (within 2 ulp; IEEE
    under the interpreter), two Newton steps with FMAs, and the all-ones significand, which the
    steps can leave an ulp low, set directly: 1 / ((2 - 2**-23) 2**e) rounds to (1 + 2**-23)
    2**(-e-1)."""
    r = 1.0 / s
    r = tl.fma(tl.fma(-s, r, 1.0), r, r)
    r = tl.fma(tl.fma(-s, r, 1.0), r, r)
    bits = s.to(tl.int32, bitcast=True)
    all_ones = ((253 << 23) - (bits & 0x7F800000) + 1).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7FFFFF) == 0x7FFFFF, all_ones, r)


@triton.jit
def tl_fp8_scale(amax, POW2: tl.constexpr):
    """Triton twin of `torch_fp8_scale` (amax: fp32 scalar or block)."""
    scale = tl_div_448(amax)
    if POW2:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x007FFFFF) & 0x7F800000).to(
            tl.float32, bitcast=True
        )
    scale = tl.maximum(scale, TL_FP32_MIN_NORMAL)
    return tl.where(amax == 0.0, 1.0, scale)


@triton.jit
def tl_fp8_inverse(scale):
    """RN(1 / scale) for `tl_fp8_quantize_by`, bitwise `torch_fp8_inverse`. Take it once per
    scale (pass scale un-broadcast, e.g. [BLOCK_M, 1]). Scales lie in [2**-126, 2**120]
    (amax <= 3.4e38); those below 2**-60 are scaled by 2**64 into `tl_rcp_rn`'s range and the
    inverse back (both exact: powers of two, and inverses up to 2**126 are normal)."""
    f = tl.where(scale < _TWO_M60, _TWO_64, 1.0)
    return tl_rcp_rn(scale * f) * f


# ---- exact casts under Triton's interpreter (CPU tests only) ----------------------------------
# The interpreter's fp32 -> fp8 cast drops the carry when rounding crosses a binade (7.935 comes
# back as 4.0, torch gives 8.0) and rounds ties away from zero; its fp32 -> bf16 cast truncates.
# Both are exact for values already on the target grid, so kernels that want bitwise CPU tests
# round to the grid first, behind a constexpr that is True only under the interpreter: the GPU
# code is the plain cast. (The GPU's cvt instructions round to nearest even, like torch.)


@triton.jit
def tl_round_to_fp8_grid(q, MANT_BITS: tl.constexpr = 3, MIN_EXP: tl.constexpr = -6):
    """fp32 q (|q| at most the format's largest value) rounded to the nearest value of an fp8
    format, ties to even, still fp32: E4M3 (MANT_BITS 3, smallest normal 2**MIN_EXP = 2**-6) by
    default, E5M2 with 2 and -14."""
    bits = q.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # 2**(e + 23 - MANT_BITS) for q's binade e (floored at the smallest normal): adding and
    # subtracting it rounds to a multiple of 2**(e - MANT_BITS), the format's spacing there.
    big = ((tl.maximum(mag >> 23, 127 + MIN_EXP) + 23 - MANT_BITS) << 23).to(tl.float32, bitcast=True)
    r = (mag.to(tl.float32, bitcast=True) + big) - big
    return (r.to(tl.int32, bitcast=True) | (bits ^ mag)).to(tl.float32, bitcast=True)


@triton.jit
def tl_round_to_bf16_grid(x):
    """fp32 x rounded to the nearest bfloat16 value, ties to even, still fp32 (finite, normal x)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


# Under Triton's interpreter the fp32 -> bf16 cast truncates: a kernel whose own bf16 rounding must
# be the GPU's (round to nearest even) rounds to the grid first there (`tl_round_bf16_if`).
CAST_TRUNCATES = tl.constexpr(triton_interpret())


@triton.jit
def tl_round_bf16_if(x, ROUND_BF16: tl.constexpr):
    """fp32 x, rounded to the bf16 grid first when ROUND_BF16 (a kernel sets it under Triton's
    interpreter for a bf16 output: there the fp32 -> bf16 cast truncates)."""
    if ROUND_BF16:
        x = tl_round_to_bf16_grid(x)
    return x


@triton.jit
def tl_fp8_quantize_by(x, inv):
    """clamp(x * inv, -448, 448) to float8e4nv, inv = `tl_fp8_inverse(scale)` (or any inverse
    taken once per scale): one FMUL per element, which keeps the sign of zero. No clamp on the
    GPU: the cast is cvt.rn.satfinite.e4m3x2.f32 (PTX's only f32 -> e4m3 form), which saturates;
    the clamp's two FMNMX per element were ~10% of the 128x64 blockwise column kernel's sm_90
    instructions. The interpreter's cast neither saturates nor rounds right across binades: there
    the product is clamped and rounded to the E4M3 grid first, so that the cast is exact."""
    q = x * inv
    if _INTERPRETED:
        q = tl_round_to_fp8_grid(tl.minimum(tl.maximum(q, -448.0), 448.0))
    return q.to(tl.float8e4nv)


@triton.jit
def tl_fp8_quantize(x, scale):
    """Triton twin of `torch_fp8_quantize`; x fp32, scale broadcastable, result float8e4nv."""
    return tl_fp8_quantize_by(x, tl_fp8_inverse(scale))
