"""Grouped column quantization: the fused multi pad-cast-transpose of the weight-gradient GEMMs.

x_MK holds tokens grouped by expert; group e is rows [group_end_E[e-1], group_end_E[e]) (sizes on
the device, any size including 0). The weight gradient of expert e reduces over its tokens, so
its FP8 operand is qt_KP: each group's rows transposed (tokens contiguous), quantized along the
tokens separately per group, each group starting at a multiple of `align` (any multiple of 16,
the least an FP8 TMA row start allows; both expert recipes use 128, the weight-gradient GEMM's
K step), zeros in the padding:

    quantize_cols_grouped(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M)
        -> GroupedColsFP8(qt_KP, scale, padded_end_E)
    quantize_rows_and_cols_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M, stats)
        -> RowsAndColsFP8(q_MK, row_scale, qt_KP, col_scale, padded_end_E)

P = round_up(M, align) + E * align is a host-side upper bound (no sync); columns past
padded_end_E[-1] are zero. The group offsets, their padded cumulative sums and the group of each
tile are computed inside the kernels (a cumsum over E lanes per program), so a call is one or two
launches and no small torch ops.

Passes (memory-bound; bytes per element of x: read 2, write 1 per output). A quantize-pass
program owns BLOCK_P padded token positions x BLOCK_K columns with BLOCK_P dividing align, so
its tile lies inside one group and the padding is just the rows its masked loads leave at zero.
- block 128 (blockwise recipe): one pass over HBM. BLOCK_P = 128 is one scale tile, held in
  registers: the column amax, then qt (sweeping it twice in slices, the second from L1/L2, is
  slower). Fused with the rows, it is two launches, this one and
  kernels/quantize.py's 1x128 rows: x is read twice, and that was 18-21% faster than one kernel
  doing both from one 128x128 tile (H200, bench/NOTES.md).
- block 0 (rowwise recipe): the scale of a column spans the whole group, so an amax pass (atomic
  max of fp32 bits as int32, relaxed) precedes the quantize pass: x is read twice. Fused, the
  amax pass also takes row amaxes, and the quantize pass writes both q and qt from one tile.
  Columns only, with groups of at most ~1024 rows on average: one kernel whose program owns a
  group's rows x 32 columns and sweeps them twice, the second time mostly from L2
  (`_group_strip_kernel`, 1.2-1.25x faster at Qwen3 and DeepSeek-V3 widths).
Rows past group_end_E[-1] belong to no group: they are left out of qt; in the fused op they are
still quantized into q, as the "tail" group E. The fused op's `stats` (kernels/fp8_stats.py) counts
q_MK's cast, all M rows (the forward operand), in the pass that writes q.

Shape letters (README.md): M rows (grouped by expert), K the row length (the reduction dim of the
forward GEMM reading q_MK), E experts, P padded rows (the weight-gradient GEMM's reduction dim).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, tile_grid, tl_fp8_inverse, tl_fp8_quantize_by, tl_fp8_scale, tl_tile_ids
from kernels.contracts import check_quantize_cols_grouped_args, check_quantize_rows_and_cols_grouped_args, padded_size
from kernels.dispatch import kernel_op
from kernels.fp8_stats import check_stats_arg, tl_fp8_stats_flush, tl_fp8_stats_tile, tl_fp8_stats_zero
from kernels.quantize import triton_quantize_rows
from kernels.reference import torch_quantize_cols_grouped, torch_quantize_rows_and_cols_grouped

# The tile kernels' loops run over a few chunks or groups, never a pipeline's worth: no software
# pipelining (the strip kernel's sweeps over a group's rows pipeline, `_STRIP_CONFIGS`).
_NUM_STAGES = 1


class GroupedColsFP8(NamedTuple):
    qt_KP: torch.Tensor  # fp8 (K, P)
    scale: torch.Tensor  # fp32 (K, E) rowwise, (K, P // 128) blockwise
    padded_end_E: torch.Tensor  # int32 (E,)


class RowsAndColsFP8(NamedTuple):
    q_MK: torch.Tensor  # fp8 (M, K), the forward operand
    row_scale: torch.Tensor  # fp32 (M,) or (M, K // 128)
    qt_KP: torch.Tensor
    col_scale: torch.Tensor
    padded_end_E: torch.Tensor


@triton.jit
def _group_bounds(ge_ptr, E, M, align, E_PAD: tl.constexpr):
    """Vectors over E_PAD lanes: start, end, padded start, padded end of each group. Lane E, when
    E_PAD > E, is the tail, rows [group_end[E-1], M) placed unpadded at padded_end[E-1]; lanes
    past E are empty."""
    e = tl.arange(0, E_PAD)
    end = tl.load(ge_ptr + e, mask=e < E, other=0).to(tl.int32)
    start = tl.load(ge_ptr + e - 1, mask=(e > 0) & (e <= E), other=0).to(tl.int32)
    end = tl.where(e == E, M, tl.where(e < E, end, start))
    size = end - start
    padded = tl.where(e < E, (size + align - 1) // align * align, tl.where(e == E, size, 0))
    pend = tl.cumsum(padded, 0)
    return start, end, pend - padded, pend


@triton.jit
def _lane(v, i, E_PAD: tl.constexpr):
    """v[i] as a scalar (i a run-time scalar)."""
    return tl.sum(tl.where(tl.arange(0, E_PAD) == i, v, 0), 0)


@triton.jit
def _amax_pass_kernel(
    x_ptr, idx_ptr, ge_ptr, col_amax_ptr, row_amax_ptr,
    M, K, stride_xm, E,
    HAS_IDX: tl.constexpr, ROW_AMAX: tl.constexpr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rowwise pass 1: col_amax[g, k] = max |x| over group g's rows (int32 bits, atomics);
    with ROW_AMAX also row_amax[m] = max over the row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    if HAS_IDX:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    x = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    ax = tl.abs(x.to(tl.float32))
    if ROW_AMAX:
        tl.atomic_max(row_amax_ptr + rows, tl.max(ax, axis=1).to(tl.int32, bitcast=True), mask=row_ok, sem="relaxed")
    start, end, pstart, pend = _group_bounds(ge_ptr, E, M, 1, E_PAD)
    e_ok = tl.arange(0, E_PAD) < E
    first = tl.program_id(0) * BLOCK_M
    last = tl.minimum(first + BLOCK_M, M) - 1
    g_lo = tl.sum((e_ok & (end <= first)).to(tl.int32), 0)
    g_hi = tl.minimum(tl.sum((e_ok & (end <= last)).to(tl.int32), 0), E - 1)
    for g in range(g_lo, g_hi + 1):
        in_g = (rows >= _lane(start, g, E_PAD)) & (rows < _lane(end, g, E_PAD))
        cmax = tl.max(tl.where(in_g[:, None], ax, 0.0), axis=0)
        tl.atomic_max(col_amax_ptr + g * K + cols, cmax.to(tl.int32, bitcast=True), mask=col_ok, sem="relaxed")


@triton.jit
def _gather_rows(x_ptr, idx_ptr, stride_xm, r, in_g, cols, col_ok, HAS_IDX: tl.constexpr, FP32: tl.constexpr = True):
    """Tile x[rows r (grouped order; x_MK[idx[r]] with HAS_IDX), cols], zeros outside in_g: fp32,
    or x's own dtype (FP32=False) for a tile held in registers (half the registers for bf16;
    |x| and max are exact in bf16, so amaxes taken on it are the fp32 ones)."""
    if HAS_IDX:
        src = tl.load(idx_ptr + r, mask=in_g, other=0).to(tl.int64)
    else:
        src = r.to(tl.int64)
    mask = in_g[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32) if FP32 else x


@triton.jit
def _cols_quant_kernel(
    x_ptr, idx_ptr, ge_ptr, col_amax_ptr, qt_ptr, cscale_ptr, pend_ptr,
    row_amax_ptr, q_ptr, rscale_ptr, stats_ptr,
    M, K, P, stride_xm, E, align,
    HAS_IDX: tl.constexpr, POW2: tl.constexpr, BLOCKWISE: tl.constexpr, ROWS: tl.constexpr, STATS: tl.constexpr,
    E_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    SUB_P: tl.constexpr, N_CHUNKS: tl.constexpr, ONE_SLICE: tl.constexpr, K_MAJOR: tl.constexpr,
):  # fmt: skip
    """Writes qt[k, p] for BLOCK_P padded token positions x BLOCK_K columns, zeros in padding.

    BLOCK_P divides align, so a tile lies in one group, in the tail (ROWS) or past every group:
    one scale vector per tile, and the padding is the rows the masked loads leave at zero.
    BLOCKWISE (BLOCK_P == 128): the column amax is this tile's, taken in a first sweep over
    SUB_P-row slices; the second sweep re-reads them (L1/L2) to quantize; ONE_SLICE (SUB_P ==
    BLOCK_P): the tile is loaded once and kept in registers for both, in bf16 (160 registers
    where fp32 took 254 at 128x64). Else (rowwise) the column scales come from col_amax (pass
    1), their inverses are taken before the tiles are loaded, and there is one sweep.
    ROWS (fused, rowwise only): also writes q[m, k] for the tile's rows, scaled by row_amax;
    STATS: counts that cast into stats_ptr, once at the program's end.
    K_MAJOR: consecutive programs take consecutive column blocks of the same tokens (grid
    (n_k, n_p)), so the programs resident together read whole lines of x's rows.
    """
    tl.static_assert(not (ROWS and BLOCKWISE), "fused blockwise is two launches")
    tl.static_assert(ROWS or not STATS, "stats count q's cast: the fused op's rows")
    pid_p, pid_k = tl_tile_ids(K_MAJOR)
    start, end, pstart, pend = _group_bounds(ge_ptr, E, M, align, E_PAD)
    lanes = tl.arange(0, E_PAD)
    if (pid_p == 0) & (pid_k == 0):
        tl.store(pend_ptr + lanes, pend, mask=lanes < E)
    # The group of this tile: group g_lo (g_lo == E: the tail with ROWS, or past every group).
    n_groups = E + ROWS
    first = pid_p * BLOCK_P
    g = tl.sum(((lanes < n_groups) & (pend <= first)).to(tl.int32), 0)
    ps = _lane(pstart, g, E_PAD)
    st = _lane(start, g, E_PAD)
    size = tl.where(g < n_groups, _lane(end, g, E_PAD) - st, 0)  # past every group: no rows
    if STATS:
        s_amax, s_under, s_sat = tl_fp8_stats_zero()
    for c in range(N_CHUNKS):  # N_CHUNKS column blocks share the group lookup above
        kb = pid_k * N_CHUNKS + c
        if kb * BLOCK_K < K:  # the last program's extra chunks have no columns
            cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            if not BLOCKWISE:
                if pid_p < E:  # program row e writes group e's column scales (P // BLOCK_P >= E)
                    amax = tl.load(col_amax_ptr + pid_p * K + cols, mask=col_ok, other=0).to(tl.float32, bitcast=True)
                    tl.store(cscale_ptr + cols * E + pid_p, tl_fp8_scale(amax, POW2), mask=col_ok)
            qt_cols = qt_ptr + cols.to(tl.int64)[None, :] * P
            if BLOCKWISE:  # sweep 1 over the 128 tokens: column amax
                if ONE_SLICE:  # the whole tile in registers: one load, no second sweep
                    pp = first + tl.arange(0, BLOCK_P)
                    in_g = (pp >= ps) & (pp < ps + size)
                    r = st + pp - ps
                    x_tile = _gather_rows(x_ptr, idx_ptr, stride_xm, r, in_g, cols, col_ok, HAS_IDX, FP32=False)
                    cmax = tl.max(tl.abs(x_tile), axis=0).to(tl.float32)
                else:
                    cmax = tl.zeros([BLOCK_K], dtype=tl.float32)
                    for i in range(0, BLOCK_P, SUB_P):
                        pp = first + i + tl.arange(0, SUB_P)
                        in_g = (pp >= ps) & (pp < ps + size)
                        r = st + pp - ps
                        x = _gather_rows(x_ptr, idx_ptr, stride_xm, r, in_g, cols, col_ok, HAS_IDX)
                        cmax = tl.maximum(cmax, tl.max(tl.abs(x), axis=0))
                cmax = tl.where(g < E, cmax, 0.0)  # past every group: scale 1, zeros
                cscale = tl_fp8_scale(cmax, POW2)
                tl.store(cscale_ptr + cols * (P // BLOCK_P) + pid_p, cscale, mask=col_ok)
            else:  # column scales from pass 1
                amax = tl.load(col_amax_ptr + tl.minimum(g, E - 1) * K + cols, mask=col_ok, other=0)
                cscale = tl_fp8_scale(amax.to(tl.float32, bitcast=True), POW2)
            cinv = tl_fp8_inverse(cscale[None, :])
            if ONE_SLICE:
                qt = tl_fp8_quantize_by(x_tile.to(tl.float32), cinv)
                tl.store(qt_cols + pp[:, None], qt, mask=col_ok[None, :])
            else:
                for i in range(0, BLOCK_P, SUB_P):  # BLOCKWISE: sweep 2, the same rows again (L1/L2)
                    pp = first + i + tl.arange(0, SUB_P)
                    in_g = (pp >= ps) & (pp < ps + size)
                    r = st + pp - ps
                    if ROWS:
                        ramax = tl.load(row_amax_ptr + r, mask=in_g, other=0).to(tl.float32, bitcast=True)
                        rscale = tl_fp8_scale(ramax, POW2)
                        if kb == 0:
                            tl.store(rscale_ptr + r, rscale, mask=in_g)
                        rinv = tl_fp8_inverse(rscale[:, None])
                    x = _gather_rows(x_ptr, idx_ptr, stride_xm, r, in_g, cols, col_ok, HAS_IDX)
                    if ROWS:
                        q_ptrs = q_ptr + r.to(tl.int64)[:, None] * K + cols[None, :]
                        tl.store(q_ptrs, tl_fp8_quantize_by(x, rinv), mask=in_g[:, None] & col_ok[None, :])
                        if STATS:
                            s_amax, s_under, s_sat = tl_fp8_stats_tile(s_amax, s_under, s_sat, x, rinv,
                                                                       in_g[:, None] & col_ok[None, :])  # fmt: skip
                        x = tl.where(g < E, x, 0.0)  # the tail's rows go to q only
                    tl.store(qt_cols + pp[:, None], tl_fp8_quantize_by(x, cinv), mask=col_ok[None, :])
    if STATS:  # once per program (kernels/fp8_stats.py)
        tl_fp8_stats_flush(stats_ptr, s_amax, s_under, s_sat, (pid_p == 0) & (pid_k == 0), M, K)


@triton.jit
def _group_strip_kernel(
    x_ptr, idx_ptr, ge_ptr, qt_ptr, cscale_ptr, pend_ptr,
    M, K, P, stride_xm, E, align, n_kb,
    HAS_IDX: tl.constexpr, POW2: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Rowwise, columns only, small groups: program (g, kb) owns group g's rows x BLOCK_K columns
    (g == E: the zero columns past every group). It sweeps its strip twice, the amax and then
    qt; the second sweep finds the strip in L2 where the two-pass op's quantize pass, launched
    after the whole amax pass, reads x from HBM again. Programs of one group's column blocks are
    consecutive, so those resident together read whole lines of its rows."""
    g = tl.program_id(0) // n_kb
    cols = (tl.program_id(0) % n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    start, end, pstart, pend = _group_bounds(ge_ptr, E, M, align, E_PAD)
    lanes = tl.arange(0, E_PAD)
    if tl.program_id(0) == 0:
        tl.store(pend_ptr + lanes, pend, mask=lanes < E)
    qt_cols = qt_ptr + cols.to(tl.int64)[None, :] * P
    i = tl.arange(0, BLOCK_M)
    if g < E:
        st = _lane(start, g, E_PAD)
        en = _lane(end, g, E_PAD)
        ps = _lane(pstart, g, E_PAD)
        padded = _lane(pend, g, E_PAD) - ps
        # Elementwise maxima in x's dtype (|x| and max are exact in it; half the registers of
        # fp32 for bf16), reduced over the rows once after the sweep.
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=x_ptr.dtype.element_ty)
        for m0 in tl.range(st, en, BLOCK_M, num_stages=STAGES):
            r = m0 + i
            x = _gather_rows(x_ptr, idx_ptr, stride_xm, r, r < en, cols, col_ok, HAS_IDX, FP32=False)
            acc = tl.maximum(acc, tl.abs(x)).to(acc.dtype)  # triton 3.6 takes the bf16 max in fp32
        amax = tl.max(acc, axis=0).to(tl.float32)
        cscale = tl_fp8_scale(amax, POW2)
        tl.store(cscale_ptr + cols * E + g, cscale, mask=col_ok)
        cinv = tl_fp8_inverse(cscale[None, :])
        for m0 in tl.range(0, padded, BLOCK_M, num_stages=STAGES):  # the padding rows load as zeros
            r = st + m0 + i
            x = _gather_rows(x_ptr, idx_ptr, stride_xm, r, r < en, cols, col_ok, HAS_IDX)
            tl.store(qt_cols + (ps + m0 + i)[:, None], tl_fp8_quantize_by(x, cinv),
                     mask=(m0 + i < padded)[:, None] & col_ok[None, :])  # fmt: skip
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_K], dtype=qt_ptr.dtype.element_ty)
        for p0 in range(_lane(pend, E - 1, E_PAD), P, BLOCK_M):
            tl.store(qt_cols + (p0 + i)[:, None], zero, mask=(p0 + i < P)[:, None] & col_ok[None, :])


