"""SwiGLU / GELU between the two grouped GEMMs of the FP8 GroupedMLP, fused with FP8 quantization.

Shape letters (README.md): M routed rows (grouped by expert), F expert FFN hidden size, X = 2F
(SwiGLU: [gate | up]) or F (GELU) columns of h, E experts, P = round_up(M, align) + E * align
padded rows (here the transposed copies' columns).

    act_quant_fwd(h_MX, activation, block_k, pow2_scale, save_input, stats)
        -> a_q (M, F) fp8 + a_scale (M,) | (M, F//128)          the A operand of GEMM2
           h_q (M, X) fp8 + h_scale (M,) | (M, X//128)          saved for backward (or empty)
        stats: None, or an FP8 statistics buffer of two operands, a then h (kernels/fp8_stats.py),
        that the forward adds the two casts' counts to (h's only when it is saved)
    act_quant_bwd(da_MF, h_q, h_scale, activation, group_end_E, align, block, pow2_scale)
        -> dh_q  (M, X) fp8 + scale (M,) | (M, X//128)            dgrad1: dx = dh @ w1
           dht_q (X, P) fp8 + scale (X, E) | (X, P//128)          wgrad1: dw1 = dh^T x
           at_q  (F, P) fp8 + scale (F, E) | (F, P//128)          wgrad2: dw2 = dy^T a
           padded_end_E int32 (E,)
The transposed copies use exactly the layout of `quantize_cols_grouped` (group e's rows in
columns [padded_end_E[e] - round_up(size_e, align), ...), zeros elsewhere), so the same GEMM
calls read either. No bf16 activation is ever written: backward recomputes a from the FP8 h
(DeepSeek-V3 caches the SwiGLU input the same way).

Forward here, backward in kernels/act_quant_bwd.py, shared fp32 math in kernels/act_math.py.
Numerics: hardware exp2 / reciprocal with FMA contraction. The fp32 activations are within
(2|g| + 11) u (SwiGLU) and (1.5 x^2 + 18) u (GELU) of exact, u = 2^-24 relative
(kernels/act_math.py), and the outputs agree with kernels/reference_act.py (fp32 polynomials,
GELU the exact-erf form) to one E4M3 step per value, with at most 7.8e-5 of the values differing
in the GPU tests (H200); the scales follow kernels/common.py's rule on amaxes that differ only by
those fp32 errors. tests/test_kernels_act_quant.py states and checks the contract.

Passes over memory (the kernels are meant to be memory-bound):
- forward, rowwise: a program owns whole rows; a row longer than one chunk is read twice, the
  second time from L2. blockwise: one read, one write.
- backward, blockwise: ONE pass. A program owns a 128-token x 128-feature tile (align is a
  multiple of 128, so the tile is in one group); it sweeps its tile twice, first for the
  column amaxes, then to quantize, the second sweep hitting L1/L2.
- backward, rowwise: an exact per-row scale needs the whole X-wide row and an exact per-group
  column scale needs the whole group before the first byte can be written, so the inputs are
  read twice: an amax pass (atomic max on the fp32 bits, which is order independent, hence
  deterministic) and the quantize pass that writes all three outputs. A small kernel first
  maps padded token positions to rows and groups for both.

Their speed against the copy ceiling: bench/results/kernels.json; the instruction counts and
measurements behind their shapes: bench/NOTES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.act_math import LAUNCH_OPTIONS, act, inv_scale
from kernels.common import FP8_DTYPE, tile_grid, tl_fp8_quantize_by, tl_fp8_scale, tl_tile_ids, triton_interpret
from kernels.contracts import check_act_quant_args
from kernels.dispatch import kernel_op
from kernels.fp8_stats import check_stats_arg, tl_fp8_stats_flush, tl_fp8_stats_tile, tl_fp8_stats_zero
from kernels.reference_act import torch_act_quant_fwd


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
def _fwd_store(a_rows, hq_rows, f, F, mask, a, g, u, a_inv, h_inv, SWIGLU: tl.constexpr, SAVE: tl.constexpr):
    """Quantized a (and g, u) of one chunk, given the inverse row scales."""
    tl.store(a_rows[:, None] + f[None, :], tl_fp8_quantize_by(a, a_inv[:, None]), mask=mask)
    if SAVE:
        tl.store(hq_rows[:, None] + f[None, :], tl_fp8_quantize_by(g, h_inv[:, None]), mask=mask)
        if SWIGLU:
            tl.store(hq_rows[:, None] + F + f[None, :], tl_fp8_quantize_by(u, h_inv[:, None]), mask=mask)


@triton.jit
def _fwd_stats(sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat, mask, a, g, u, a_inv, h_inv, SWIGLU: tl.constexpr,
               SAVE: tl.constexpr):  # fmt: skip
    """The partials of a and h (kernels/fp8_stats.py) with one chunk's added (row scales)."""
    sa_amax, sa_under, sa_sat = tl_fp8_stats_tile(sa_amax, sa_under, sa_sat, a, a_inv[:, None], mask)
    if SAVE:
        sh_amax, sh_under, sh_sat = tl_fp8_stats_tile(sh_amax, sh_under, sh_sat, g, h_inv[:, None], mask)
        if SWIGLU:
            sh_amax, sh_under, sh_sat = tl_fp8_stats_tile(sh_amax, sh_under, sh_sat, u, h_inv[:, None], mask)
    return sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat


