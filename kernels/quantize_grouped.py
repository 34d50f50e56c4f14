"""Grouped column quantization: the fused multi pad-cast-transpose of the weight-gradient GEMMs.

x_MK holds tokens grouped by expert; group e is rows [group_end_E[e-1], group_end_E[e]) (sizes on
the device, any size including 0). The weight gradient of expert e reduces over its tokens, so
its FP8 operand is qt_KP: each group's rows transposed (tokens contiguous), quantized along the
tokens separately per group, each group starting at a multiple of `align` (16 for
torch._scaled_grouped_mm, 128 for blockwise), zeros in the padding:

    quantize_cols_grouped(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M, return_amax)
        -> GroupedColsFP8(qt_KP, scale, padded_end_E, amax_E)
    quantize_rows_and_cols_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M,
                                   return_amax)
        -> RowsAndColsFP8(q_MK, row_scale, qt_KP, col_scale, padded_end_E, amax_E)

P = round_up(M, align) + E * align is a host-side upper bound (no sync); columns past
padded_end_E[-1] are zero. The group offsets, their padded cumulative sums and the group of each
tile are computed inside the kernels (a cumsum over E lanes per program), so a call is one or two
launches and no small torch ops.

Passes (memory-bound; bytes per element of x: read 2, write 1 per output):
- block 128 (blockwise recipe): one pass. A program owns 128 padded token positions (one tile of
  one group, because groups start at multiples of 128) x BLOCK_K columns: it reads the tile once
  and writes qt (and, fused, q with 1x128 row tiles from the same registers).
- block 0 (rowwise recipe): the scale of a column spans the whole group, so an amax pass (atomic
  max of fp32 bits, int32, relaxed) precedes the quantize pass: x is read twice. Fused, the first
  pass also takes row amaxes, and the second writes both q and qt from one tile.
Rows past group_end_E[-1] belong to no group: they are left out of qt; in the fused op they are
still quantized into q, as the "tail" group E.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, tl_fp8_quantize, tl_fp8_scale, use_triton
from kernels.reference import (
    check_quantize_cols_grouped_args,
    check_quantize_rows_args,
    padded_size,
    torch_quantize_cols_grouped,
    torch_quantize_rows_and_cols_grouped,
)


class GroupedColsFP8(NamedTuple):
    qt_KP: torch.Tensor  # fp8 (K, P)
    scale: torch.Tensor  # fp32 (K, E) rowwise, (K, P // 128) blockwise
    padded_end_E: torch.Tensor  # int32 (E,)
    amax_E: torch.Tensor | None  # fp32 (E,) when asked for


class RowsAndColsFP8(NamedTuple):
    q_MK: torch.Tensor  # fp8 (M, K), the forward operand
    row_scale: torch.Tensor  # fp32 (M,) or (M, K // 128)
    qt_KP: torch.Tensor
    col_scale: torch.Tensor
    padded_end_E: torch.Tensor
    amax_E: torch.Tensor | None


@triton.jit
def _group_bounds(ge_ptr, E, M, align, E_PAD: tl.constexpr):
    """Vectors over E_PAD lanes: start, end, padded start, padded end of each group. Lane E is
    the tail, rows [group_end[E-1], M) placed unpadded at padded_end[E-1]; lanes past E are empty."""
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
def _cols_quant_kernel(
    x_ptr, idx_ptr, ge_ptr, col_amax_ptr, gamax_ptr, qt_ptr, cscale_ptr, pend_ptr,
    row_amax_ptr, q_ptr, rscale_ptr,
    M, K, P, stride_xm, E, align,
    HAS_IDX: tl.constexpr, POW2: tl.constexpr, BLOCKWISE: tl.constexpr, ROWS: tl.constexpr,
    RETURN_AMAX: tl.constexpr, E_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Writes qt[k, p] for BLOCK_P padded token positions x BLOCK_K columns (zeros in padding).

    BLOCKWISE: BLOCK_P == 128 and align % 128 == 0, so the tile lies in one group; its column
    amax is taken here. Else the column scales come from col_amax (pass 1).
    ROWS (fused): also writes q[m, k] for the tile's rows, scaled by row_amax (rowwise) or by
    the tile's own 1x128 row amax (BLOCKWISE, BLOCK_K == 128).
    """
    pid_p = tl.program_id(0)
    pid_k = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    start, end, pstart, pend = _group_bounds(ge_ptr, E, M, align, E_PAD)
    lanes = tl.arange(0, E_PAD)
    if (pid_p == 0) & (pid_k == 0):
        tl.store(pend_ptr + lanes, pend, mask=lanes < E)
    if not BLOCKWISE:
        if pid_p == 0:  # column scales of every group for this column block (and group amax)
            ek_ok = (lanes[None, :] < E) & col_ok[:, None]
            amax_KE = tl.load(col_amax_ptr + lanes[None, :] * K + cols[:, None], mask=ek_ok, other=0)
            amax_KE = amax_KE.to(tl.float32, bitcast=True)
            tl.store(cscale_ptr + cols[:, None] * E + lanes[None, :], tl_fp8_scale(amax_KE, POW2), mask=ek_ok)
            if RETURN_AMAX:
                gmax = tl.max(amax_KE, axis=0).to(tl.int32, bitcast=True)
                tl.atomic_max(gamax_ptr + lanes, gmax, mask=lanes < E, sem="relaxed")
    # Groups (lane E = tail, only with ROWS) whose padded range meets this tile.
    n_groups = E + ROWS
    first = pid_p * BLOCK_P
    g_lo = tl.sum(((lanes < n_groups) & (pend <= first)).to(tl.int32), 0)
    g_hi = tl.minimum(tl.sum(((lanes < n_groups) & (pend <= first + BLOCK_P - 1)).to(tl.int32), 0), n_groups - 1)
    qt_val = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    cscale = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    for g in range(g_lo, g_hi + 1):
        ps = _lane(pstart, g, E_PAD)
        st = _lane(start, g, E_PAD)
        in_g = (p >= ps) & (p < ps + _lane(end, g, E_PAD) - st)
        r = st + p - ps  # row in grouped order
        if HAS_IDX:
            src = tl.load(idx_ptr + r, mask=in_g, other=0).to(tl.int64)
        else:
            src = r.to(tl.int64)
        mask = in_g[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if g < E:
            if BLOCKWISE:
                tile_amax = tl.max(tl.abs(x), axis=0)
                cscale = tl_fp8_scale(tile_amax, POW2)
                if RETURN_AMAX:
                    tl.atomic_max(gamax_ptr + g, tl.max(tile_amax, 0).to(tl.int32, bitcast=True), sem="relaxed")
            else:
                amax = tl.load(col_amax_ptr + g * K + cols, mask=col_ok, other=0).to(tl.float32, bitcast=True)
                cscale = tl_fp8_scale(amax, POW2)
            q = tl.math.div_rn(x, cscale[None, :])
            qt_val = tl.where(in_g[:, None], tl.minimum(tl.maximum(q, -448.0), 448.0), qt_val)
        if ROWS:
            if BLOCKWISE:
                rscale = tl_fp8_scale(tl.max(tl.abs(x), axis=1), POW2)
                tl.store(rscale_ptr + r * (K // BLOCK_K) + pid_k, rscale, mask=in_g)
            else:
                ramax = tl.load(row_amax_ptr + r, mask=in_g, other=0).to(tl.float32, bitcast=True)
                rscale = tl_fp8_scale(ramax, POW2)
                if pid_k == 0:
                    tl.store(rscale_ptr + r, rscale, mask=in_g)
            q_ptrs = q_ptr + r.to(tl.int64)[:, None] * K + cols[None, :]
            tl.store(q_ptrs, tl_fp8_quantize(x, rscale[:, None]), mask=mask)
    qt_ptrs = qt_ptr + cols.to(tl.int64)[None, :] * P + p[:, None]
    tl.store(qt_ptrs, qt_val.to(tl.float8e4nv), mask=(p < P)[:, None] & col_ok[None, :])
    if BLOCKWISE:
        tl.store(cscale_ptr + cols * (P // BLOCK_P) + pid_p, cscale, mask=col_ok)


def _grouped_launch_config(block: int, rows: bool):
    """((BLOCK_M, BLOCK_K, num_warps) of the amax pass, (BLOCK_P, BLOCK_K, num_warps) of the
    quantize pass). Blockwise tiles are 128 tokens (one scale tile) by 128 columns (fused: the
    1x128 row tile)."""
    if block:
        return (0, 0, 0), (128, 128, 8)
    return (64, 128, 4), (64, 128, 8)


def _grouped_impl(x_MK, group_end_E, align, block, pow2_scale, row_index_M, return_amax, rows):
    """Both ops: `rows` adds the q_MK / row_scale outputs (fused forward-input quantization)."""
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block)
    if rows:
        check_quantize_rows_args(x_MK, block)
    if x_MK.stride(1) != 1:
        x_MK = x_MK.contiguous()
    dev = x_MK.device
    M = x_MK.shape[0] if row_index_M is None else row_index_M.shape[0]
    K = x_MK.shape[1]
    E = group_end_E.shape[0]
    P = padded_size(M, E, align)
    qt_KP = torch.empty((K, P), dtype=FP8_DTYPE, device=dev)
    padded_end_E = torch.empty((E,), dtype=torch.int32, device=dev)
    # One zeroed int32 buffer for every atomic-max target: [amax (E) | col amax (E, K) | row amax (M)].
    n_col = 0 if block else E * K
    n_row = M if rows and not block else 0
    n_amax = E if return_amax else 0
    amax_buf = torch.zeros((n_amax + n_col + n_row,), dtype=torch.int32, device=dev)
    gamax, col_amax, row_amax = amax_buf.split([n_amax, n_col, n_row])
    cscale = torch.empty((K, P // block) if block else (K, E), dtype=torch.float32, device=dev)
    q_MK = torch.empty((M, K) if rows else (0,), dtype=FP8_DTYPE, device=dev)
    rscale = torch.empty(((M, K // block) if block else (M,)) if rows else (0,), dtype=torch.float32, device=dev)
    idx = row_index_M if row_index_M is not None else x_MK
    E_PAD = triton.next_power_of_2(E + 1)
    (BLOCK_M, BLOCK_KA, warps_a), (BLOCK_P, BLOCK_K, warps) = _grouped_launch_config(block, rows)
    if not block and M > 0:
        _amax_pass_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_KA))](
            x_MK, idx, group_end_E, col_amax, row_amax, M, K, x_MK.stride(0), E,
            HAS_IDX=row_index_M is not None, ROW_AMAX=rows,
            E_PAD=E_PAD, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_KA, num_warps=warps_a,
        )  # fmt: skip
    _cols_quant_kernel[(triton.cdiv(P, BLOCK_P), triton.cdiv(K, BLOCK_K))](
        x_MK, idx, group_end_E, col_amax, gamax, qt_KP, cscale, padded_end_E,
        row_amax, q_MK, rscale,
        M, K, P, x_MK.stride(0), E, align,
        HAS_IDX=row_index_M is not None, POW2=pow2_scale, BLOCKWISE=bool(block), ROWS=rows,
        RETURN_AMAX=return_amax, E_PAD=E_PAD, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, num_warps=warps,
    )  # fmt: skip
    amax_E = gamax.view(torch.float32) if return_amax else amax_buf.new_empty((0,), dtype=torch.float32)
    cols = (qt_KP, cscale, padded_end_E, amax_E)
    return (q_MK, rscale, *cols) if rows else cols


def _fake_grouped(x_MK, group_end_E, align, block, row_index_M, return_amax, rows):
    M = x_MK.shape[0] if row_index_M is None else row_index_M.shape[0]
    K = x_MK.shape[1]
    E = group_end_E.shape[0]
    P = padded_size(M, E, align)
    f32 = torch.float32
    cols = (
        x_MK.new_empty((K, P), dtype=FP8_DTYPE),
        x_MK.new_empty((K, P // block) if block else (K, E), dtype=f32),
        x_MK.new_empty((E,), dtype=torch.int32),
        x_MK.new_empty((E,) if return_amax else (0,), dtype=f32),
    )
    if not rows:
        return cols
    rscale = x_MK.new_empty((M, K // block) if block else (M,), dtype=f32)
    return (x_MK.new_empty((M, K), dtype=FP8_DTYPE), rscale, *cols)


def _quantize_cols_grouped_impl(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int,
    block_m: int,
    pow2_scale: bool,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grouped_impl(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M, return_amax, rows=False)


def _quantize_rows_and_cols_grouped_impl(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int,
    block: int,
    pow2_scale: bool,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grouped_impl(x_MK, group_end_E, align, block, pow2_scale, row_index_M, return_amax, rows=True)


triton_quantize_cols_grouped = torch.library.custom_op("fp8moe::quantize_cols_grouped", mutates_args=())(
    _quantize_cols_grouped_impl
)
triton_quantize_rows_and_cols_grouped = torch.library.custom_op(
    "fp8moe::quantize_rows_and_cols_grouped", mutates_args=()
)(_quantize_rows_and_cols_grouped_impl)


@triton_quantize_cols_grouped.register_fake
def _(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M=None, return_amax=False):
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block_m)
    return _fake_grouped(x_MK, group_end_E, align, block_m, row_index_M, return_amax, rows=False)


@triton_quantize_rows_and_cols_grouped.register_fake
def _(x_MK, group_end_E, align, block, pow2_scale, row_index_M=None, return_amax=False):
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block)
    check_quantize_rows_args(x_MK, block)
    return _fake_grouped(x_MK, group_end_E, align, block, row_index_M, return_amax, rows=True)


def _pick(x_MK, impl, op, ref):
    """Reference off the GPU/interpreter; the custom op while torch.compile traces (it costs
    ~15 us of host time per eager call); else the launcher itself."""
    if not use_triton(x_MK):
        return ref
    return op if torch.compiler.is_compiling() else impl


def quantize_cols_grouped(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int = 16,
    block_m: int = 0,
    pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> GroupedColsFP8:
    """FP8 operand of the weight-gradient GEMM; see the module docstring for the layout."""
    fn = _pick(x_MK, _quantize_cols_grouped_impl, triton_quantize_cols_grouped, torch_quantize_cols_grouped)
    qt_KP, scale, padded_end_E, amax_E = fn(x_MK, group_end_E, align, block_m, pow2_scale, row_index_M, return_amax)
    return GroupedColsFP8(qt_KP, scale, padded_end_E, amax_E if return_amax else None)


def quantize_rows_and_cols_grouped(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int = 16,
    block: int = 0,
    pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> RowsAndColsFP8:
    """quantize_rows(block_k=block) and quantize_cols_grouped(block_m=block) of the same x, fused:
    one read of x for block=128, two for block=0 (instead of three)."""
    fn = _pick(
        x_MK,
        _quantize_rows_and_cols_grouped_impl,
        triton_quantize_rows_and_cols_grouped,
        torch_quantize_rows_and_cols_grouped,
    )
    out = fn(x_MK, group_end_E, align, block, pow2_scale, row_index_M, return_amax)
    return RowsAndColsFP8(*out[:5], out[5] if return_amax else None)
