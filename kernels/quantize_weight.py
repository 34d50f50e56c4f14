"""Expert weights to FP8, both orientations the grouped GEMMs need, from one call.

    quantize_weight(w_ENK, scaling, pow2_scale, round_bf16, stats) -> QuantizedWeight(q_ENK, scale, qt_EKN, scale_t)

q_ENK (forward operand, nn.Linear layout) is scaled along K, qt_EKN (contiguous (E, K, N), the
operand of the transposed GEMM) along N:
    rowwise     scale (E, N) per output channel     scale_t (E, K)
    blockwise   scale (E, N//128, K//128)           scale_t (E, K//128, N//128), the same blocks:
                128x128 blocks, quantized once      qt_EKN is q_ENK transposed byte for byte
    tensorwise  scale (E,) per expert               scale_t (E,) the same; qt_EKN = q_ENK^T

One grid over (tiles of an expert) x experts, so time grows linearly with E and nothing syncs.
blockwise is one pass (read w once, write q and qt; the 128x128 block held in registers).
rowwise and tensorwise need amaxes spanning a whole row / column / expert first: an amax pass
(atomic max of fp32 bits as int32) then the quantize pass, so w is read twice. Scale rule and
quantization: kernels/common.py.

fp32 master weights go in as they are, with round_bf16=True: each tile is rounded to bf16 in
registers, so the FP8 bytes equal those of their bf16 copy, which is never written (blockwise at
Mixtral-8x7B width: 3.67 ms with torch's fp32 -> bf16 copy first, 2.76 ms without, H200,
bench/NOTES.md).

stats: None, or an FP8 statistics buffer (kernels/fp8_stats.py) that gets q_ENK's cast counted,
in the quantize pass (the forward operand; qt_EKN holds the same values, scaled along N).
blockwise counts after its stores, from its block read again from L2 in slices (no second
read of HBM), so that the counting's registers do not spill the held block.

Shape letters (README.md): E experts, N output dim, K reduction dim of the forward GEMM (w_ENK is
nn.Linear's layout per expert); Nb = N // 128, Kb = K // 128 scale blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.common import CAST_TRUNCATES, FP8_DTYPE, tl_fp8_inverse, tl_fp8_quantize_by, tl_fp8_scale, tl_round_bf16_if
from kernels.contracts import check_amax_arg, check_quantize_weight_args
from kernels.dispatch import kernel_op
from kernels.fp8_stats import check_stats_arg, tl_fp8_stats_flush, tl_fp8_stats_tile, tl_fp8_stats_zero
from kernels.reference import torch_quantize_weight

# Loops here run over a few chunks or groups, never a pipeline's worth: no software pipelining.
_NUM_STAGES = 1

_MODES = {"rowwise": 0, "blockwise": 1, "tensorwise": 2}
_STATS_SUB_N = tl.constexpr(32)  # rows a blockwise program counts statistics over at a time


class QuantizedWeight(NamedTuple):
    q_ENK: torch.Tensor  # fp8 (E, N, K)
    scale: torch.Tensor  # fp32, along K: (E, N) | (E, N//128, K//128) | (E,)
    qt_EKN: torch.Tensor  # fp8 (E, K, N) contiguous
    scale_t: torch.Tensor  # fp32, along N: (E, K) | (E, K//128, N//128) | (E,)


@triton.jit
def _tile_coords(N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's expert, tile row/column and the expert's element offset (grid: (tiles, E))."""
    e = tl.program_id(1)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    return e, tl.program_id(0) // n_tiles_k, tl.program_id(0) % n_tiles_k, e.to(tl.int64) * N * K


@triton.jit
def _load(ptrs, mask, EVEN: tl.constexpr, ROUND_BF16: tl.constexpr, FP32: tl.constexpr = True):
    """The tile as fp32 (FP32=False: in the input's dtype, bf16 with ROUND_BF16, for a tile held
    in registers); ROUND_BF16: fp32 input rounded to the bf16 grid first (to nearest even, as
    torch's .to(torch.bfloat16)), so an fp32 master quantizes exactly as its bf16 copy would."""
    if EVEN:
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0)
    if ROUND_BF16:
        w = tl_round_bf16_if(w, CAST_TRUNCATES).to(tl.bfloat16)
    return w.to(tl.float32) if FP32 else w


@triton.jit
def _store(ptrs, v, mask, EVEN: tl.constexpr):
    if EVEN:
        tl.store(ptrs, v)
    else:
        tl.store(ptrs, v, mask=mask)