@triton.jit
def _fwd_flush(stats_ptr, sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat, M, F, SWIGLU: tl.constexpr,
               SAVE: tl.constexpr):  # fmt: skip
    """A program's partials of a and h into stats rows 0 and 1, once; the first program adds the
    launch's values, M * F of a and M * X of h."""
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    tl_fp8_stats_flush(stats_ptr, sa_amax, sa_under, sa_sat, first, M, F)
    if SAVE:
        tl_fp8_stats_flush(stats_ptr + 4, sh_amax, sh_under, sh_sat, first, M, 2 * F if SWIGLU else F)


@triton.jit
def _act_fwd_kernel(
    h_ptr, a_ptr, a_scale_ptr, hq_ptr, h_scale_ptr, stats_ptr,
    M, F, stride_h,
    SWIGLU: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr, SAVE: tl.constexpr, STATS: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, ONE_CHUNK: tl.constexpr,
    F_FIRST: tl.constexpr,
):  # fmt: skip
    pid_m, fb = tl_tile_ids(F_FIRST)  # (row tile, 128-feature tile)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    X = 2 * F if SWIGLU else F
    h_rows = h_ptr + rows.to(tl.int64) * stride_h
    a_rows = a_ptr + rows.to(tl.int64) * F
    hq_rows = hq_ptr + rows.to(tl.int64) * X
    cols = tl.arange(0, BLOCK_F)
    if BLOCK_K:  # one 1x128 tile of a, gate and up per row: scales (M, F//128) and (M, X//128)
        f = fb * BLOCK_K + cols
        g, u, mask = _fwd_load(h_rows, row_ok, f, F, SWIGLU)
        a = act(g, u, SWIGLU, INTERP)
        a_scale = tl_fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        tl.store(a_scale_ptr + rows * (F // BLOCK_K) + fb, a_scale, mask=row_ok)
        a_inv = inv_scale(a_scale, INTERP)[:, None]
        tl.store(a_rows[:, None] + f[None, :], tl_fp8_quantize_by(a, a_inv), mask=mask)
        if STATS:
            sa_amax, sa_under, sa_sat = tl_fp8_stats_zero()
            sa_amax, sa_under, sa_sat = tl_fp8_stats_tile(sa_amax, sa_under, sa_sat, a, a_inv, mask)
            sh_amax, sh_under, sh_sat = tl_fp8_stats_zero()
        if SAVE:
            g_scale = tl_fp8_scale(tl.max(tl.abs(g), axis=1), POW2)
            tl.store(h_scale_ptr + rows * (X // BLOCK_K) + fb, g_scale, mask=row_ok)
            g_inv = inv_scale(g_scale, INTERP)[:, None]
            tl.store(hq_rows[:, None] + f[None, :], tl_fp8_quantize_by(g, g_inv), mask=mask)
            if STATS:
                sh_amax, sh_under, sh_sat = tl_fp8_stats_tile(sh_amax, sh_under, sh_sat, g, g_inv, mask)
            if SWIGLU:
                u_scale = tl_fp8_scale(tl.max(tl.abs(u), axis=1), POW2)
                tl.store(h_scale_ptr + rows * (X // BLOCK_K) + F // BLOCK_K + fb, u_scale, mask=row_ok)
                u_inv = inv_scale(u_scale, INTERP)[:, None]
                tl.store(hq_rows[:, None] + F + f[None, :], tl_fp8_quantize_by(u, u_inv), mask=mask)
                if STATS:
                    sh_amax, sh_under, sh_sat = tl_fp8_stats_tile(sh_amax, sh_under, sh_sat, u, u_inv, mask)
    elif ONE_CHUNK:  # the whole row in registers: one read
        g, u, mask = _fwd_load(h_rows, row_ok, cols, F, SWIGLU)
        a = act(g, u, SWIGLU, INTERP)
        a_scale = tl_fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        h_scale = tl_fp8_scale(tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)), POW2)
        a_inv, h_inv = inv_scale(a_scale, INTERP), inv_scale(h_scale, INTERP)
        _fwd_store(a_rows, hq_rows, cols, F, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE)
        if STATS:
            sa_amax, sa_under, sa_sat = tl_fp8_stats_zero()
            sh_amax, sh_under, sh_sat = tl_fp8_stats_zero()
            sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat = _fwd_stats(
                sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE
            )
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)
    else:  # long rows: amax sweep, then a quantize sweep that re-reads the row from L2
        a_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        h_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a_amax = tl.maximum(a_amax, tl.max(tl.abs(act(g, u, SWIGLU, INTERP)), axis=1))
            h_amax = tl.maximum(h_amax, tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)))
        a_scale = tl_fp8_scale(a_amax, POW2)
        h_scale = tl_fp8_scale(h_amax, POW2)
        a_inv, h_inv = inv_scale(a_scale, INTERP), inv_scale(h_scale, INTERP)
        n_chunks = tl.cdiv(F, BLOCK_F)
        if STATS:
            sa_amax, sa_under, sa_sat = tl_fp8_stats_zero()
            sh_amax, sh_under, sh_sat = tl_fp8_stats_zero()
        for i in range(0, n_chunks):
            # last chunk first: the amax sweep read it last, so it is the likeliest in L2 (Mixtral
            # width, 1024-wide chunks: 0.617 -> 0.586 ms, H200)
            f0 = (n_chunks - 1 - i) * BLOCK_F
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a = act(g, u, SWIGLU, INTERP)
            _fwd_store(a_rows, hq_rows, f0 + cols, F, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE)
            if STATS:
                sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat = _fwd_stats(
                    sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE
                )
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)
    if STATS:  # once per program (kernels/fp8_stats.py)
        _fwd_flush(stats_ptr, sa_amax, sa_under, sa_sat, sh_amax, sh_under, sh_sat, M, F, SWIGLU, SAVE)


