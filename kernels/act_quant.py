"""SwiGLU / GELU between the two grouped GEMMs of the FP8 GroupedMLP, fused with FP8 quantization.

Legend: M routed rows (grouped by expert), F expert FFN width, X = 2F (SwiGLU: [gate | up]) or F
(GELU) columns of h, E experts, P = round_up(M, align) + E * align padded token columns.

    act_quant_fwd(h_MX, activation, block_k, pow2_scale, save_input)
        -> a_q (M, F) fp8 + a_scale (M,) | (M, F//128)          the A operand of GEMM2
           h_q (M, X) fp8 + h_scale (M,) | (M, X//128)          saved for backward (or empty)
    act_quant_bwd(da_MF, h_q, h_scale, activation, group_end_E, align, block, pow2_scale)
        -> dh_q  (M, X) fp8 + scale (M,) | (M, X//128)            dgrad1: dx = dh @ w1
           dht_q (X, P) fp8 + scale (X, E) | (X, P//128)          wgrad1: dw1 = dh^T x
           at_q  (F, P) fp8 + scale (F, E) | (F, P//128)          wgrad2: dw2 = dy^T a
           padded_end_E int32 (E,)
The transposed copies use exactly the layout of `quantize_cols_grouped` (group e's rows in
columns [padded_end_E[e] - round_up(size_e, align), ...), zeros elsewhere), so the same GEMM
calls read either. No bf16 activation is ever written: backward recomputes a from the FP8 h
(DeepSeek-V3 caches the SwiGLU input the same way).

Numerics: kernels/reference.py (the activations are explicit fp32 polynomials so kernel and
reference agree bit for bit; GELU is the exact-erf form). Scale rule: kernels/common.py.

Passes over memory (the kernels are memory-bound):
- forward, rowwise: a program owns whole rows; a row longer than one chunk is read twice, the
  second time from L2. blockwise: one read, one write.
- backward, blockwise: ONE pass. A program owns a 128-token x 128-feature tile (align is a
  multiple of 128, so the tile is in one group); it sweeps its tile twice, first for the
  column amaxes, then to quantize, the second sweep hitting L1/L2.
- backward, rowwise: an exact per-row scale needs the whole X-wide row and an exact per-group
  column scale needs the whole group before the first byte can be written, so the inputs are
  read twice: an amax pass (atomic max on the fp32 bits, which is order independent, hence
  deterministic) and the quantize pass that writes all three outputs.

Speed: these kernels are compute-bound, not memory-bound. Every fp32 operation must round as
torch's does (no FMA contraction, polynomial exp / erfc, IEEE divisions), some 100-150
instructions per element. Measured on H200 (fraction of the 4.3 TB/s copy, bytes counted once)
before `_recip` / `_fp8_scale` replaced div.rn (not yet measured): forward 1x128 0.52-0.54 for
SwiGLU and 0.27 for GELU, rowwise 0.35-0.37 and 0.15; backward rowwise 0.12-0.16, blockwise
0.08-0.10 (M=16384 F=14336, M=65536 F=768, M=32768 F=6400 GELU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference as ref
from kernels.common import (
    FP8_DTYPE,
    tl_fp8_scale,
    tl_round_to_fp8_grid,
    triton_interpret,
    use_triton,
)
from kernels.reference import (
    check_act_quant_args,
    check_act_quant_bwd_args,
    padded_size,
    torch_act_quant_bwd,
    torch_act_quant_fwd,
)

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


# ---- forward ----------------------------------------------------------------------------------


@triton.jit
def _fwd_load(h_rows, row_ok, f, F, SWIGLU: tl.constexpr):
    mask = row_ok[:, None] & (f[None, :] < F)
    g = tl.load(h_rows[:, None] + f[None, :], mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        u = tl.load(h_rows[:, None] + F + f[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        u = g
    return g, u, mask


@triton.jit
def _fwd_store(a_rows, hq_rows, f, F, mask, a, g, u, a_scale, h_scale, SWIGLU: tl.constexpr,
               SAVE: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    a_inv, h_inv = _inv(a_scale)[:, None], _inv(h_scale)[:, None]
    tl.store(a_rows[:, None] + f[None, :], _quant(a, a_scale[:, None], a_inv, INTERP), mask=mask)
    if SAVE:
        tl.store(hq_rows[:, None] + f[None, :], _quant(g, h_scale[:, None], h_inv, INTERP), mask=mask)
        if SWIGLU:
            tl.store(hq_rows[:, None] + F + f[None, :], _quant(u, h_scale[:, None], h_inv, INTERP), mask=mask)


@triton.jit
def _act_fwd_kernel(
    h_ptr, a_ptr, a_scale_ptr, hq_ptr, h_scale_ptr,
    M, F, stride_h,
    SWIGLU: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr, SAVE: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    X = 2 * F if SWIGLU else F
    h_rows = h_ptr + rows.to(tl.int64) * stride_h
    a_rows = a_ptr + rows.to(tl.int64) * F
    hq_rows = hq_ptr + rows.to(tl.int64) * X
    cols = tl.arange(0, BLOCK_F)
    if BLOCK_K:  # one 1x128 tile of a, gate and up per row: scales (M, F//128) and (M, X//128)
        fb = tl.program_id(1)
        f = fb * BLOCK_K + cols
        g, u, mask = _fwd_load(h_rows, row_ok, f, F, SWIGLU)
        a = _act(g, u, SWIGLU)
        a_scale = _fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        g_scale = _fp8_scale(tl.max(tl.abs(g), axis=1), POW2)
        tl.store(a_scale_ptr + rows * (F // BLOCK_K) + fb, a_scale, mask=row_ok)
        tl.store(a_rows[:, None] + f[None, :], _quant(a, a_scale[:, None], _inv(a_scale)[:, None], INTERP), mask=mask)
        if SAVE:
            tl.store(hq_rows[:, None] + f[None, :], _quant(g, g_scale[:, None], _inv(g_scale)[:, None], INTERP),
                     mask=mask)  # fmt: skip
            tl.store(h_scale_ptr + rows * (X // BLOCK_K) + fb, g_scale, mask=row_ok)
            if SWIGLU:
                u_scale = _fp8_scale(tl.max(tl.abs(u), axis=1), POW2)
                tl.store(hq_rows[:, None] + F + f[None, :], _quant(u, u_scale[:, None], _inv(u_scale)[:, None], INTERP),
                         mask=mask)  # fmt: skip
                tl.store(h_scale_ptr + rows * (X // BLOCK_K) + F // BLOCK_K + fb, u_scale, mask=row_ok)
    elif ONE_CHUNK:  # the whole row in registers: one read
        g, u, mask = _fwd_load(h_rows, row_ok, cols, F, SWIGLU)
        a = _act(g, u, SWIGLU)
        a_scale = _fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        h_scale = _fp8_scale(tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)), POW2)
        _fwd_store(a_rows, hq_rows, cols, F, mask, a, g, u, a_scale, h_scale, SWIGLU, SAVE, INTERP)
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)
    else:  # long rows: amax sweep, then a quantize sweep that re-reads the row from L2
        a_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        h_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a_amax = tl.maximum(a_amax, tl.max(tl.abs(_act(g, u, SWIGLU)), axis=1))
            h_amax = tl.maximum(h_amax, tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)))
        a_scale = _fp8_scale(a_amax, POW2)
        h_scale = _fp8_scale(h_amax, POW2)
        for f0 in range(0, F, BLOCK_F):
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a = _act(g, u, SWIGLU)
            _fwd_store(a_rows, hq_rows, f0 + cols, F, mask, a, g, u, a_scale, h_scale, SWIGLU, SAVE, INTERP)
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)


def _fwd_config(F: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps). Measured on H200 (M=16384, F=14336 / M=32768, F=6400 /
    M=65536, F=768): 16x128 tiles beat 8, 32, 64 and 128 rows; rowwise, one row per program in
    1024-wide chunks beat 2048-8192-wide chunks and whole rows in registers (16 warps)."""
    if block_k:
        return 16, block_k, 4
    block_f = min(triton.next_power_of_2(F), 1024)
    return (1 if F > block_f else max(1, 2048 // block_f)), block_f, 4


def _act_quant_fwd_impl(
    h_MX: torch.Tensor, activation: str, block_k: int, pow2_scale: bool, save_input: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    F = check_act_quant_args(h_MX, activation, block_k)
    if h_MX.stride(1) != 1:
        h_MX = h_MX.contiguous()
    M, X = h_MX.shape
    a_q, a_scale, h_q, h_scale = _fwd_outputs(h_MX, F, block_k, save_input)
    if M == 0:
        return a_q, a_scale, h_q, h_scale
    BLOCK_M, BLOCK_F, num_warps = _fwd_config(F, block_k)
    _act_fwd_kernel[(triton.cdiv(M, BLOCK_M), F // block_k if block_k else 1)](
        h_MX, a_q, a_scale, h_q, h_scale,
        M, F, h_MX.stride(0),
        SWIGLU=activation == "swiglu", BLOCK_K=block_k, POW2=pow2_scale, SAVE=save_input,
        INTERP=triton_interpret(), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, ONE_CHUNK=F <= BLOCK_F,
        num_warps=num_warps, **_LAUNCH,
    )  # fmt: skip
    return a_q, a_scale, h_q, h_scale


def _fwd_outputs(h_MX: torch.Tensor, F: int, block_k: int, save_input: bool):
    M, X = h_MX.shape
    a_q = h_MX.new_empty((M, F), dtype=FP8_DTYPE)
    a_scale = h_MX.new_empty((M, F // block_k) if block_k else (M,), dtype=torch.float32)
    if not save_input:
        return a_q, a_scale, h_MX.new_empty(0, dtype=FP8_DTYPE), h_MX.new_empty(0, dtype=torch.float32)
    h_q = h_MX.new_empty((M, X), dtype=FP8_DTYPE)
    h_scale = h_MX.new_empty((M, X // block_k) if block_k else (M,), dtype=torch.float32)
    return a_q, a_scale, h_q, h_scale


triton_act_quant_fwd = torch.library.custom_op("fp8moe::act_quant_fwd", mutates_args=())(_act_quant_fwd_impl)


@triton_act_quant_fwd.register_fake
def _(h_MX, activation, block_k, pow2_scale, save_input):
    F = check_act_quant_args(h_MX, activation, block_k)
    return _fwd_outputs(h_MX, F, block_k, save_input)


def act_quant_fwd(
    h_MX: torch.Tensor, activation: str = "swiglu", block_k: int = 0, pow2_scale: bool = False, save_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_q, a_scale, h_q, h_scale): Triton on GPU / interpreter, else the reference.
    Eager calls skip the custom op's dispatch (host time); torch.compile traces the op."""
    if not use_triton(h_MX):
        return torch_act_quant_fwd(h_MX, activation, block_k, pow2_scale, save_input)
    if torch.compiler.is_compiling():
        return triton_act_quant_fwd(h_MX, activation, block_k, pow2_scale, save_input)
    return _act_quant_fwd_impl(h_MX, activation, block_k, pow2_scale, save_input)


# ---- backward ---------------------------------------------------------------------------------


@triton.jit
def _bwd_prep_kernel(group_end_ptr, padded_end_ptr, ws_ptr, E, align, n_ws,
                     E_POW2: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Program 0: padded_end_E = cumsum(round_up(size_e, align)). The others zero the amax workspace."""
    pid = tl.program_id(0)
    if pid == 0:
        e = tl.arange(0, E_POW2)
        end = tl.load(group_end_ptr + e, mask=e < E, other=0)
        start = tl.load(group_end_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        padded = (end - start + align - 1) // align * align
        tl.store(padded_end_ptr + e, tl.cumsum(padded, axis=0), mask=e < E)
    else:
        offs = (pid - 1) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ws_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < n_ws)


@triton.jit
def _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS: tl.constexpr):
    """For padded token positions p: (source row, in a group, is a row at all, group id).

    Group id = number of padded ends <= p, by binary search. Positions past every group map to
    the rows past group_end_E[-1] (P leaves room for them): those rows get a zero dh row.
    """
    lo = tl.zeros_like(p)
    hi = lo + E
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        right = active & (tl.load(padded_end_ptr + mid, mask=active, other=0) <= p)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    gid = lo
    has_prev = gid > 0
    p_start = tl.load(padded_end_ptr + gid - 1, mask=has_prev, other=0)
    r_start = tl.load(group_end_ptr + gid - 1, mask=has_prev, other=0)
    r_end = tl.load(group_end_ptr + gid, mask=gid < E, other=M)
    row = r_start + (p - p_start)
    is_row = row < r_end
    return row, is_row & (gid < E), is_row, gid


@triton.jit
def _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, fb, F, stride_da, stride_h,
                SWIGLU: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """fp32 (d gate, d up, a) at (row, f); zero where the row is in no group."""
    row64 = row.to(tl.int64)
    mask = in_group[:, None] & f_ok[None, :]
    da = tl.load(da_ptr + row64[:, None] * stride_da + f[None, :], mask=mask, other=0.0).to(tl.float32)
    h_rows = h_ptr + row64[:, None] * stride_h
    X = 2 * F if SWIGLU else F
    if BLOCK:  # f lies in 128-block fb of the gate (and of the up half)
        g_scale = tl.load(hs_ptr + row64 * (X // BLOCK) + fb, mask=in_group, other=0.0)
        u_scale = tl.load(hs_ptr + row64 * (X // BLOCK) + F // BLOCK + fb, mask=in_group, other=0.0)
    else:
        g_scale = tl.load(hs_ptr + row64, mask=in_group, other=0.0)
        u_scale = g_scale
    g = tl.load(h_rows + f[None, :], mask=mask, other=0.0).to(tl.float32) * g_scale[:, None]
    if SWIGLU:
        u = tl.load(h_rows + F + f[None, :], mask=mask, other=0.0).to(tl.float32) * u_scale[:, None]
    else:
        u = g
    dg, du, a = _act_bwd(da, g, u, SWIGLU)
    return tl.where(mask, dg, 0.0), tl.where(mask, du, 0.0), tl.where(mask, a, 0.0)


@triton.jit
def _act_bwd_amax_kernel(
    da_ptr, h_ptr, hs_ptr, group_end_ptr, padded_end_ptr, row_amax_ptr, dht_amax_ptr, at_amax_ptr,
    M, F, E, stride_da, stride_h,
    SWIGLU: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """Rowwise recipe, pass 1: atomic max (on int32 views of non-negative fp32) of |dh| per row
    and of |dh|, |a| per (group, feature) into zeroed workspaces laid out (E, X) and (E, F), so
    that a warp's atomics (and the quantize pass's scale loads) are contiguous along features."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    X = 2 * F if SWIGLU else F
    row, in_group, is_row, gid = _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
    dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, 0, F, stride_da, stride_h, SWIGLU, 0)
    dg, du, a = tl.abs(dg), tl.abs(du), tl.abs(a)
    row_max = tl.maximum(tl.max(dg, axis=1), tl.max(du, axis=1))
    tl.atomic_max(row_amax_ptr + row, row_max.to(tl.int32, bitcast=True), mask=in_group)
    # A tile may hold the end of one group and the start of the next (align < BLOCK_P).
    g_first = tl.min(tl.where(in_group, gid, E))
    g_last = tl.max(tl.where(in_group, gid, -1))
    for grp in range(g_first, g_last + 1):
        sel = (in_group & (gid == grp))[:, None]
        dg_max = tl.max(tl.where(sel, dg, 0.0), axis=0).to(tl.int32, bitcast=True)
        tl.atomic_max(dht_amax_ptr + grp * X + f, dg_max, mask=f_ok)
        if SWIGLU:
            du_max = tl.max(tl.where(sel, du, 0.0), axis=0).to(tl.int32, bitcast=True)
            tl.atomic_max(dht_amax_ptr + grp * X + F + f, du_max, mask=f_ok)
        a_max = tl.max(tl.where(sel, a, 0.0), axis=0).to(tl.int32, bitcast=True)
        tl.atomic_max(at_amax_ptr + grp * F + f, a_max, mask=f_ok)


@triton.jit
def _amax_to_scale_kernel(ws_ptr, row_scale_ptr, dht_scale_ptr, at_scale_ptr, M, X, F, E,
                          POW2: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Rowwise recipe, between the passes: the workspace's amaxes -> scales, in place (the
    quantize pass reads them there, and the inverses stored after them) and into the outputs,
    whose column scales are (X, E) and (F, E)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_dh = E * X
    in_ws = offs < M + n_dh + E * F
    scale = tl_fp8_scale(tl.load(ws_ptr + offs, mask=in_ws, other=0.0), POW2)
    tl.store(ws_ptr + offs, scale, mask=in_ws)
    tl.store(ws_ptr + offs + n_dh + E * F, _inv(scale), mask=in_ws & (offs >= M))
    tl.store(row_scale_ptr + offs, scale, mask=offs < M)
    o = offs - M  # (group, feature) of the dh segment, then of the a segment
    tl.store(dht_scale_ptr + (o % X) * E + o // X, scale, mask=(o >= 0) & (o < n_dh))
    o = o - n_dh
    tl.store(at_scale_ptr + (o % F) * E + o // F, scale, mask=(o >= 0) & in_ws)


@triton.jit
def _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p_ok, f, f_ok, F, P, dg, du, a,
               dg_rs, dg_ri, du_rs, du_ri, dg_cs, dg_ci, du_cs, du_ci, a_cs, a_ci,
               SWIGLU: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """dh rows (row scales *_rs, inverses *_ri) and the transposed dh and a (column scales *_cs,
    inverses *_ci; broadcast against the (token, feature) tile)."""
    X = 2 * F if SWIGLU else F
    row_mask = is_row[:, None] & f_ok[None, :]
    dh_rows = dh_ptr + row.to(tl.int64)[:, None] * X + f[None, :]
    tl.store(dh_rows, _quant(dg, dg_rs, dg_ri, INTERP), mask=row_mask)
    col_mask = p_ok[:, None] & f_ok[None, :]
    cols = p[:, None] + f.to(tl.int64)[None, :] * P  # (token, feature) -> column-major store
    tl.store(dht_ptr + cols, _quant(dg, dg_cs, dg_ci, INTERP), mask=col_mask)
    tl.store(at_ptr + cols, _quant(a, a_cs, a_ci, INTERP), mask=col_mask)
    if SWIGLU:
        tl.store(dh_rows + F, _quant(du, du_rs, du_ri, INTERP), mask=row_mask)
        tl.store(dht_ptr + cols + F * P, _quant(du, du_cs, du_ci, INTERP), mask=col_mask)


@triton.jit
def _act_bwd_quant_kernel(
    da_ptr, h_ptr, hs_ptr, group_end_ptr, padded_end_ptr,
    dh_ptr, dh_scale_ptr, dht_ptr, dht_scale_ptr, at_ptr, at_scale_ptr, ws_col_ptr,
    M, F, E, P, stride_da, stride_h,
    SWIGLU: tl.constexpr, BLOCK: tl.constexpr, POW2: tl.constexpr, INTERP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Writes dh rows, dh^T and a^T for BLOCK_P padded token positions x BLOCK_F features.

    Rowwise (BLOCK=0): scales come from the amax pass (column scales and their inverses from
    the workspace ws_col, see `_amax_to_scale_kernel`). Blockwise (BLOCK=128 = BLOCK_P = BLOCK_F):
    the program's tile is one scale tile in every layout; it sweeps the tile CHUNK tokens at a
    time, once for the column amaxes and once to quantize.
    """
    pid_p = tl.program_id(0)
    fb = tl.program_id(1)
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    X = 2 * F if SWIGLU else F
    if BLOCK == 0:
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        row, in_group, is_row, gid = _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
        dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, 0, F, stride_da, stride_h, SWIGLU, 0)
        rs = tl.load(dh_scale_ptr + row, mask=is_row, other=1.0)
        ri = _inv(rs)[:, None]
        rs = rs[:, None]
        col_mask = in_group[:, None] & f_ok[None, :]
        # Each element's (group, feature) column scale and its inverse, from the workspace:
        # scales (E, X) and (E, F), then the inverses in the same layout.
        dh_cols = gid.to(tl.int64)[:, None] * X + f[None, :]
        a_cols = gid.to(tl.int64)[:, None] * F + f[None, :]
        inv_off = E * (X + F)
        dg_cs = tl.load(ws_col_ptr + dh_cols, mask=col_mask, other=1.0)
        dg_ci = tl.load(ws_col_ptr + inv_off + dh_cols, mask=col_mask, other=1.0)
        a_cs = tl.load(ws_col_ptr + E * X + a_cols, mask=col_mask, other=1.0)
        a_ci = tl.load(ws_col_ptr + inv_off + E * X + a_cols, mask=col_mask, other=1.0)
        du_cs, du_ci = dg_cs, dg_ci
        if SWIGLU:
            du_cs = tl.load(ws_col_ptr + F + dh_cols, mask=col_mask, other=1.0)
            du_ci = tl.load(ws_col_ptr + inv_off + F + dh_cols, mask=col_mask, other=1.0)
        _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p < P, f, f_ok, F, P, dg, du, a,
                   rs, ri, rs, ri, dg_cs, dg_ci, du_cs, du_ci, a_cs, a_ci, SWIGLU, INTERP)  # fmt: skip
    else:
        dg_amax = tl.zeros([BLOCK_F], dtype=tl.float32)
        du_amax = tl.zeros([BLOCK_F], dtype=tl.float32)
        a_amax = tl.zeros([BLOCK_F], dtype=tl.float32)
        for c in range(0, BLOCK_P, CHUNK):
            p = pid_p * BLOCK_P + c + tl.arange(0, CHUNK)
            row, in_group, is_row, gid = _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
            dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, fb, F, stride_da, stride_h,
                                    SWIGLU, BLOCK)  # fmt: skip
            dg_amax = tl.maximum(dg_amax, tl.max(tl.abs(dg), axis=0))
            du_amax = tl.maximum(du_amax, tl.max(tl.abs(du), axis=0))
            a_amax = tl.maximum(a_amax, tl.max(tl.abs(a), axis=0))
        dg_cs = _fp8_scale(dg_amax, POW2)
        du_cs = _fp8_scale(du_amax, POW2)
        a_cs = _fp8_scale(a_amax, POW2)
        dg_ci, du_ci, a_ci = _inv(dg_cs)[None, :], _inv(du_cs)[None, :], _inv(a_cs)[None, :]
        n_tiles = P // BLOCK
        tl.store(dht_scale_ptr + f * n_tiles + pid_p, dg_cs)
        tl.store(at_scale_ptr + f * n_tiles + pid_p, a_cs)
        if SWIGLU:
            tl.store(dht_scale_ptr + (F + f) * n_tiles + pid_p, du_cs)
        for c in range(0, BLOCK_P, CHUNK):
            p = pid_p * BLOCK_P + c + tl.arange(0, CHUNK)
            row, in_group, is_row, gid = _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
            dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, fb, F, stride_da, stride_h,
                                    SWIGLU, BLOCK)  # fmt: skip
            dg_rs = _fp8_scale(tl.max(tl.abs(dg), axis=1), POW2)
            du_rs = _fp8_scale(tl.max(tl.abs(du), axis=1), POW2)
            scale_row = dh_scale_ptr + row.to(tl.int64) * (X // BLOCK)
            tl.store(scale_row + fb, dg_rs, mask=is_row)
            if SWIGLU:
                tl.store(scale_row + F // BLOCK + fb, du_rs, mask=is_row)
            _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p < P, f, f_ok, F, P, dg, du, a,
                       dg_rs[:, None], _inv(dg_rs)[:, None], du_rs[:, None], _inv(du_rs)[:, None],
                       dg_cs[None, :], dg_ci, du_cs[None, :], du_ci, a_cs[None, :], a_ci, SWIGLU, INTERP)  # fmt: skip


def _bwd_outputs(da_MF: torch.Tensor, X: int, E: int, align: int, block: int):
    M, F = da_MF.shape
    P = padded_size(M, E, align)
    fp8 = dict(dtype=FP8_DTYPE)
    f32 = dict(dtype=torch.float32)
    return (
        da_MF.new_empty((M, X), **fp8),
        da_MF.new_empty((M, X // block) if block else (M,), **f32),
        da_MF.new_empty((X, P), **fp8),
        da_MF.new_empty((X, P // block) if block else (X, E), **f32),
        da_MF.new_empty((F, P), **fp8),
        da_MF.new_empty((F, P // block) if block else (F, E), **f32),
        da_MF.new_empty((E,), dtype=torch.int32),
    )


# Launch shapes: rowwise (BLOCK_P, BLOCK_F, warps); blockwise sweeps its 128x128 tile in chunks.
# Measured on H200 at the three shapes of the tests: 32x32 beat 64x64, 64x32, 32x64 and larger
# tiles (those spill); chunks of 16 rows with 4 warps beat 32/64/128 rows and 8/16 warps.
_ROWWISE_TILE = (32, 32, 4)
_BLOCKWISE_CHUNK, _BLOCKWISE_WARPS = 16, 4
_PREP_BLOCK = 1024


def _act_quant_bwd_impl(
    da_MF: torch.Tensor,
    h_fp8: torch.Tensor,
    h_scale: torch.Tensor,
    activation: str,
    group_end_E: torch.Tensor,
    align: int,
    block: int,
    pow2_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    F = check_act_quant_bwd_args(da_MF, h_fp8, h_scale, activation, group_end_E, align, block)
    if da_MF.stride(1) != 1:
        da_MF = da_MF.contiguous()
    h_fp8, h_scale = h_fp8.contiguous(), h_scale.contiguous()
    group_end_E = group_end_E.to(torch.int32).contiguous()
    M, X = h_fp8.shape
    E = group_end_E.numel()
    out = _bwd_outputs(da_MF, X, E, align, block)
    dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E = out
    P = dht_q.shape[1]
    swiglu = activation == "swiglu"
    common = dict(SWIGLU=swiglu, SEARCH_STEPS=E.bit_length())
    # Rowwise workspace: amaxes, then scales in place, of the rows (M) and of the (group, feature)
    # columns of dh (E, X) and a (E, F); then the columns' inverse scales. Only amaxes are zeroed.
    n_ws = 0 if block else M + X * E + F * E
    ws = da_MF.new_empty(n_ws + (n_ws - M if n_ws else 0), dtype=torch.float32)
    _bwd_prep_kernel[(1 + triton.cdiv(n_ws, _PREP_BLOCK),)](
        group_end_E, padded_end_E, ws, E, align, n_ws, E_POW2=triton.next_power_of_2(E), BLOCK=_PREP_BLOCK
    )
    args = (da_MF, h_fp8, h_scale, group_end_E, padded_end_E)
    if block:
        grid = (P // block, F // block)
        tile = dict(BLOCK_P=block, BLOCK_F=block, CHUNK=_BLOCKWISE_CHUNK, num_warps=_BLOCKWISE_WARPS)
    else:
        BLOCK_P, BLOCK_F, num_warps = _ROWWISE_TILE
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(F, BLOCK_F))
        tile = dict(BLOCK_P=BLOCK_P, BLOCK_F=BLOCK_F, CHUNK=BLOCK_P, num_warps=num_warps)
        ws_i32 = ws.view(torch.int32)
        _act_bwd_amax_kernel[grid](
            *args, ws_i32, ws_i32[M:], ws_i32[M + X * E :],
            M, F, E, da_MF.stride(0), h_fp8.stride(0),
            **common, BLOCK_P=BLOCK_P, BLOCK_F=BLOCK_F, num_warps=num_warps, **_LAUNCH,
        )  # fmt: skip
        _amax_to_scale_kernel[(triton.cdiv(n_ws, _PREP_BLOCK),)](
            ws, dh_scale, dht_scale, at_scale, M, X, F, E, POW2=pow2_scale, BLOCK=_PREP_BLOCK
        )
    _act_bwd_quant_kernel[grid](
        *args, dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, ws[M:] if n_ws else ws,
        M, F, E, P, da_MF.stride(0), h_fp8.stride(0),
        **common, BLOCK=block, POW2=pow2_scale, INTERP=triton_interpret(), **tile, **_LAUNCH,
    )  # fmt: skip
    return out


triton_act_quant_bwd = torch.library.custom_op("fp8moe::act_quant_bwd", mutates_args=())(_act_quant_bwd_impl)


@triton_act_quant_bwd.register_fake
def _(da_MF, h_fp8, h_scale, activation, group_end_E, align, block, pow2_scale):
    check_act_quant_bwd_args(da_MF, h_fp8, h_scale, activation, group_end_E, align, block)
    return _bwd_outputs(da_MF, h_fp8.shape[1], group_end_E.numel(), align, block)


def act_quant_bwd(
    da_MF: torch.Tensor,
    h_fp8: torch.Tensor,
    h_scale: torch.Tensor,
    activation: str,
    group_end_E: torch.Tensor,
    align: int = 16,
    block: int = 0,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E); see the module docstring."""
    args = (da_MF, h_fp8, h_scale, activation, group_end_E, align, block, pow2_scale)
    if not use_triton(da_MF):
        return torch_act_quant_bwd(*args)
    if torch.compiler.is_compiling():
        return triton_act_quant_bwd(*args)
    return _act_quant_bwd_impl(*args)