@triton.jit
def _weight_amax_kernel(
    w_ptr, row_amax_ptr, col_amax_ptr, N, K,
    MODE: tl.constexpr, EVEN: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, KSTEPS: tl.constexpr,
):  # fmt: skip
    """rowwise: row_amax (E, N) and col_amax (E, K); tensorwise: row_amax (E,). int32 bits.

    A program covers BLOCK_N rows x KSTEPS column blocks, so that fewer atomics meet on one
    address (tensorwise: all of an expert's land on one word, and they serialize).
    """
    e, pid_n, pid_k, base = _tile_coords(N, K, BLOCK_N, BLOCK_K * KSTEPS)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(KSTEPS):
        k = (pid_k * KSTEPS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (n < N)[:, None] & (k < K)[None, :]
        aw = tl.abs(_load(w_ptr + base + n[:, None] * K + k[None, :], mask, EVEN, ROUND_BF16))
        rmax = tl.maximum(rmax, tl.max(aw, axis=1))
        if MODE == 0:
            cmax = tl.max(aw, axis=0).to(tl.int32, bitcast=True)
            tl.atomic_max(col_amax_ptr + e * K + k, cmax, mask=k < K, sem="relaxed")
    if MODE == 0:
        tl.atomic_max(row_amax_ptr + e * N + n, rmax.to(tl.int32, bitcast=True), mask=n < N, sem="relaxed")
    else:
        tl.atomic_max(row_amax_ptr + e, tl.max(rmax, axis=0).to(tl.int32, bitcast=True), sem="relaxed")


@triton.jit
def _weight_quant_kernel(
    w_ptr, row_amax_ptr, col_amax_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, stats_ptr, N, K,
    MODE: tl.constexpr, POW2: tl.constexpr, EVEN: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_N: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    """Writes q (E, N, K) and qt (E, K, N) for one BLOCK_N x BLOCK_K tile, in SUB_N-row slices.

    Scales and their inverses come first, before any slice is loaded (see tl_fp8_inverse). In
    blockwise mode the block's amax needs the whole block: it is loaded once and held in
    registers in bf16 (an fp32 master rounded to bf16 first, as ROUND_BF16 has it anyway; 64
    values, 32 registers, a thread at 8 warps), then quantized from there (SUB_N == BLOCK_N).
    """
    e, pid_n, pid_k, base = _tile_coords(N, K, BLOCK_N, BLOCK_K)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    if MODE == 1:  # blockwise: this tile is the 128x128 block, loaded once and held
        tl.static_assert(SUB_N == BLOCK_N, "blockwise holds its whole block")
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (n < N)[:, None] & k_ok[None, :]
        w_held = _load(w_ptr + base + n[:, None] * K + k[None, :], mask, EVEN, ROUND_BF16, FP32=False)
        amax = tl.max(tl.max(tl.abs(w_held), axis=1), axis=0).to(tl.float32)  # |w| and max: exact in bf16
        scale = tl_fp8_scale(amax, POW2)
        n_blk_n = N // BLOCK_N
        n_blk_k = K // BLOCK_K
        tl.store(s_ptr + (e * n_blk_n + pid_n) * n_blk_k + pid_k, scale)
        tl.store(st_ptr + (e * n_blk_k + pid_k) * n_blk_n + pid_n, scale)
        rinv = tl_fp8_inverse(scale)
        cinv = rinv
    elif MODE == 2:  # tensorwise
        scale = tl_fp8_scale(tl.load(row_amax_ptr + e).to(tl.float32, bitcast=True), POW2)
        if (pid_n == 0) & (pid_k == 0):
            tl.store(s_ptr + e, scale)
            tl.store(st_ptr + e, scale)
        rinv = tl_fp8_inverse(scale)
        cinv = rinv
    else:  # rowwise: along K for q (column vector per slice, below), along N for qt
        col_amax = tl.load(col_amax_ptr + e * K + k, mask=k_ok, other=0).to(tl.float32, bitcast=True)
        cscale = tl_fp8_scale(col_amax, POW2)
        if pid_n == 0:
            tl.store(st_ptr + e * K + k, cscale, mask=k_ok)
        cinv = tl_fp8_inverse(cscale[None, :])
    if STATS:
        s_amax, s_under, s_sat = tl_fp8_stats_zero()
    for i in range(0, BLOCK_N, SUB_N):
        n = pid_n * BLOCK_N + i + tl.arange(0, SUB_N)
        n_ok = n < N
        if MODE == 0:
            row_amax = tl.load(row_amax_ptr + e * N + n, mask=n_ok, other=0).to(tl.float32, bitcast=True)
            rscale = tl_fp8_scale(row_amax, POW2)
            if pid_k == 0:
                tl.store(s_ptr + e * N + n, rscale, mask=n_ok)
            rinv = tl_fp8_inverse(rscale[:, None])
        mask = n_ok[:, None] & k_ok[None, :]
        if MODE == 1:
            w = w_held.to(tl.float32)
        else:
            w = _load(w_ptr + base + n[:, None] * K + k[None, :], mask, EVEN, ROUND_BF16)
        _store(q_ptr + base + n[:, None] * K + k[None, :], tl_fp8_quantize_by(w, rinv), mask, EVEN)
        if STATS and MODE != 1:
            s_amax, s_under, s_sat = tl_fp8_stats_tile(s_amax, s_under, s_sat, w, rinv, mask)
        # The transposed copy is transposed in registers (tl.trans) and stored row-major. Storing
        # the untransposed tile through transposed pointers (k * N + n) left ~25% of the rowwise
        # qt's bytes wrong from fp32 input on triton 3.6 / H200 (bf16 input was right).
        qt_KN = tl.trans(tl_fp8_quantize_by(w, cinv))
        _store(qt_ptr + base + k[:, None] * N + n[None, :], qt_KN, k_ok[:, None] & n_ok[None, :], EVEN)
    if STATS and MODE == 1:
        # Counted after the stores, from the tile read again in 32-row slices (from L2, where this
        # program's read left it): counting from the held 128x128 tile spilled 844 bytes a thread
        # (ptxas, sm_90, triton 3.6), 44 this way.
        for i in range(0, BLOCK_N, _STATS_SUB_N):
            n32 = pid_n * BLOCK_N + i + tl.arange(0, _STATS_SUB_N)
            m32 = (n32 < N)[:, None] & k_ok[None, :]
            w32 = _load(w_ptr + base + n32[:, None] * K + k[None, :], m32, EVEN, ROUND_BF16)
            s_amax, s_under, s_sat = tl_fp8_stats_tile(s_amax, s_under, s_sat, w32, rinv, m32)
    if STATS:  # once per program (kernels/fp8_stats.py)
        first = (tl.program_id(0) == 0) & (e == 0)
        tl_fp8_stats_flush(stats_ptr, s_amax, s_under, s_sat, first, tl.num_programs(1) * N, K)


def triton_quantize_weight(
    w_ENK: torch.Tensor, scaling: str = "rowwise", pow2_scale: bool = False, round_bf16: bool = False,
    stats: torch.Tensor | None = None, amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Both FP8 orientations of w_ENK (see the module docstring). round_bf16: quantize the bf16
    rounding of an fp32 w_ENK (bitwise what quantizing w_ENK.to(torch.bfloat16) gives) without
    writing that copy. stats: q_ENK's cast statistics. amax (rowwise): the amaxes the amax pass
    would take, given (kernels/contracts.py `check_amax_arg`), so that pass does not run."""
    check_quantize_weight_args(w_ENK, scaling)
    check_stats_arg(stats, w_ENK, 1)
    check_amax_arg(amax, w_ENK, scaling, round_bf16)
    round_bf16 = round_bf16 and w_ENK.dtype != torch.bfloat16
    if w_ENK.is_cuda and w_ENK.dtype != torch.bfloat16 and scaling != "rowwise" and not round_bf16:
        # On an H200 with triton 3.6 (tests/test_kernels_quantize.py::test_quantize_weight_gpu),
        # from fp32 tiles the transposed qt of the blockwise and tensorwise modes comes back with
        # ~25% wrong bytes (q and the scales right), whether the fp8 or the fp32 tile is
        # transposed in registers. The same fp32 tiles rounded to bf16 in registers (round_bf16,
        # the layer's path) come back bitwise right at every shape tried, as do bf16 inputs.
        raise ValueError(
            f"quantize_weight({scaling!r}) takes bfloat16 weights, or fp32 with round_bf16=True, on the GPU; "
            f"got {w_ENK.dtype} with round_bf16=False"
        )
    w_ENK = w_ENK.contiguous()
    E, N, K = w_ENK.shape
    dev = w_ENK.device
    q_ENK = torch.empty((E, N, K), dtype=FP8_DTYPE, device=dev)
    qt_EKN = torch.empty((E, K, N), dtype=FP8_DTYPE, device=dev)
    scale_shape, scale_t_shape = _scale_shapes(E, N, K, scaling)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=dev)
    scale_t = torch.empty(scale_t_shape, dtype=torch.float32, device=dev)
    if E == 0:
        return q_ENK, scale, qt_EKN, scale_t
    MODE = _MODES[scaling]
    wide = w_ENK.element_size() == 4
    BLOCK_N, BLOCK_K, SUB_N, num_warps = _weight_launch_config(scaling, wide, stats is not None)
    EVEN = N % BLOCK_N == 0 and K % BLOCK_K == 0
    grid = (triton.cdiv(N, BLOCK_N) * triton.cdiv(K, BLOCK_K), E)
    row_amax = col_amax = scale  # placeholders, unused by blockwise
    if amax is not None:
        row_amax, col_amax = amax[: E * N], amax[E * N :]
    elif MODE != 1:
        n_row = E * N if MODE == 0 else E
        amax = torch.zeros((n_row + (E * K if MODE == 0 else 0),), dtype=torch.int32, device=dev)
        row_amax, col_amax = amax[:n_row], amax[n_row:]
        ABN, ABK, a_warps = _AMAX_BLOCKS[wide]
        tiles_k = triton.cdiv(K, ABK)
        # Fewer, longer programs while _AMAX_MIN_PROGRAMS remain: less atomic contention.
        min_programs = _AMAX_MIN_PROGRAMS[scaling]
        ksteps = min(triton.next_power_of_2(max(1, triton.cdiv(N, ABN) * tiles_k * E // min_programs)), tiles_k)
        ksteps = 1 << (ksteps.bit_length() - 1)  # a power of two <= tiles_k
        _weight_amax_kernel[(triton.cdiv(N, ABN) * triton.cdiv(K, ABK * ksteps), E)](
            w_ENK, row_amax, col_amax, N, K, MODE=MODE, EVEN=N % ABN == 0 and K % (ABK * ksteps) == 0,
            ROUND_BF16=round_bf16, BLOCK_N=ABN, BLOCK_K=ABK, KSTEPS=ksteps, num_warps=a_warps,
            num_stages=_NUM_STAGES,
        )  # fmt: skip
    _weight_quant_kernel[grid](
        w_ENK, row_amax, col_amax, q_ENK, qt_EKN, scale, scale_t,
        stats if stats is not None else scale, N, K,  # a placeholder pointer when STATS is off
        MODE=MODE, POW2=pow2_scale, EVEN=EVEN, ROUND_BF16=round_bf16,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SUB_N=SUB_N, STATS=stats is not None, num_warps=num_warps,
        num_stages=_NUM_STAGES,
    )  # fmt: skip
    return q_ENK, scale, qt_EKN, scale_t


# (BLOCK_N, BLOCK_K, num_warps) of the amax pass (rowwise, tensorwise), by input: [bf16, fp32]
# (fp32 masters: 64x64 tiles, from a sweep on an H200, bench/NOTES.md).
_AMAX_BLOCKS = ((128, 64, 4), (64, 64, 4))
# Programs the amax pass keeps before it lengthens them (fewer atomics on one address). Rowwise
# atomics spread over E x (N + K) words: 16384 (~120 per SM) against 1024 took the pass + the
# quantize pass at Mixtral-8x7B width from 0.96 to 0.81 ms (w2, H200, commit 72c0dad).
# Tensorwise atomics meet on one word per expert: 1024.
_AMAX_MIN_PROGRAMS = {"rowwise": 16384, "tensorwise": 1024}


def _weight_launch_config(mode: str, wide: bool = False, stats: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SUB_N, num_warps) of the quantize pass. wide: fp32 input; stats: counting.

    Blockwise: the 128x128 scale block, held whole (SUB_N = 128) in bf16: against sweeping it
    twice in 64-row slices, the second sweep from L1/L2, 1.26-1.27x faster from fp32 masters on
    an H200 (bench/results/kernels.json, every byte and scale the same). Rowwise: 64-row slices
    from bf16; from fp32, or counting statistics, 32-row slices (half the registers of a 64-row
    fp32 slice; the counting's registers made the 64-row bf16 slice spill, the 32-row one not,
    ptxas for sm_90, triton 3.6). The slice height changes no byte."""
    if mode == "blockwise":
        return 128, 128, 128, 8
    if mode == "rowwise":
        return (64, 128, 32, 4) if wide or stats else (64, 128, 64, 4)
    return 64, 128, 32, 4


def _scale_shapes(E: int, N: int, K: int, mode: str):
    if mode == "rowwise":
        return (E, N), (E, K)
    if mode == "blockwise":
        return (E, N // 128, K // 128), (E, K // 128, N // 128)
    return (E,), (E,)


def _fake_quantize_weight(w_ENK, scaling="rowwise", pow2_scale=False, round_bf16=False, stats=None, amax=None):
    check_quantize_weight_args(w_ENK, scaling)
    E, N, K = w_ENK.shape
    scale_shape, scale_t_shape = _scale_shapes(E, N, K, scaling)
    return (
        w_ENK.new_empty((E, N, K), dtype=FP8_DTYPE),
        w_ENK.new_empty(scale_shape, dtype=torch.float32),
        w_ENK.new_empty((E, K, N), dtype=FP8_DTYPE),
        w_ENK.new_empty(scale_t_shape, dtype=torch.float32),
    )


quantize_weight = kernel_op(
    "quantize_weight", triton_quantize_weight, _fake_quantize_weight, torch_quantize_weight,
    result=lambda out: QuantizedWeight(*out), mutates_args=("stats",),
)  # fmt: skip
