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

Forward here, backward in kernels/act_quant_bwd.py, shared fp32 math in kernels/act_math.py.
Numerics: hardware exp2 / reciprocal with FMA contraction. The fp32 activations are within
(2|g| + 11) u (SwiGLU) and (1.5 x^2 + 18) u (GELU) of exact, u = 2^-24 relative
(kernels/act_math.py), and the outputs agree with kernels/reference.py (fp32 polynomials, GELU
the exact-erf form) to one E4M3 step per value, with at most 7.8e-5 of the values differing in
the GPU tests (H200; 3.1e-5 in the interpreter); the scales follow kernels/common.py's rule on
amaxes that differ only by those fp32 errors. tests/test_kernels_act_quant.py states and checks
the contract.

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

Speed, in sm_90 SASS instructions per element (compiled on CPU by Triton 3.9's ptxas; a SwiGLU
element covers gate and up; loops counted by their trip counts), before -> now:
    forward  1x128                          SwiGLU  80 -> 25      GELU  98 -> 29
    forward  rowwise, rows <= 1024                  83 -> 26           101 -> 30
    forward  rowwise, longer rows (two sweeps)     128 -> 38           169 -> 49
    backward blockwise (two sweeps)                242 -> 79           241 -> 79
    backward rowwise (two passes, E = 8)           282 -> 138 -> 87    281 -> 129
(87: the amax pass in 16-row chunks, 32 per element where its 128x32 tile took 52, + the quantize
pass's 55; see kernels/act_quant_bwd.py's launch notes.)
Measured before, on H200 as a fraction of the 4.3 TB/s copy (bytes counted once): forward 1x128
0.52-0.54 for SwiGLU and 0.27 for GELU, rowwise 0.35-0.37 and 0.15; backward rowwise 0.12-0.16,
blockwise 0.08-0.10 (M=16384 F=14336, M=65536 F=768, M=32768 F=6400 GELU). Now (commit f8a3c4e,
bench/results/kernels.json): forward rowwise 0.64-0.96, 1x128 0.79-0.91 (0.64-0.75 before the
feature-first grid, `_F_FIRST`); backward rowwise 0.33-0.39, blockwise 0.30-0.35.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.act_math import _LAUNCH, _act, _inv_scale, _quant
from kernels.common import FP8_DTYPE, tile_grid, tl_fp8_scale, tl_tile_ids, triton_interpret, use_triton
from kernels.reference import check_act_quant_args, torch_act_quant_fwd


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
def _fwd_store(a_rows, hq_rows, f, F, mask, a, g, u, a_inv, h_inv, SWIGLU: tl.constexpr, SAVE: tl.constexpr,
               INTERP: tl.constexpr):  # fmt: skip
    """Quantized a (and g, u) of one chunk, given the inverse row scales."""
    tl.store(a_rows[:, None] + f[None, :], _quant(a, a_inv[:, None], INTERP), mask=mask)
    if SAVE:
        tl.store(hq_rows[:, None] + f[None, :], _quant(g, h_inv[:, None], INTERP), mask=mask)
        if SWIGLU:
            tl.store(hq_rows[:, None] + F + f[None, :], _quant(u, h_inv[:, None], INTERP), mask=mask)