# ((BLOCK_M, BLOCK_K, num_warps) of the amax pass, (BLOCK_P, BLOCK_K, SUB_P, N_CHUNKS, num_warps) of
# the quantize pass), by (blockwise, fused rows). A program does N_CHUNKS column blocks after one
# group lookup, sweeping BLOCK_P tokens in SUB_P-row slices. Rowwise: 128-token tiles, so that a qt
# store writes 128 contiguous bytes per column (16-token tiles wrote half a sector: cols-only 0.91
# -> 0.66 ms at Mixtral-8x7B K=28672, H200, commit 8ab448b); the amax pass on one warp for the fused
# op, two for columns only. Blockwise: the whole 128-token tile in registers (ONE_SLICE). Every
# sweep behind these: bench/NOTES.md.
_LAUNCH_CONFIGS = {
    (True, False): ((0, 0, 0), (128, 64, 128, 1, 2)),
    (False, False): ((64, 64, 2), (128, 128, 32, 1, 4)),
    (False, True): ((32, 64, 1), (128, 128, 32, 1, 4)),
}
# Grid order of the quantize pass (K_MAJOR, see `_cols_quant_kernel`), by (blockwise, fused rows).
_K_MAJOR = {(True, False): False, (False, False): False, (False, True): False}
# Rowwise columns only: `_group_strip_kernel` where the mean group (ceil(M / E), known on the host
# without a sync) has at most this many rows, with its (BLOCK_M, BLOCK_K, num_warps, num_stages);
# larger groups take the two passes (at 2048 rows a group the resident programs' strips outgrow
# the 50 MB L2). At 512 rows a group (Qwen3, K=2048) the strips took 0.228 -> 0.182 ms (H200,
# commit 9dd94cc, bitwise the same bytes; bench/NOTES.md).
_STRIP_CONFIGS = ((768, (64, 32, 2, 4)), (1024, (128, 32, 4, 4)))