# 1x128: consecutive programs take consecutive 128-feature tiles of the same rows (16x128 tiles on
# 2 warps, against rows first on 4: Mixtral-8x7B width 0.531 -> 0.426 ms, H200, bench/NOTES.md).
_F_FIRST = True


def _fwd_config(F: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps), from sweeps on an H200 (bench/NOTES.md). 1x128: 16x128
    tiles. Rowwise: rows up to 8192 features in registers (one read), longer rows in 8192-wide
    chunks swept twice, 512 features a warp (against 1024-wide chunks on 4 warps: 0.617 -> 0.447
    ms at Mixtral-8x7B width, the same bytes out); a row held whole: 1024 features a warp, at
    least 2, one row a program; rows up to 512 features: several a program."""
    if block_k:
        return 16, block_k, 2
    block_f = min(triton.next_power_of_2(F), 8192)
    if block_f <= 512:
        return 2048 // block_f, block_f, 4
    if F <= block_f:
        return 1, block_f, max(2, block_f // 1024)
    return 1, block_f, block_f // 512


def triton_act_quant_fwd(
    h_MX: torch.Tensor, activation: str = "swiglu", block_k: int = 0, pow2_scale: bool = False, save_input: bool = True,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(a_q, a_scale, h_q, h_scale); see the module docstring."""
    F = check_act_quant_args(h_MX, activation, block_k)
    check_stats_arg(stats, h_MX, 2)
    if h_MX.stride(1) != 1:
        h_MX = h_MX.contiguous()
    M, X = h_MX.shape
    a_q, a_scale, h_q, h_scale = _fwd_outputs(h_MX, F, block_k, save_input)
    if M == 0:
        return a_q, a_scale, h_q, h_scale
    BLOCK_M, BLOCK_F, num_warps = _fwd_config(F, block_k)
    grid, f_first = tile_grid(triton.cdiv(M, BLOCK_M), F // block_k if block_k else 1, _F_FIRST and block_k > 0)
    _act_fwd_kernel[grid](
        h_MX, a_q, a_scale, h_q, h_scale, stats if stats is not None else a_scale,  # placeholder: STATS off
        M, F, h_MX.stride(0),
        SWIGLU=activation == "swiglu", BLOCK_K=block_k, POW2=pow2_scale, SAVE=save_input, STATS=stats is not None,
        INTERP=triton_interpret(), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, ONE_CHUNK=F <= BLOCK_F, F_FIRST=f_first,
        num_warps=num_warps, **LAUNCH_OPTIONS,
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


def _fake_act_quant_fwd(h_MX, activation="swiglu", block_k=0, pow2_scale=False, save_input=True, stats=None):
    return _fwd_outputs(h_MX, check_act_quant_args(h_MX, activation, block_k), block_k, save_input)


act_quant_fwd = kernel_op(
    "act_quant_fwd", triton_act_quant_fwd, _fake_act_quant_fwd, torch_act_quant_fwd, mutates_args=("stats",)
)