@triton.jit
def _act_fwd_kernel(
    h_ptr, a_ptr, a_scale_ptr, hq_ptr, h_scale_ptr,
    M, F, stride_h,
    SWIGLU: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr, SAVE: tl.constexpr,
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
        a = _act(g, u, SWIGLU, INTERP)
        a_scale = tl_fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        tl.store(a_scale_ptr + rows * (F // BLOCK_K) + fb, a_scale, mask=row_ok)
        a_inv = _inv_scale(a_scale, INTERP)[:, None]
        tl.store(a_rows[:, None] + f[None, :], _quant(a, a_inv, INTERP), mask=mask)
        if SAVE:
            g_scale = tl_fp8_scale(tl.max(tl.abs(g), axis=1), POW2)
            tl.store(h_scale_ptr + rows * (X // BLOCK_K) + fb, g_scale, mask=row_ok)
            tl.store(hq_rows[:, None] + f[None, :], _quant(g, _inv_scale(g_scale, INTERP)[:, None], INTERP), mask=mask)
            if SWIGLU:
                u_scale = tl_fp8_scale(tl.max(tl.abs(u), axis=1), POW2)
                tl.store(h_scale_ptr + rows * (X // BLOCK_K) + F // BLOCK_K + fb, u_scale, mask=row_ok)
                u_inv = _inv_scale(u_scale, INTERP)[:, None]
                tl.store(hq_rows[:, None] + F + f[None, :], _quant(u, u_inv, INTERP), mask=mask)
    elif ONE_CHUNK:  # the whole row in registers: one read
        g, u, mask = _fwd_load(h_rows, row_ok, cols, F, SWIGLU)
        a = _act(g, u, SWIGLU, INTERP)
        a_scale = tl_fp8_scale(tl.max(tl.abs(a), axis=1), POW2)
        h_scale = tl_fp8_scale(tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)), POW2)
        a_inv, h_inv = _inv_scale(a_scale, INTERP), _inv_scale(h_scale, INTERP)
        _fwd_store(a_rows, hq_rows, cols, F, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE, INTERP)
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)
    else:  # long rows: amax sweep, then a quantize sweep that re-reads the row from L2
        a_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        h_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a_amax = tl.maximum(a_amax, tl.max(tl.abs(_act(g, u, SWIGLU, INTERP)), axis=1))
            h_amax = tl.maximum(h_amax, tl.maximum(tl.max(tl.abs(g), axis=1), tl.max(tl.abs(u), axis=1)))
        a_scale = tl_fp8_scale(a_amax, POW2)
        h_scale = tl_fp8_scale(h_amax, POW2)
        a_inv, h_inv = _inv_scale(a_scale, INTERP), _inv_scale(h_scale, INTERP)
        n_chunks = tl.cdiv(F, BLOCK_F)
        for i in range(0, n_chunks):
            # last chunk first: the amax sweep read it last, so it is the likeliest in L2 (Mixtral
            # width, 1024-wide chunks: 0.617 -> 0.586 ms, H200)
            f0 = (n_chunks - 1 - i) * BLOCK_F
            g, u, mask = _fwd_load(h_rows, row_ok, f0 + cols, F, SWIGLU)
            a = _act(g, u, SWIGLU, INTERP)
            _fwd_store(a_rows, hq_rows, f0 + cols, F, mask, a, g, u, a_inv, h_inv, SWIGLU, SAVE, INTERP)
        tl.store(a_scale_ptr + rows, a_scale, mask=row_ok)
        if SAVE:
            tl.store(h_scale_ptr + rows, h_scale, mask=row_ok)


# 1x128: consecutive programs take consecutive 128-feature tiles of the same rows (H200, session
# 7, 16x128 tiles on 2 warps, against rows first on 4 warps: seed 0.306 -> 0.252 ms, Mixtral-8x7B
# width 0.531 -> 0.426, DeepSeek-V3 0.155 -> 0.126, Qwen3 0.111 -> 0.094; 8 rows tied, 32 slower).
_F_FIRST = True


def _fwd_config(F: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_F, num_warps). 1x128: 16x128 tiles beat 8, 32, 64 and 128 rows (H200, M=16384
    F=14336 / M=32768 F=6400 / M=65536 F=768). Rowwise: rows up to 8192 features in registers
    (one read), longer rows in 8192-wide chunks swept twice, 512 features a warp: against
    1024-wide chunks with 4 warps (H200, the same bytes out): Mixtral-8x7B width
    (F=14336, two chunks) 0.617 -> 0.447 ms, seed (GELU F=6400, one chunk) 0.426 -> 0.351,
    DeepSeek-V3 (F=2048, one chunk, 4 warps) 0.127 -> 0.116. 8192-wide chunks with 32 warps and
    2048-4096-wide ones with 8-16 warps were slower: with 1024-wide chunks ~16 rows share an SM,
    and their 57 KB rows (Mixtral) outgrow the 50 MB L2 before the second sweep re-reads them.
    A row held whole: 1024 features a warp, at least 2, one row a program (H200, session 7,
    against 512 a warp): seed 0.356 -> 0.309 ms (8 warps; 4 and 16 slower), Qwen3 (F=768, 2
    warps, was 2 rows on 4) 0.098 -> 0.091, DeepSeek-V3 0.115 either way. Rows up to 512
    features: several a program, as before (not measured again)."""
    if block_k:
        return 16, block_k, 2
    block_f = min(triton.next_power_of_2(F), 8192)
    if block_f <= 512:
        return 2048 // block_f, block_f, 4
    if F <= block_f:
        return 1, block_f, max(2, block_f // 1024)
    return 1, block_f, block_f // 512


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
    grid, f_first = tile_grid(triton.cdiv(M, BLOCK_M), F // block_k if block_k else 1, _F_FIRST and block_k > 0)
    _act_fwd_kernel[grid](
        h_MX, a_q, a_scale, h_q, h_scale,
        M, F, h_MX.stride(0),
        SWIGLU=activation == "swiglu", BLOCK_K=block_k, POW2=pow2_scale, SAVE=save_input,
        INTERP=triton_interpret(), BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, ONE_CHUNK=F <= BLOCK_F, F_FIRST=f_first,
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
