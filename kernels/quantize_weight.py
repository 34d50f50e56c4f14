"""Expert weights to FP8, both orientations the grouped GEMMs need, from one call.

    quantize_weight(w_ENK, mode, pow2_scale) -> QuantizedWeight(q_ENK, scale, qt_EKN, scale_t)

q_ENK (forward operand, nn.Linear layout) is scaled along K, qt_EKN (contiguous (E, K, N), the
operand of the transposed GEMM) along N:
    rowwise     scale (E, N) per output channel     scale_t (E, K)
    blockwise   scale (E, N//128, K//128)           scale_t (E, K//128, N//128), the same blocks:
                128x128 blocks, quantized once      qt_EKN is q_ENK transposed byte for byte
    tensorwise  scale (E,) per expert               scale_t (E,) the same; qt_EKN = q_ENK^T

One grid over (tiles of an expert) x experts, so time grows linearly with E and nothing syncs.
blockwise is one pass (read w once, write q and qt). rowwise and tensorwise need amaxes spanning
a whole row / column / expert first: an amax pass (atomic max of fp32 bits as int32) then the
quantize pass, so w is read twice. Scale rule and division: kernels/common.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, tl_fp8_quantize, tl_fp8_scale, use_triton
from kernels.reference import check_quantize_weight_args, torch_quantize_weight

_MODES = {"rowwise": 0, "blockwise": 1, "tensorwise": 2}


class QuantizedWeight(NamedTuple):
    q_ENK: torch.Tensor  # fp8 (E, N, K)
    scale: torch.Tensor  # fp32, along K: (E, N) | (E, N//128, K//128) | (E,)
    qt_EKN: torch.Tensor  # fp8 (E, K, N) contiguous
    scale_t: torch.Tensor  # fp32, along N: (E, K) | (E, K//128, N//128) | (E,)


@triton.jit
def _tile(w_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's expert, tile coordinates and fp32 tile of w (grid: (tiles, E))."""
    e = tl.program_id(1)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // n_tiles_k
    pid_k = tl.program_id(0) % n_tiles_k
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (n < N)[:, None] & (k < K)[None, :]
    w = tl.load(w_ptr + e.to(tl.int64) * N * K + n[:, None] * K + k[None, :], mask=mask, other=0.0)
    return e, pid_n, pid_k, n, k, mask, w.to(tl.float32)