def _strip_config(M: int, E: int) -> tuple[int, int, int, int] | None:
    """The strip kernel's launch shape for a mean group of ceil(M / E) rows, or None: two passes."""
    return next((cfg for max_rows, cfg in _STRIP_CONFIGS if triton.cdiv(M, E) <= max_rows), None)


def _grouped_launch_config(block: int, rows: bool, align: int):
    """The launch shapes for this call. BLOCK_P must divide align (a tile lies in one group):
    blockwise it is the 128-token scale tile; rowwise the configured height, lowered to the
    largest power of two dividing align (align is a multiple of 16), SUB_P with it."""
    amax_cfg, (BLOCK_P, BLOCK_K, SUB_P, N_CHUNKS, warps) = _LAUNCH_CONFIGS[(bool(block), rows)]
    if not block:
        BLOCK_P = math.gcd(align, BLOCK_P)
        SUB_P = min(SUB_P, BLOCK_P)
    return amax_cfg, (BLOCK_P, BLOCK_K, SUB_P, N_CHUNKS, warps)


def _launch_grouped(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int, block: int, pow2_scale: bool,
    row_index_M: torch.Tensor | None, rows: bool, stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Both entry points: `rows` adds the q_MK / row_scale outputs (fused forward-input quantization)
    and their cast's `stats`."""
    if x_MK.stride(1) != 1:
        x_MK = x_MK.contiguous()
    if rows and block:  # two launches (module docstring)
        q_MK, rscale = triton_quantize_rows(x_MK, block, pow2_scale, row_index_M, stats)
        return (q_MK, rscale, *_launch_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M, False))
    dev = x_MK.device
    M = x_MK.shape[0] if row_index_M is None else row_index_M.shape[0]
    K = x_MK.shape[1]
    E = group_end_E.shape[0]
    P = padded_size(M, E, align)
    qt_KP = torch.empty((K, P), dtype=FP8_DTYPE, device=dev)
    padded_end_E = torch.empty((E,), dtype=torch.int32, device=dev)
    strip = None if block or rows else _strip_config(M, E)
    # One zeroed int32 buffer for every atomic-max target: [col amax (E, K) | row amax (M)].
    n_col = 0 if block or strip else E * K
    n_row = M if rows else 0
    col_amax, row_amax = torch.zeros((n_col + n_row,), dtype=torch.int32, device=dev).split([n_col, n_row])
    cscale = torch.empty((K, P // block) if block else (K, E), dtype=torch.float32, device=dev)
    q_MK = torch.empty((M, K) if rows else (0,), dtype=FP8_DTYPE, device=dev)
    rscale = torch.empty((M,) if rows else (0,), dtype=torch.float32, device=dev)
    idx = row_index_M if row_index_M is not None else x_MK
    if strip:  # the strip kernel's lane E is the zero columns past every group
        BLOCK_M, BLOCK_K, warps, stages = strip
        n_kb = triton.cdiv(K, BLOCK_K)
        _group_strip_kernel[(n_kb * (E + 1),)](
            x_MK, idx, group_end_E, qt_KP, cscale, padded_end_E,
            M, K, P, x_MK.stride(0), E, align, n_kb,
            HAS_IDX=row_index_M is not None, POW2=pow2_scale,
            E_PAD=triton.next_power_of_2(E + 1), BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, STAGES=stages, num_warps=warps,
        )  # fmt: skip
    else:
        # Lanes of the in-kernel group lookup: the E groups, and lane E for the fused op's tail rows
        # only (at E = 128 the power of two above E + 1 doubled them: 0.204 -> 0.196 ms, H200).
        E_PAD = triton.next_power_of_2(max(1, E + rows))
        amax_cfg, quant_cfg = _grouped_launch_config(block, rows, align)
        (BLOCK_M, BLOCK_KA, warps_a), (BLOCK_P, BLOCK_K, SUB_P, N_CHUNKS, warps) = amax_cfg, quant_cfg
        assert align % BLOCK_P == 0 and BLOCK_P % SUB_P == 0
        if not block and M > 0:
            _amax_pass_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_KA))](
                x_MK, idx, group_end_E, col_amax, row_amax, M, K, x_MK.stride(0), E,
                HAS_IDX=row_index_M is not None, ROW_AMAX=rows,
                E_PAD=E_PAD, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_KA, num_warps=warps_a, num_stages=_NUM_STAGES,
            )  # fmt: skip
        n_p, n_k = triton.cdiv(P, BLOCK_P), triton.cdiv(K, BLOCK_K * N_CHUNKS)
        grid, k_major = tile_grid(n_p, n_k, _K_MAJOR[(bool(block), rows)])
        _cols_quant_kernel[grid](
            x_MK, idx, group_end_E, col_amax, qt_KP, cscale, padded_end_E,
            row_amax, q_MK, rscale, stats if stats is not None else rscale,  # a placeholder when STATS is off
            M, K, P, x_MK.stride(0), E, align,
            HAS_IDX=row_index_M is not None, POW2=pow2_scale, BLOCKWISE=bool(block), ROWS=rows,
            STATS=stats is not None,
            E_PAD=E_PAD, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K,
            SUB_P=SUB_P, N_CHUNKS=N_CHUNKS, ONE_SLICE=bool(block) and SUB_P == BLOCK_P, K_MAJOR=k_major,
            num_warps=warps, num_stages=_NUM_STAGES,
        )  # fmt: skip
    return (q_MK, rscale, qt_KP, cscale, padded_end_E) if rows else (qt_KP, cscale, padded_end_E)


