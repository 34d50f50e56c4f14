"""Backward of the fused activation: act'(h) * da quantized in the three layouts the dgrad and
wgrad GEMMs read, plus the recomputed activation for wgrad2 (see kernels/act_quant.py's
docstring for the layouts and the passes over memory).

Shape letters (README.md): M routed rows (grouped by expert), F expert FFN hidden size, X = 2F
(SwiGLU) or F (GELU) columns of h, E experts, P padded rows (the transposed copies' columns).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.act_math import LAUNCH_OPTIONS, act_bwd, inv_scale
from kernels.common import FP8_DTYPE, tile_grid, tl_fp8_quantize_by, tl_fp8_scale, tl_tile_ids, triton_interpret
from kernels.contracts import check_act_quant_bwd_args, padded_size
from kernels.dispatch import kernel_op
from kernels.reference_act import torch_act_quant_bwd


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
def _group_of(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS: tl.constexpr):
    """For padded token positions p: (group id, the group's first padded position, first row,
    end row). Group id = number of padded ends <= p, by binary search; E past every group, whose
    positions map to the rows past group_end_E[-1] (P leaves room for them)."""
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
    return gid, p_start, r_start, r_end


@triton.jit
def _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS: tl.constexpr):
    """For padded token positions p: (source row, in a group, is a row at all, group id). Rows
    past every group get a zero dh row."""
    gid, p_start, r_start, r_end = _group_of(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
    row = r_start + (p - p_start)
    is_row = row < r_end
    return row, is_row & (gid < E), is_row, gid


@triton.jit
def _token_map_kernel(group_end_ptr, padded_end_ptr, map_ptr, M, E, P, SEARCH_STEPS: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    """Rowwise recipe: each padded token position's source row (-1: padding) and group (E: past
    every group), which both passes load instead of searching per tile: the search took 8-14
    instructions per element and pass at E = 8, 15-27 at E = 128 (sm_90 SASS)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row, in_group, is_row, gid = _padded_tokens(p, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
    tl.store(map_ptr + p, tl.where(is_row, row, -1), mask=p < P)
    tl.store(map_ptr + P + p, gid, mask=p < P)


@triton.jit
def _mapped_tokens(p, map_ptr, E, P):
    """`_padded_tokens` from the map of `_token_map_kernel`."""
    row = tl.load(map_ptr + p, mask=p < P, other=-1)
    gid = tl.load(map_ptr + P + p, mask=p < P, other=E)
    is_row = row >= 0
    return row, is_row & (gid < E), is_row, gid


@triton.jit
def _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, fb, F, stride_da, stride_h,
                SWIGLU: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """fp32 (d gate, d up, a) at (row, f); zero where the row is in no group or f >= F (every
    load there gives 0, and the activations of 0 are finite, so no `where` is needed)."""
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
    return act_bwd(da, g, u, SWIGLU, INTERP)


@triton.jit
def _tile_chunk(da_ptr, h_ptr, hs_ptr, p, gid, p_start, r_start, r_end, E, f, f_ok, fb, F, stride_da, stride_h,
                SWIGLU: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """Blockwise sweeps: (row, is a row, d gate, d up, a) for padded positions p of one group."""
    row = r_start + (p - p_start)
    is_row = row < r_end
    dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, is_row & (gid < E), f, f_ok, fb, F, stride_da, stride_h,
                            SWIGLU, BLOCK, INTERP)  # fmt: skip
    return row, is_row, dg, du, a


@triton.jit
def _amax_flush(dg_acc, du_acc, a_acc, grp, dht_amax_ptr, at_amax_ptr, f, f_ok, F, E, SWIGLU: tl.constexpr):
    """Column maxima of group grp's accumulated chunks -> atomics (none past every group)."""
    X = 2 * F if SWIGLU else F
    ok = f_ok & (tl.zeros_like(f) + grp < E)  # a vector mask: the interpreter refuses scalar & vector
    # Relaxed: max commutes, and the next kernel (stream order) reads the result. The default
    # acq_rel ordering puts a MEMBAR.ALL.GPU before every atomic (sm_90 SASS).
    tl.atomic_max(dht_amax_ptr + grp * X + f, tl.max(dg_acc, axis=0).to(tl.int32, bitcast=True), mask=ok,
                  sem="relaxed")  # fmt: skip
    if SWIGLU:
        tl.atomic_max(dht_amax_ptr + grp * X + F + f, tl.max(du_acc, axis=0).to(tl.int32, bitcast=True), mask=ok,
                      sem="relaxed")  # fmt: skip
    tl.atomic_max(at_amax_ptr + grp * F + f, tl.max(a_acc, axis=0).to(tl.int32, bitcast=True), mask=ok, sem="relaxed")


@triton.jit
def _act_bwd_amax_kernel(
    da_ptr, h_ptr, hs_ptr, map_ptr, row_amax_ptr, dht_amax_ptr, at_amax_ptr,
    F, E, P, stride_da, stride_h,
    SWIGLU: tl.constexpr, INTERP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
    CHUNK: tl.constexpr, F_MAJOR: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Rowwise recipe, pass 1: atomic max (on int32 views of non-negative fp32) of |dh| per row
    and of |dh|, |a| per (group, feature) into zeroed workspaces laid out (E, X) and (E, F), so
    that a warp's atomics (and the quantize pass's loads of the inverses) are contiguous along
    features.

    The program sweeps BLOCK_P padded token positions in chunks of CHUNK rows. CHUNK divides
    align, so a chunk lies in one group (or past every group): the column maxima are kept
    elementwise across the chunks of a group and reduced over tokens once per group run, where
    a reduction per 128-row tile was 12 of the 52 sm_90 instructions per element.
    """
    pid_p, pid_f = tl_tile_ids(F_MAJOR)  # F_MAJOR: feature tiles of the same tokens in a row
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    p0 = pid_p * BLOCK_P
    grp = tl.load(map_ptr + P + p0)  # the group of the first chunk (E: past every group)
    dg_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
    du_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
    a_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
    for c in tl.range(0, BLOCK_P, CHUNK, num_stages=STAGES):
        # a chunk past P (the last program) has no rows: any group will do, P - 1's is at hand
        g_c = tl.load(map_ptr + P + tl.minimum(p0 + c, P - 1))
        if g_c != grp:
            _amax_flush(dg_acc, du_acc, a_acc, grp, dht_amax_ptr, at_amax_ptr, f, f_ok, F, E, SWIGLU)
            dg_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
            du_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
            a_acc = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
            grp = g_c
        p = p0 + c + tl.arange(0, CHUNK)
        row, in_group, is_row, gid = _mapped_tokens(p, map_ptr, E, P)
        dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, 0, F, stride_da, stride_h, SWIGLU, 0,
                                INTERP)  # fmt: skip
        dg, du, a = tl.abs(dg), tl.abs(du), tl.abs(a)
        row_max = tl.max(tl.maximum(dg, du), axis=1)
        tl.atomic_max(row_amax_ptr + row, row_max.to(tl.int32, bitcast=True), mask=in_group, sem="relaxed")
        dg_acc = tl.maximum(dg_acc, dg)
        du_acc = tl.maximum(du_acc, du)
        a_acc = tl.maximum(a_acc, a)
    _amax_flush(dg_acc, du_acc, a_acc, grp, dht_amax_ptr, at_amax_ptr, f, f_ok, F, E, SWIGLU)


@triton.jit
def _amax_to_scale_kernel(ws_ptr, row_scale_ptr, dht_scale_ptr, at_scale_ptr, M, X, F, E,
                          POW2: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Rowwise recipe, between the passes: the workspace's amaxes -> scales, into the outputs
    (column scales (X, E) and (F, E), row scales (M,)), and their inverses in place, which is
    all the quantize pass reads."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_dh = E * X
    n_col = n_dh + E * F
    in_ws = offs < n_col + M
    scale = tl_fp8_scale(tl.load(ws_ptr + offs, mask=in_ws, other=0.0), POW2)
    tl.store(ws_ptr + offs, inv_scale(scale, INTERP), mask=in_ws)
    tl.store(dht_scale_ptr + (offs % X) * E + offs // X, scale, mask=offs < n_dh)
    o = offs - n_dh  # (group, feature) of the a segment, then the rows
    tl.store(at_scale_ptr + (o % F) * E + o // F, scale, mask=(o >= 0) & (o < E * F))
    tl.store(row_scale_ptr + offs - n_col, scale, mask=(offs >= n_col) & in_ws)


@triton.jit
def _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p_ok, f, f_ok, F, P, dg, du, a,
               dg_ri, du_ri, dg_ci, du_ci, a_ci, SWIGLU: tl.constexpr):  # fmt: skip
    """dh rows (inverse row scales *_ri) and the transposed dh and a (inverse column scales
    *_ci), each broadcast against the (token, feature) tile."""
    X = 2 * F if SWIGLU else F
    row_mask = is_row[:, None] & f_ok[None, :]
    dh_rows = dh_ptr + row.to(tl.int64)[:, None] * X + f[None, :]
    tl.store(dh_rows, tl_fp8_quantize_by(dg, dg_ri), mask=row_mask)
    col_mask = p_ok[:, None] & f_ok[None, :]
    cols = p[:, None] + f.to(tl.int64)[None, :] * P  # (token, feature) -> column-major store
    tl.store(dht_ptr + cols, tl_fp8_quantize_by(dg, dg_ci), mask=col_mask)
    tl.store(at_ptr + cols, tl_fp8_quantize_by(a, a_ci), mask=col_mask)
    if SWIGLU:
        tl.store(dh_rows + F, tl_fp8_quantize_by(du, du_ri), mask=row_mask)
        tl.store(dht_ptr + cols + F * P, tl_fp8_quantize_by(du, du_ci), mask=col_mask)


@triton.jit
def _act_bwd_quant_kernel(
    da_ptr, h_ptr, hs_ptr, group_end_ptr, padded_end_ptr,
    dh_ptr, dh_scale_ptr, dht_ptr, dht_scale_ptr, at_ptr, at_scale_ptr, ws_inv_ptr, map_ptr,
    M, F, E, P, stride_da, stride_h,
    SWIGLU: tl.constexpr, BLOCK: tl.constexpr, POW2: tl.constexpr, INTERP: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr, CHUNK: tl.constexpr,
    F_MAJOR: tl.constexpr,
):  # fmt: skip
    """Writes dh rows, dh^T and a^T for BLOCK_P padded token positions x BLOCK_F features.

    Rowwise (BLOCK=0): tokens from `_token_map_kernel`'s map, the amax pass's inverse scales
    from the workspace ws_inv (see `_amax_to_scale_kernel`). Blockwise (BLOCK=128 = BLOCK_P =
    BLOCK_F): the program's tile is one scale tile in every layout; it sweeps the tile CHUNK
    tokens at a time, once for the column amaxes and once to quantize.
    """
    pid_p, fb = tl_tile_ids(F_MAJOR)
    f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < F
    X = 2 * F if SWIGLU else F
    if BLOCK == 0:
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        row, in_group, is_row, gid = _mapped_tokens(p, map_ptr, E, P)
        dg, du, a = _bwd_values(da_ptr, h_ptr, hs_ptr, row, in_group, f, f_ok, 0, F, stride_da, stride_h, SWIGLU,
                                0, INTERP)  # fmt: skip
        # Workspace: inverse scales of the (group, feature) columns of dh (E, X) and a (E, F),
        # then of the rows (M,). Rows in no group get zeros, whatever the inverse.
        ri = tl.load(ws_inv_ptr + E * (X + F) + row, mask=is_row, other=1.0)[:, None]
        col_mask = in_group[:, None] & f_ok[None, :]
        dh_cols = ws_inv_ptr + gid.to(tl.int64)[:, None] * X + f[None, :]
        dg_ci = tl.load(dh_cols, mask=col_mask, other=1.0)
        a_ci = tl.load(ws_inv_ptr + E * X + gid.to(tl.int64)[:, None] * F + f[None, :], mask=col_mask, other=1.0)
        du_ci = dg_ci
        if SWIGLU:
            du_ci = tl.load(dh_cols + F, mask=col_mask, other=1.0)
        _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p < P, f, f_ok, F, P, dg, du, a,
                   ri, ri, dg_ci, du_ci, a_ci, SWIGLU)  # fmt: skip
    else:
        # align is a multiple of BLOCK, so the tile lies in one group (or past all): one search
        # per tile, not one per token and sweep (6 instructions per element and sweep at E = 8).
        p0 = pid_p * BLOCK_P + tl.zeros([1], dtype=tl.int32)  # [1], not a scalar: the interpreter's masks
        gid, p_start, r_start, r_end = _group_of(p0, group_end_ptr, padded_end_ptr, M, E, SEARCH_STEPS)
        # Elementwise maxima across chunks, reduced over tokens once after the sweep: a
        # reduction per chunk cost 12 shuffles + 15 max per element (sm_90 SASS).
        dg_amax = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
        du_amax = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
        a_amax = tl.zeros([CHUNK, BLOCK_F], dtype=tl.float32)
        for c in range(0, BLOCK_P, CHUNK):
            p = p0 + c + tl.arange(0, CHUNK)
            row, is_row, dg, du, a = _tile_chunk(da_ptr, h_ptr, hs_ptr, p, gid, p_start, r_start, r_end, E, f, f_ok,
                                                 fb, F, stride_da, stride_h, SWIGLU, BLOCK, INTERP)  # fmt: skip
            dg_amax = tl.maximum(dg_amax, tl.abs(dg))
            du_amax = tl.maximum(du_amax, tl.abs(du))
            a_amax = tl.maximum(a_amax, tl.abs(a))
        dg_cs = tl_fp8_scale(tl.max(dg_amax, axis=0), POW2)
        du_cs = tl_fp8_scale(tl.max(du_amax, axis=0), POW2)
        a_cs = tl_fp8_scale(tl.max(a_amax, axis=0), POW2)
        n_tiles = P // BLOCK
        tl.store(dht_scale_ptr + f * n_tiles + pid_p, dg_cs)
        tl.store(at_scale_ptr + f * n_tiles + pid_p, a_cs)
        if SWIGLU:
            tl.store(dht_scale_ptr + (F + f) * n_tiles + pid_p, du_cs)
        dg_ci, du_ci = inv_scale(dg_cs, INTERP)[None, :], inv_scale(du_cs, INTERP)[None, :]
        a_ci = inv_scale(a_cs, INTERP)[None, :]
        for c in range(0, BLOCK_P, CHUNK):
            p = p0 + c + tl.arange(0, CHUNK)
            row, is_row, dg, du, a = _tile_chunk(da_ptr, h_ptr, hs_ptr, p, gid, p_start, r_start, r_end, E, f, f_ok,
                                                 fb, F, stride_da, stride_h, SWIGLU, BLOCK, INTERP)  # fmt: skip
            dg_rs = tl_fp8_scale(tl.max(tl.abs(dg), axis=1), POW2)
            du_rs = tl_fp8_scale(tl.max(tl.abs(du), axis=1), POW2)
            scale_row = dh_scale_ptr + row.to(tl.int64) * (X // BLOCK)
            tl.store(scale_row + fb, dg_rs, mask=is_row)
            if SWIGLU:
                tl.store(scale_row + F // BLOCK + fb, du_rs, mask=is_row)
            dg_ri, du_ri = inv_scale(dg_rs, INTERP)[:, None], inv_scale(du_rs, INTERP)[:, None]
            _bwd_store(dh_ptr, dht_ptr, at_ptr, row, is_row, p, p < P, f, f_ok, F, P, dg, du, a,
                       dg_ri, du_ri, dg_ci, du_ci, a_ci, SWIGLU)  # fmt: skip


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


# Launch shapes, from sweeps on an H200 (the whole op, skewed groups, bitwise the same bytes;
# every variant tried: bench/NOTES.md). Rowwise: the amax pass sweeps 256 (SwiGLU) or 128 (GELU)
# tokens a program in 16- or 8-row chunks on one warp, keeping the column maxima elementwise across
# a group's chunks (80 registers and 32 instructions per element where a 128x32 tile took 168 and
# 52: Mixtral-8x7B width 1.637 -> 1.348 ms), its chunk loop pipelined in 3 stages for SwiGLU; the
# quantize pass 64x32 tiles on 4 warps, feature-major. Blockwise: the 128x128 tile in 32-row chunks
# on 4 warps (loads in flight per thread beat occupancy).
# By activation: (BLOCK_P, BLOCK_F, CHUNK, warps, stages).
_ROWWISE_AMAX_TILE = {"swiglu": (256, 32, 16, 1, 3), "gelu": (128, 32, 8, 1, 1)}
_ROWWISE_QUANT_TILE = (64, 32, 4)
# Grid order (F_MAJOR, see `kernels.common.tile_grid`) of the amax pass, the quantize pass and the blockwise pass.
_F_MAJOR = {"amax": False, "quant": True, "blockwise": True}
_BLOCKWISE_CHUNK, _BLOCKWISE_WARPS = 32, 4
_PREP_BLOCK = 1024


def triton_act_quant_bwd(
    da_MF: torch.Tensor, h_fp8: torch.Tensor, h_scale: torch.Tensor, activation: str, group_end_E: torch.Tensor,
    align: int = 16, block: int = 0, pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E); see kernels/act_quant.py's
    module docstring."""
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
    common = dict(SWIGLU=swiglu, INTERP=triton_interpret())
    # Rowwise workspace: amaxes, then inverse scales in place, of the (group, feature) columns of
    # dh (E, X) and a (E, F), then of the rows (M,): the columns first keep their loads aligned.
    # Then the token map (2P int32). Only the amaxes are zeroed.
    n_col = 0 if block else (X + F) * E
    n_ws = n_col + M if n_col else 0
    ws = da_MF.new_empty(n_ws + (2 * P if n_ws else 0), dtype=torch.float32)
    ws_i32 = ws.view(torch.int32)
    token_map = ws_i32[n_ws:]
    _bwd_prep_kernel[(1 + triton.cdiv(n_ws, _PREP_BLOCK),)](
        group_end_E, padded_end_E, ws, E, align, n_ws, E_POW2=triton.next_power_of_2(E), BLOCK=_PREP_BLOCK
    )
    if block:
        grid, f_major = tile_grid(P // block, F // block, _F_MAJOR["blockwise"])
        tile = dict(BLOCK_P=block, BLOCK_F=block, CHUNK=_BLOCKWISE_CHUNK, num_warps=_BLOCKWISE_WARPS, F_MAJOR=f_major)
    else:
        BLOCK_P, BLOCK_F, num_warps = _ROWWISE_QUANT_TILE
        grid, f_major = tile_grid(triton.cdiv(P, BLOCK_P), triton.cdiv(F, BLOCK_F), _F_MAJOR["quant"])
        tile = dict(BLOCK_P=BLOCK_P, BLOCK_F=BLOCK_F, CHUNK=BLOCK_P, num_warps=num_warps, F_MAJOR=f_major)
        _token_map_kernel[(triton.cdiv(P, _PREP_BLOCK),)](
            group_end_E, padded_end_E, token_map, M, E, P, SEARCH_STEPS=E.bit_length(), BLOCK=_PREP_BLOCK
        )
        AP, AF, a_chunk, a_warps, a_stages = _ROWWISE_AMAX_TILE[activation]
        a_chunk = math.gcd(a_chunk, align)  # a chunk lies in one group (align is a multiple of 16)
        a_grid, a_f_major = tile_grid(triton.cdiv(P, AP), triton.cdiv(F, AF), _F_MAJOR["amax"])
        _act_bwd_amax_kernel[a_grid](
            da_MF, h_fp8, h_scale, token_map, ws_i32[n_col:], ws_i32, ws_i32[X * E :],
            F, E, P, da_MF.stride(0), h_fp8.stride(0),
            **common, BLOCK_P=AP, BLOCK_F=AF, CHUNK=a_chunk, F_MAJOR=a_f_major, num_warps=a_warps,
            STAGES=a_stages, **LAUNCH_OPTIONS,
        )  # fmt: skip
        _amax_to_scale_kernel[(triton.cdiv(n_ws, _PREP_BLOCK),)](
            ws, dh_scale, dht_scale, at_scale, M, X, F, E, POW2=pow2_scale, INTERP=common["INTERP"], BLOCK=_PREP_BLOCK
        )
    _act_bwd_quant_kernel[grid](
        da_MF, h_fp8, h_scale, group_end_E, padded_end_E, dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, ws,
        token_map, M, F, E, P, da_MF.stride(0), h_fp8.stride(0),
        **common, BLOCK=block, POW2=pow2_scale, SEARCH_STEPS=E.bit_length(), **tile, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


def _fake_act_quant_bwd(da_MF, h_fp8, h_scale, activation, group_end_E, align=16, block=0, pow2_scale=False):
    check_act_quant_bwd_args(da_MF, h_fp8, h_scale, activation, group_end_E, align, block)
    return _bwd_outputs(da_MF, h_fp8.shape[1], group_end_E.numel(), align, block)


act_quant_bwd = kernel_op("act_quant_bwd", triton_act_quant_bwd, _fake_act_quant_bwd, torch_act_quant_bwd)
