"""Row quantization to FP8: one scale per row (rowwise recipe) or per 1x128 tile (blockwise).

    quantize_rows(x_MK, block_k, pow2_scale, row_index_M, stats) -> (q_MK fp8, scale fp32)
        block_k=0:   scale (M,), amax over the whole row
        block_k=128: scale (M, K // 128) row-major, amax over each 1x128 tile (K % 128 == 0)
        row_index_M: quantize x_MK[row_index_M] instead (permute + quantize in one pass, so only
                     FP8 leaves the permutation); the output has len(row_index_M) rows.

`launch_quantize_rows` writes into outputs the caller made (any row stride): the expert-parallel
dispatch quantizes straight into its wire buffer that way (kernels/quantize_packed.py).

stats: an FP8 statistics buffer (kernels/fp8_stats.py) the kernel adds the cast's counts to (None:
none, and the kernel compiles as without it).

Memory-bound: one read of x, one write of q. A program owns BLOCK_M rows and one span of
columns (the whole row, or one 128-wide tile); a row that fits in BLOCK_K stays in registers
between the amax and the cast, longer rows are read twice, the second time from L2.
Scale rule and quantization (x * (1 / scale)): kernels/common.py.

Shape letters (README.md): M rows, K the row length (the reduction dim of the GEMM reading q).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import (
    FP8_DTYPE,
    tile_grid,
    tl_fp8_inverse,
    tl_fp8_quantize_by,
    tl_fp8_scale,
    tl_tile_ids,
)
from kernels.contracts import check_quantize_rows_args
from kernels.dispatch import kernel_op
from kernels.fp8_stats import check_stats_arg, tl_fp8_stats_flush, tl_fp8_stats_tile, tl_fp8_stats_zero
from kernels.reference import torch_quantize_rows

# Loops here run over a few chunks, never a pipeline's worth: no software pipelining.
_NUM_STAGES = 1

# A row up to this many elements is held in registers (one read); longer rows loop twice.
_MAX_ROW_IN_REGISTERS = 8192
# 1x128 tiles: consecutive programs take consecutive 128-wide spans of the same rows (with 16x128
# tiles on 2 warps, against rows first on 4: 0.205 -> 0.187 ms at DeepSeek-V3 width, H200,
# bench/NOTES.md).
_SPAN_FIRST = True


@triton.jit
def _quantize_rows_kernel(
    x_ptr, idx_ptr, q_ptr, s_ptr, stats_ptr,
    M, K, stride_xm, stride_qm, stride_sm, SPAN,
    HAS_IDX: tl.constexpr, POW2: tl.constexpr, STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_CHUNK: tl.constexpr, SPAN_FIRST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_s = tl_tile_ids(SPAN_FIRST)  # pid_s: which span of the row (always 0 when SPAN == K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if HAS_IDX:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    c0 = pid_s * SPAN
    x_rows = x_ptr + src * stride_xm + c0
    q_rows = q_ptr + rows.to(tl.int64) * stride_qm + c0
    cols = tl.arange(0, BLOCK_K)
    if ONE_CHUNK:
        mask = row_ok[:, None] & (cols[None, :] < SPAN)
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl_fp8_scale(tl.max(tl.abs(x), axis=1), POW2)
        inv = tl_fp8_inverse(scale[:, None])
        tl.store(q_rows[:, None] + cols[None, :], tl_fp8_quantize_by(x, inv), mask=mask)
        if STATS:
            s_amax, s_under, s_sat = tl_fp8_stats_zero()
            s_amax, s_under, s_sat = tl_fp8_stats_tile(s_amax, s_under, s_sat, x, inv, mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k in range(0, SPAN, BLOCK_K):
            mask = row_ok[:, None] & (k + cols[None, :] < SPAN)
            x = tl.load(x_rows[:, None] + k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = tl_fp8_scale(amax, POW2)
        inv = tl_fp8_inverse(scale[:, None])
        if STATS:
            s_amax, s_under, s_sat = tl_fp8_stats_zero()
        for k in range(0, SPAN, BLOCK_K):
            mask = row_ok[:, None] & (k + cols[None, :] < SPAN)
            x = tl.load(x_rows[:, None] + k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows[:, None] + k + cols[None, :], tl_fp8_quantize_by(x, inv), mask=mask)
            if STATS:
                s_amax, s_under, s_sat = tl_fp8_stats_tile(s_amax, s_under, s_sat, x, inv, mask)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + pid_s, scale, mask=row_ok)
    if STATS:  # once per program (kernels/fp8_stats.py)
        tl_fp8_stats_flush(stats_ptr, s_amax, s_under, s_sat, (pid_m == 0) & (pid_s == 0), M, K)


def _rows_launch_config(K: int, block_k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps), from a sweep on an H200 at M=32768 (bench/NOTES.md): 1x128
    tiles 16 rows a program on 2 warps; whole rows in registers, 4096 elements a program for
    K <= 4096, two 8192-wide rows on 8 warps for K <= 8192; longer rows two passes of 4096 (the
    second from L2)."""
    if block_k:
        return 16, block_k, 2
    block = triton.next_power_of_2(K)
    if block <= 4096:
        return max(1, 4096 // block), block, 4
    if block <= _MAX_ROW_IN_REGISTERS:
        return 2, block, 8
    return 1, 4096, 4


def triton_quantize_rows(
    x_MK: torch.Tensor, block_k: int = 0, pow2_scale: bool = False, row_index_M: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """FP8 rows of x_MK (or of x_MK[row_index_M]) and their scales; see the module docstring."""
    check_quantize_rows_args(x_MK, block_k)
    check_stats_arg(stats, x_MK, 1)
    q_MK, scale = _rows_outputs(x_MK, x_MK.shape[0] if row_index_M is None else row_index_M.shape[0], block_k)
    launch_quantize_rows(x_MK, q_MK, scale, block_k, pow2_scale, row_index_M, stats)
    return q_MK, scale


def launch_quantize_rows(
    x_MK: torch.Tensor, q_MK: torch.Tensor, scale: torch.Tensor, block_k: int, pow2_scale: bool,
    row_index_M: torch.Tensor | None = None, stats: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """The kernel of `triton_quantize_rows`, writing into q_MK (fp8 (M, K)) and scale (fp32, (M,)
    or (M, K // block_k)): each with unit column stride, any row stride (views of a wider buffer);
    stats: see the module docstring."""
    if x_MK.stride(1) != 1:
        x_MK = x_MK.contiguous()
    M, K = q_MK.shape
    span = block_k or K
    scale_MS = scale.unsqueeze(1) if scale.dim() == 1 else scale  # unsqueeze: unit stride on the new dim
    if q_MK.stride(1) != 1 or scale_MS.stride(1) != 1 or scale_MS.shape != (M, K // span):
        raise ValueError(
            f"q_MK and scale need unit column strides and shapes (M, K), (M, K // block_k): got "
            f"{tuple(q_MK.shape)} stride {q_MK.stride()}, {tuple(scale.shape)} stride {scale.stride()}"
        )
    if M == 0:
        return
    BLOCK_M, BLOCK_K, num_warps = _rows_launch_config(K, block_k)
    grid, span_first = tile_grid(triton.cdiv(M, BLOCK_M), K // span, _SPAN_FIRST and span < K)
    _quantize_rows_kernel[grid](
        x_MK, row_index_M if row_index_M is not None else x_MK, q_MK, scale_MS,
        stats if stats is not None else scale_MS,  # a placeholder pointer when STATS is off
        M, K, x_MK.stride(0), q_MK.stride(0), scale_MS.stride(0), span,
        HAS_IDX=row_index_M is not None, POW2=pow2_scale, STATS=stats is not None,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, ONE_CHUNK=span <= BLOCK_K, SPAN_FIRST=span_first,
        num_warps=num_warps, num_stages=_NUM_STAGES,
    )  # fmt: skip


def _rows_outputs(x_MK: torch.Tensor, M: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    K = x_MK.shape[1]
    scale_shape = (M, K // block_k) if block_k else (M,)
    return x_MK.new_empty((M, K), dtype=FP8_DTYPE), x_MK.new_empty(scale_shape, dtype=torch.float32)


def _fake_quantize_rows(x_MK, block_k=0, pow2_scale=False, row_index_M=None, stats=None):
    check_quantize_rows_args(x_MK, block_k)
    return _rows_outputs(x_MK, x_MK.shape[0] if row_index_M is None else row_index_M.shape[0], block_k)


quantize_rows = kernel_op(
    "quantize_rows", triton_quantize_rows, _fake_quantize_rows, torch_quantize_rows, mutates_args=("stats",)
)