def _grouped_outputs(x_MK, group_end_E, align, block, row_index_M, rows):
    M = x_MK.shape[0] if row_index_M is None else row_index_M.shape[0]
    K, E = x_MK.shape[1], group_end_E.shape[0]
    P = padded_size(M, E, align)
    f32 = torch.float32
    cols = (
        x_MK.new_empty((K, P), dtype=FP8_DTYPE),
        x_MK.new_empty((K, P // block) if block else (K, E), dtype=f32),
        x_MK.new_empty((E,), dtype=torch.int32),
    )
    if not rows:
        return cols
    rscale = x_MK.new_empty((M, K // block) if block else (M,), dtype=f32)
    return (x_MK.new_empty((M, K), dtype=FP8_DTYPE), rscale, *cols)


def triton_quantize_cols_grouped(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int = 16, block_m: int = 0, pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """FP8 operand of the weight-gradient GEMM; see the module docstring for the layout."""
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block_m)
    return _launch_grouped(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M, rows=False)


def triton_quantize_rows_and_cols_grouped(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int = 16, block: int = 0, pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None, stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """quantize_rows(block_k=block) and quantize_cols_grouped(block_m=block) of the same x in one
    call: for block=128 the two kernels one after the other (faster than one kernel holding a
    128x128 tile, see the module docstring), for block=0 fused into an amax pass and one
    quantize pass (two reads of x instead of three). stats: q_MK's cast statistics."""
    check_quantize_rows_and_cols_grouped_args(x_MK, group_end_E, align, block)
    check_stats_arg(stats, x_MK, 1)
    return _launch_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M, rows=True, stats=stats)


def _fake_cols_grouped(x_MK, group_end_E, align=16, block_m=0, pow2_scale=False, row_index_M=None):
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block_m)
    return _grouped_outputs(x_MK, group_end_E, align, block_m, row_index_M, rows=False)


def _fake_rows_and_cols_grouped(x_MK, group_end_E, align=16, block=0, pow2_scale=False, row_index_M=None,
                                stats=None):  # fmt: skip
    check_quantize_rows_and_cols_grouped_args(x_MK, group_end_E, align, block)
    return _grouped_outputs(x_MK, group_end_E, align, block, row_index_M, rows=True)


quantize_cols_grouped = kernel_op(
    "quantize_cols_grouped", triton_quantize_cols_grouped, _fake_cols_grouped, torch_quantize_cols_grouped,
    result=lambda out: GroupedColsFP8(*out),
)  # fmt: skip
quantize_rows_and_cols_grouped = kernel_op(
    "quantize_rows_and_cols_grouped", triton_quantize_rows_and_cols_grouped, _fake_rows_and_cols_grouped,
    torch_quantize_rows_and_cols_grouped, result=lambda out: RowsAndColsFP8(*out), mutates_args=("stats",),
)  # fmt: skip