@triton.jit
def _weight_amax_kernel(
    w_ptr, row_amax_ptr, col_amax_ptr, N, K,
    MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """rowwise: row_amax (E, N) and col_amax (E, K); tensorwise: row_amax (E,). int32 bits."""
    e, pid_n, pid_k, n, k, mask, w = _tile(w_ptr, N, K, BLOCK_N, BLOCK_K)
    aw = tl.abs(w)
    if MODE == 0:
        rmax = tl.max(aw, axis=1).to(tl.int32, bitcast=True)
        tl.atomic_max(row_amax_ptr + e * N + n, rmax, mask=n < N, sem="relaxed")
        cmax = tl.max(aw, axis=0).to(tl.int32, bitcast=True)
        tl.atomic_max(col_amax_ptr + e * K + k, cmax, mask=k < K, sem="relaxed")
    else:
        tl.atomic_max(row_amax_ptr + e, tl.max(tl.max(aw, axis=1), axis=0).to(tl.int32, bitcast=True), sem="relaxed")


@triton.jit
def _weight_quant_kernel(
    w_ptr, row_amax_ptr, col_amax_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, N, K,
    MODE: tl.constexpr, POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e, pid_n, pid_k, n, k, mask, w = _tile(w_ptr, N, K, BLOCK_N, BLOCK_K)
    base = e.to(tl.int64) * N * K
    q_ptrs = q_ptr + base + n[:, None] * K + k[None, :]
    qt_ptrs = qt_ptr + base + k[None, :] * N + n[:, None]
    if MODE == 0:  # rowwise: scale along K for q, along N for qt
        row_amax = tl.load(row_amax_ptr + e * N + n, mask=n < N, other=0).to(tl.float32, bitcast=True)
        col_amax = tl.load(col_amax_ptr + e * K + k, mask=k < K, other=0).to(tl.float32, bitcast=True)
        rscale = tl_fp8_scale(row_amax, POW2)
        cscale = tl_fp8_scale(col_amax, POW2)
        tl.store(q_ptrs, tl_fp8_quantize(w, rscale[:, None]), mask=mask)
        tl.store(qt_ptrs, tl_fp8_quantize(w, cscale[None, :]), mask=mask)
        if pid_k == 0:
            tl.store(s_ptr + e * N + n, rscale, mask=n < N)
        if pid_n == 0:
            tl.store(st_ptr + e * K + k, cscale, mask=k < K)
    else:
        if MODE == 1:  # blockwise: this tile is the 128x128 block
            scale = tl_fp8_scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
        else:  # tensorwise
            scale = tl_fp8_scale(tl.load(row_amax_ptr + e).to(tl.float32, bitcast=True), POW2)
        q = tl_fp8_quantize(w, scale)
        tl.store(q_ptrs, q, mask=mask)
        tl.store(qt_ptrs, q, mask=mask)
        if MODE == 1:
            n_blk_n = N // BLOCK_N
            n_blk_k = K // BLOCK_K
            tl.store(s_ptr + (e * n_blk_n + pid_n) * n_blk_k + pid_k, scale)
            tl.store(st_ptr + (e * n_blk_k + pid_k) * n_blk_n + pid_n, scale)
        elif (pid_n == 0) & (pid_k == 0):
            tl.store(s_ptr + e, scale)
            tl.store(st_ptr + e, scale)


def _quantize_weight_impl(
    w_ENK: torch.Tensor, mode: str, pow2_scale: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_quantize_weight_args(w_ENK, mode)
    w_ENK = w_ENK.contiguous()
    E, N, K = w_ENK.shape
    dev = w_ENK.device
    q_ENK = torch.empty((E, N, K), dtype=FP8_DTYPE, device=dev)
    qt_EKN = torch.empty((E, K, N), dtype=FP8_DTYPE, device=dev)
    scale_shape, scale_t_shape = _scale_shapes(E, N, K, mode)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=dev)
    scale_t = torch.empty(scale_t_shape, dtype=torch.float32, device=dev)
    if E == 0:
        return q_ENK, scale, qt_EKN, scale_t
    MODE = _MODES[mode]
    BLOCK_N, BLOCK_K, num_warps = _weight_launch_config(mode)
    grid = (triton.cdiv(N, BLOCK_N) * triton.cdiv(K, BLOCK_K), E)
    row_amax = col_amax = scale  # placeholders, unused by blockwise
    if MODE != 1:
        n_row = E * N if MODE == 0 else E
        amax = torch.zeros((n_row + (E * K if MODE == 0 else 0),), dtype=torch.int32, device=dev)
        row_amax, col_amax = amax[:n_row], amax[n_row:]
        _weight_amax_kernel[grid](w_ENK, row_amax, col_amax, N, K, MODE=MODE, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps)
    _weight_quant_kernel[grid](
        w_ENK, row_amax, col_amax, q_ENK, qt_EKN, scale, scale_t, N, K,
        MODE=MODE, POW2=pow2_scale, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )  # fmt: skip
    return q_ENK, scale, qt_EKN, scale_t


def _weight_launch_config(mode: str) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps); blockwise tiles are the 128x128 scale blocks."""
    return 128, 128, 8


def _scale_shapes(E: int, N: int, K: int, mode: str):
    if mode == "rowwise":
        return (E, N), (E, K)
    if mode == "blockwise":
        return (E, N // 128, K // 128), (E, K // 128, N // 128)
    return (E,), (E,)


triton_quantize_weight = torch.library.custom_op("fp8moe::quantize_weight", mutates_args=())(_quantize_weight_impl)


@triton_quantize_weight.register_fake
def _(w_ENK, mode, pow2_scale):
    check_quantize_weight_args(w_ENK, mode)
    E, N, K = w_ENK.shape
    scale_shape, scale_t_shape = _scale_shapes(E, N, K, mode)
    return (
        w_ENK.new_empty((E, N, K), dtype=FP8_DTYPE),
        w_ENK.new_empty(scale_shape, dtype=torch.float32),
        w_ENK.new_empty((E, K, N), dtype=FP8_DTYPE),
        w_ENK.new_empty(scale_t_shape, dtype=torch.float32),
    )


def quantize_weight(w_ENK: torch.Tensor, mode: str = "rowwise", pow2_scale: bool = False) -> QuantizedWeight:
    """Both FP8 orientations of w_ENK (see the module docstring). Eager calls skip the custom
    op's dispatch (~15 us of host time); torch.compile traces the op."""
    if not use_triton(w_ENK):
        return QuantizedWeight(*torch_quantize_weight(w_ENK, mode, pow2_scale))
    if torch.compiler.is_compiling():
        return QuantizedWeight(*triton_quantize_weight(w_ENK, mode, pow2_scale))
    return QuantizedWeight(*_quantize_weight_impl(w_ENK, mode, pow2_scale))
