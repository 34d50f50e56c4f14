"""The 2d x 2d FP8 grouped GEMM of the weight gradients: out_ENK[e] = a_NP[:, tokens of e] @
b_KP[:, tokens of e].T, with blockwise scales (one per 128-token tile) or the rowwise recipe's
(one per row and expert group). The 2d x 3d GEMM, the scale promotion and the memory path that
both share: kernels/grouped_gemm.py.

Shape letters (README.md): N, K the output's dims (rows of a and b), E experts, P padded rows
(the reduction dim here: each expert's tokens start at a multiple of 128); Pb = P // 128.

Schedule: the tile set E x cdiv(N, BM) x cdiv(K, 128 SPLIT_N) is static; only the expert's
token range is read on device. An expert without tokens runs no K step and writes its zero block.
PROGRAMS_PER_SM = 0: one program per tile (the block scheduler balances experts of different token
counts); > 0: a persistent grid of that many programs per SM walks the tiles with stride #programs.
With few tokens an expert (a short K loop) a tile's fixed costs, the first loads and the fp32
epilogue, are a large part of it: a persistent program or a second CTA on the SM hides them.
STORE_TMA (TMA path): the epilogue stages each 64-column subtile in shared memory and stores it by
TMA (the copy engine writes, and clips rows and columns past the output's edge), so the next tile's
K loop starts while the last tile's bytes drain.

Rowwise weight gradients keep the per-128 promotion (acc += dot: one FADD per element; triton
leaves fp8 dots with an imprecise-accumulation limit unfused with the add) and scale once, in the
epilogue: their scales are constant over an expert's tokens. (Blockwise promotion costs an FMUL +
FFMA per element and step there, which the CTA's wgmma waits on: 559 TFLOP/s at Mixtral against
845 for the forward's one FFMA: torch.profiler over bench.moe_block, H200, commit ce4f306.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import triton_interpret, use_triton
from kernels.contracts import check_grouped_mm_wgrad_args
from kernels.dispatch import kernel_op
from kernels.grouped_gemm import (
    autotuned,
    check_tma_aligned,
    gemm_config,
    launch_on_path,
    num_sms,
    out_tensor_desc,
    promote_k,
    run_gemm,
    tensor_desc,
    tl_fp8_dot,
    tl_load_tile,
    tl_pin,
    tl_swizzle,
)
from kernels.reference_gemm import torch_fp8_grouped_mm_wgrad, torch_fp8_grouped_mm_wgrad_rowwise


def _wgrad_configs(interpret: bool) -> list[triton.Config]:
    if interpret:  # one config: the interpreter cannot time anything
        return [gemm_config(64, 1, 4, 1, group_m=2)]
    # 128x256, one CTA an SM, for long token ranges; for short ones (a few 128-token steps a tile)
    # two persistent CTAs an SM with TMA stores, one's loads and epilogue under the other's wgmma
    # (bench/NOTES.md, the GEMM sweep)
    return [gemm_config(128, 2, 8, 3), wgrad_config(64, 2, 4, 2, 2), wgrad_config(64, 1, 4, 4, 2)]


def wgrad_config(block_m, split_n, warps, stages, programs_per_sm) -> triton.Config:
    """A persistent candidate with the TMA-store epilogue (module docstring)."""
    cfg = gemm_config(block_m, split_n, warps, stages, programs_per_sm)
    cfg.kwargs["STORE_TMA"] = True
    return cfg


@triton.jit
def _store_out(acc, out_ptr, out_desc, e, n0, c0, N, K, stride_oe, stride_on,
               BLOCK_M: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_TMA: tl.constexpr):
    """Write (or with ACCUMULATE add into) out[e, n0:n0+BM, c0:c0+128] what lies inside (N, K)."""
    if STORE_TMA:  # two (BM, 64) subtiles through shared memory: 32 KB of staging, not 64
        left, right = acc.reshape(BLOCK_M, 2, 64).permute(0, 2, 1).split()
        if ACCUMULATE:  # the gradient so far plus this product: AccumulateGrad's one fp32 add
            left += out_desc.load([e, n0, c0]).reshape(BLOCK_M, 64)
            right += out_desc.load([e, n0, c0 + 64]).reshape(BLOCK_M, 64)
        out_desc.store([e, n0, c0], left.to(out_ptr.dtype.element_ty).reshape(1, BLOCK_M, 64))
        out_desc.store([e, n0, c0 + 64], right.to(out_ptr.dtype.element_ty).reshape(1, BLOCK_M, 64))
    else:
        rows = n0 + tl.arange(0, BLOCK_M)
        cols = c0 + tl.arange(0, 128)
        ptrs = out_ptr + e.to(tl.int64) * stride_oe + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        if ACCUMULATE:
            acc = tl.load(ptrs, mask=mask, other=0.0) + acc
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_grouped_mm_wgrad_kernel(
    a, a_scale_ptr, b, b_scale_ptr, out_ptr, out_desc, padded_end_ptr,
    N, K, P, E, S,
    stride_an, stride_bk,
    stride_san, stride_sap, stride_sbk, stride_sbp, stride_sas, stride_sbs, stride_pes,
    stride_oe, stride_on,
    BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, PIN: tl.constexpr, ROWWISE: tl.constexpr, PROMOTE_K: tl.constexpr,
    ACCUMULATE: tl.constexpr = False, PROGRAMS_PER_SM: tl.constexpr = 0, STORE_TMA: tl.constexpr = False,
    SEGMENTED: tl.constexpr = False,
):
    """ROWWISE: scales (N, E) and (K, E), applied in the epilogue; else (N, P/128), (K, P/128).
    PROMOTE_K: kernels/grouped_gemm.py's `tl_fp8_dot`. ACCUMULATE: out += the product (fp32 out).
    PROGRAMS_PER_SM: 0, one program per tile, else persistent (the launcher's grid); STORE_TMA takes
    effect where out_desc is given. SEGMENTED: S segments (`_segments_tile`), a and b their
    (S N, P) and (S K, P) stacks, scales and padded ends one slice a segment (strides stride_s*,
    stride_pes)."""
    if PROGRAMS_PER_SM == 0:  # no loop: a loop around the tile costs the rowwise 128x256 spills
        _wgrad_tile(tl.program_id(0), a, a_scale_ptr, b, b_scale_ptr, out_ptr, out_desc, padded_end_ptr, N, K, P, S,
                    stride_an, stride_bk, stride_san, stride_sap, stride_sbk, stride_sbp, stride_sas, stride_sbs,
                    stride_pes, stride_oe, stride_on, BLOCK_M, SPLIT_N, GROUP_M, USE_TMA, PIN, ROWWISE, PROMOTE_K,
                    ACCUMULATE, STORE_TMA, SEGMENTED)  # fmt: skip
    else:
        tiles = E * tl.cdiv(N, BLOCK_M) * tl.cdiv(K, 128 * SPLIT_N)
        for pid in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
            _wgrad_tile(pid, a, a_scale_ptr, b, b_scale_ptr, out_ptr, out_desc, padded_end_ptr, N, K, P, S,
                        stride_an, stride_bk, stride_san, stride_sap, stride_sbk, stride_sbp, stride_sas, stride_sbs,
                        stride_pes, stride_oe, stride_on, BLOCK_M, SPLIT_N, GROUP_M, USE_TMA, PIN, ROWWISE,
                        PROMOTE_K, ACCUMULATE, STORE_TMA, SEGMENTED)  # fmt: skip


@triton.jit
def _token_steps(padded_end_ptr, e, P, BLOCK_K: tl.constexpr):
    """Expert e's token range in 128-token steps (ends are multiples of 128 by contract; stepping
    by index keeps offsets provably 128-aligned, which the pointer path needs to vectorize)."""
    step_hi = tl.minimum(tl.load(padded_end_ptr + e), P) // BLOCK_K
    step_lo = tl.minimum(tl.load(padded_end_ptr + e - 1, mask=e > 0, other=0) // BLOCK_K, step_hi)
    return step_lo, step_hi


@triton.jit
def _k_steps(acc_lo, acc_hi, a, b, a_row0, a_end, b_row0, b_end, step_lo, step_hi, sa_ptrs, sb_lo_ptrs, sb_hi_ptrs,
             a_ok, lo_ok, hi_ok, stride_an, stride_bk, stride_sap, stride_sbp, BLOCK_M: tl.constexpr,
             SPLIT_N: tl.constexpr, USE_TMA: tl.constexpr, PIN: tl.constexpr, ROWWISE: tl.constexpr,
             PROMOTE_K: tl.constexpr):  # fmt: skip
    """The K loop over token steps [step_lo, step_hi): a's rows from a_row0 (those >= a_end read
    as 0 on the pointer path), b's from b_row0; blockwise, each step promoted by its scales."""
    BLOCK_K: tl.constexpr = 128
    for ps in range(step_lo, step_hi):  # an expert with no tokens: zero steps, zero block
        a_t = tl_load_tile(a, a_row0, ps * BLOCK_K, a_end, stride_an, BLOCK_M, BLOCK_K, USE_TMA)
        b_lo = tl_load_tile(b, b_row0, ps * BLOCK_K, b_end, stride_bk, 128, BLOCK_K, USE_TMA)
        if ROWWISE:
            acc_lo += tl_fp8_dot(a_t, b_lo.T, PROMOTE_K)
        else:
            # each 128-token step is one scale tile of both operands: promote by the outer
            # product, (d * sa) * sb in place (a materialized sa x sb tile: 64 more registers)
            sa = tl.load(sa_ptrs + ps * stride_sap, mask=a_ok, other=0.0)
            sb_lo = tl.load(sb_lo_ptrs + ps * stride_sbp, mask=lo_ok, other=0.0)
            acc_lo += (tl_fp8_dot(a_t, b_lo.T, PROMOTE_K) * sa[:, None]) * sb_lo[None, :]
        if SPLIT_N == 2:
            acc_lo = tl_pin(acc_lo, PIN)
            b_hi = tl_load_tile(b, b_row0 + 128, ps * BLOCK_K, b_end, stride_bk, 128, BLOCK_K, USE_TMA)
            if ROWWISE:
                acc_hi += tl_fp8_dot(a_t, b_hi.T, PROMOTE_K)
            else:
                sb_hi = tl.load(sb_hi_ptrs + ps * stride_sbp, mask=hi_ok, other=0.0)
                acc_hi += (tl_fp8_dot(a_t, b_hi.T, PROMOTE_K) * sa[:, None]) * sb_hi[None, :]
    return acc_lo, acc_hi


@triton.jit
def _wgrad_tile(
    pid, a, a_scale_ptr, b, b_scale_ptr, out_ptr, out_desc, padded_end_ptr, N, K, P, S,
    stride_an, stride_bk, stride_san, stride_sap, stride_sbk, stride_sbp, stride_sas, stride_sbs, stride_pes,
    stride_oe, stride_on,
    BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, PIN: tl.constexpr,
    ROWWISE: tl.constexpr, PROMOTE_K: tl.constexpr, ACCUMULATE: tl.constexpr, STORE_TMA: tl.constexpr,
    SEGMENTED: tl.constexpr,
):
    """Output tile pid (expert-major, then GROUP_M-swizzled) of the kernel above."""
    BLOCK_K: tl.constexpr = 128
    BLOCK_N: tl.constexpr = 128 * SPLIT_N
    n_tiles = tl.cdiv(N, BLOCK_M)
    k_tiles = tl.cdiv(K, BLOCK_N)
    e = pid // (n_tiles * k_tiles)
    nt, kt = tl_swizzle(pid % (n_tiles * k_tiles), n_tiles, k_tiles, GROUP_M)

    n0 = nt * BLOCK_M
    k0 = kt * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_M)
    cols_lo = k0 + tl.arange(0, 128)
    cols_hi = cols_lo + 128
    a_ok, lo_ok, hi_ok = rows < N, cols_lo < K, cols_hi < K
    sa_ptrs = a_scale_ptr + rows.to(tl.int64) * stride_san
    sb_lo_ptrs = b_scale_ptr + cols_lo.to(tl.int64) * stride_sbk
    sb_hi_ptrs = b_scale_ptr + cols_hi.to(tl.int64) * stride_sbk
    acc_lo = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    if SEGMENTED:
        acc_lo, acc_hi = _segments_tile(acc_lo, acc_hi, a, b, e, n0, k0, N, K, P, S, padded_end_ptr, sa_ptrs,
                                        sb_lo_ptrs, sb_hi_ptrs, a_ok, lo_ok, hi_ok, stride_an, stride_bk, stride_sap,
                                        stride_sbp, stride_sas, stride_sbs, stride_pes, BLOCK_M, SPLIT_N, USE_TMA,
                                        PIN, ROWWISE, PROMOTE_K)  # fmt: skip
    else:
        step_lo, step_hi = _token_steps(padded_end_ptr, e, P, BLOCK_K)
        acc_lo, acc_hi = _k_steps(acc_lo, acc_hi, a, b, n0, N, k0, K, step_lo, step_hi, sa_ptrs, sb_lo_ptrs,
                                  sb_hi_ptrs, a_ok, lo_ok, hi_ok, stride_an, stride_bk, stride_sap, stride_sbp,
                                  BLOCK_M, SPLIT_N, USE_TMA, PIN, ROWWISE, PROMOTE_K)  # fmt: skip
        if ROWWISE:  # this expert's scales: column e of (N, E) and (K, E)
            sa_e = tl.load(sa_ptrs + e * stride_sap, mask=a_ok, other=0.0)[:, None]
            acc_lo *= sa_e * tl.load(sb_lo_ptrs + e * stride_sbp, mask=lo_ok, other=0.0)[None, :]
            if SPLIT_N == 2:
                acc_hi *= sa_e * tl.load(sb_hi_ptrs + e * stride_sbp, mask=hi_ok, other=0.0)[None, :]
    _store_out(acc_lo, out_ptr, out_desc, e, n0, k0, N, K, stride_oe, stride_on, BLOCK_M, ACCUMULATE,
               STORE_TMA and out_desc is not None)  # fmt: skip
    if SPLIT_N == 2:
        _store_out(acc_hi, out_ptr, out_desc, e, n0, k0 + 128, N, K, stride_oe, stride_on, BLOCK_M,
                   ACCUMULATE, STORE_TMA and out_desc is not None)  # fmt: skip


@triton.jit
def _segments_tile(acc_lo, acc_hi, a, b, e, n0, k0, N, K, P, S, padded_end_ptr, sa_ptrs, sb_lo_ptrs, sb_hi_ptrs,
                   a_ok, lo_ok, hi_ok, stride_an, stride_bk, stride_sap, stride_sbp, stride_sas, stride_sbs,
                   stride_pes, BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, USE_TMA: tl.constexpr,
                   PIN: tl.constexpr, ROWWISE: tl.constexpr, PROMOTE_K: tl.constexpr):  # fmt: skip
    """One output tile summed over S segments (micro-batches): segment s reads rows s N + n of a,
    s K + k of b, its own padded ends and scales. Rowwise scales differ by segment but not along
    a segment's tokens: the accumulator is kept in the units of the last segment with tokens,
    rescaled by old / new scale when the next one starts, and scaled once at the end. The ratios
    are exact for power-of-two scales (else two roundings a segment), and they cannot overflow
    the accumulator unless a row's scale falls by more than 2**90 between two micro-batches."""
    BLOCK_K: tl.constexpr = 128
    prev_a = tl.full((BLOCK_M,), 1.0, tl.float32)  # acc is zero until a segment has tokens
    prev_lo = tl.full((128,), 1.0, tl.float32)
    prev_hi = tl.full((128,), 1.0, tl.float32)
    for s in range(S):
        step_lo, step_hi = _token_steps(padded_end_ptr + s * stride_pes, e, P, BLOCK_K)
        sa_s, sb_lo_s, sb_hi_s = sa_ptrs + s * stride_sas, sb_lo_ptrs + s * stride_sbs, sb_hi_ptrs + s * stride_sbs
        if step_hi > step_lo:
            if ROWWISE:  # scales are >= 2**-126 (kernels/common.py `tl_fp8_scale`): no zero divides
                sa = tl.load(sa_s + e * stride_sap, mask=a_ok, other=1.0)
                sb_lo = tl.load(sb_lo_s + e * stride_sbp, mask=lo_ok, other=1.0)
                ratio_a = tl.math.div_rn(prev_a, sa)[:, None]
                acc_lo *= ratio_a * tl.math.div_rn(prev_lo, sb_lo)[None, :]
                prev_a, prev_lo = sa, sb_lo
                if SPLIT_N == 2:
                    sb_hi = tl.load(sb_hi_s + e * stride_sbp, mask=hi_ok, other=1.0)
                    acc_hi *= ratio_a * tl.math.div_rn(prev_hi, sb_hi)[None, :]
                    prev_hi = sb_hi
            acc_lo, acc_hi = _k_steps(acc_lo, acc_hi, a, b, s * N + n0, (s + 1) * N, s * K + k0, (s + 1) * K, step_lo,
                                      step_hi, sa_s, sb_lo_s, sb_hi_s, a_ok, lo_ok, hi_ok, stride_an, stride_bk,
                                      stride_sap, stride_sbp, BLOCK_M, SPLIT_N, USE_TMA, PIN, ROWWISE,
                                      PROMOTE_K)  # fmt: skip
    if ROWWISE:
        acc_lo *= prev_a[:, None] * prev_lo[None, :]
        if SPLIT_N == 2:
            acc_hi *= prev_a[:, None] * prev_hi[None, :]
    return acc_lo, acc_hi


tuned_grouped_mm_wgrad = autotuned(
    _fp8_grouped_mm_wgrad_kernel, _wgrad_configs(triton_interpret()),
    ["N", "K", "USE_TMA", "ROWWISE", "PROMOTE_K", "SEGMENTED"],
)


def launch_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out, use_tma: bool, config: dict | None = None,
                            rowwise: bool = False, promotion_interval: int = 128,
                            accumulate: bool = False) -> None:  # fmt: skip
    """Write out (E, N, K) in place, every block (zeros for experts without tokens), or with
    `accumulate` add into it; config: one explicit autotune candidate's meta-parameters instead of
    the autotuner. An accumulating launch never autotunes (timing candidates would add the product
    once per run): it takes the config the autotuner chose for the same shapes (`_TUNED`).
    Segmented (`fp8_grouped_mm_wgrad_segments`): a_q (S, N, P), b_q (S, K, P), scales and
    padded_end with a leading S, out the sum over the S segments."""
    segmented = a_q.dim() == 3
    a_q, b_q = a_q.contiguous(), b_q.contiguous()
    S, N, P = a_q.shape if segmented else (1, *a_q.shape)
    K, E = b_q.shape[-2], padded_end.shape[-1]
    a_2d, b_2d = a_q.reshape(S * N, P), b_q.reshape(S * K, P)  # segment s: rows s N + n, s K + k
    a_arg, b_arg = (tensor_desc(a_2d), tensor_desc(b_2d)) if use_tma else (a_2d, b_2d)
    out_desc = out_tensor_desc(out) if use_tma else None
    # Blockwise: b's scales index the tile's columns in every K step; with stride 1 along K their
    # addresses are immediates off one register; a runtime stride keeps 64 pointer registers live
    # per 128 columns, and 128x256 tiles then spill ~500 bytes (ptxas -v). A (Pb, K) copy is
    # 2 MB at most. (Rowwise reads them once, in the epilogue.)
    if not rowwise and b_scale.stride(-2) != 1 and K > 1:
        b_scale = b_scale.transpose(-1, -2).contiguous().transpose(-1, -2)
    sms = num_sms(a_q.device)

    def grid(meta):
        tiles = E * triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, 128 * meta["SPLIT_N"])
        persistent = meta.get("PROGRAMS_PER_SM", 0)
        return (min(tiles, sms * persistent) if persistent else tiles,)

    seg_strides = (a_scale.stride(0), b_scale.stride(0), padded_end.stride(0)) if segmented else (0, 0, 0)
    args = (a_arg, a_scale, b_arg, b_scale, out, out_desc, padded_end, N, K, P, E, S, P, P,
            *a_scale.stride()[-2:], *b_scale.stride()[-2:], *seg_strides, out.stride(0), out.stride(1))  # fmt: skip
    meta = dict(ROWWISE=rowwise, PROMOTE_K=promote_k(promotion_interval), SEGMENTED=segmented)
    key = (N, K, use_tma, rowwise, meta["PROMOTE_K"], segmented)  # the autotuner's own key
    if accumulate and config is None:
        if key not in _TUNED:  # no plain launch has chosen yet (the trainer's first micro-batch does)
            launch_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end, torch.empty_like(out), use_tma,
                                    rowwise=rowwise, promotion_interval=promotion_interval)  # fmt: skip
        config = _TUNED[key]
    run_gemm(tuned_grouped_mm_wgrad, grid, args, use_tma, config, ACCUMULATE=accumulate, **meta)
    if config is None:
        tuned = tuned_grouped_mm_wgrad.best_config
        _TUNED[key] = {**tuned.kwargs, "num_warps": tuned.num_warps, "num_stages": tuned.num_stages}


# The autotuner's choice per key of launch_grouped_mm_wgrad, for accumulating launches.
_TUNED: dict[tuple, dict] = {}


def _launch_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise: bool,
                  promotion_interval: int = 128) -> torch.Tensor:  # fmt: skip
    """Both scalings' launchers, after their checks."""
    promote_k(promotion_interval)  # refused before anything is allocated
    E, N, K = padded_end.shape[0], a_q.shape[0], b_q.shape[0]
    out = torch.empty(E, N, K, dtype=out_dtype, device=a_q.device)
    if not run_wgrad(out, a_q, a_scale, b_q, b_scale, padded_end, rowwise, promotion_interval, accumulate=False):
        out.zero_()
    return out


def run_wgrad(out, a_q, a_scale, b_q, b_scale, padded_end, rowwise: bool, promotion_interval: int,
              accumulate: bool) -> bool:  # fmt: skip
    """Write (or add) the product into out on the faster path that takes it; False where there is
    nothing to compute (no output or no tokens), out untouched. a_q (N, P) or segmented (S, N, P)."""
    if out.numel() == 0 or a_q.shape[-1] == 0:
        return False
    check_tma_aligned(a_q=a_q, b_q=b_q)
    launch_on_path(
        "fp8_grouped_mm_wgrad",
        lambda tma: launch_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out, tma, rowwise=rowwise,
                                            promotion_interval=promotion_interval, accumulate=accumulate),  # fmt: skip
    )
    return True


def triton_fp8_grouped_mm_wgrad(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, promotion_interval: int = 128,
) -> torch.Tensor:  # fmt: skip
    """out (E, N, K): out[e] = sum over tokens p of group e of dequant(a)[:, p] dequant(b)[:, p]^T,
    promoted into fp32 every `promotion_interval` products (kernels/grouped_gemm.py).

    a_q (N, P) fp8 row-major (tokens contiguous), a_scale (N, Pb) fp32 (1x128 tiles along
    tokens), b_q (K, P) fp8, b_scale (K, Pb) fp32, padded_end (E,) int32 cumulative group ends
    along P, each a multiple of 128 (not checked: that would need a host sync), groups may be
    empty (their block is written as zeros). P must be a multiple of 128.
    """
    check_grouped_mm_wgrad_args(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=False)
    return _launch_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=False,
                         promotion_interval=promotion_interval)  # fmt: skip


def triton_fp8_grouped_mm_wgrad_rowwise(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # fmt: skip
    """`fp8_grouped_mm_wgrad` with per-group row scales: a_scale (N, E), b_scale (K, E) (the
    rowwise recipe's column copies), out[e] = (a_q[:, tokens of e] @ b_q[:, tokens of e].T)
    * a_scale[:, e, None] * b_scale[None, :, e]. Writes fp32 directly, where CUTLASS's
    `torch._scaled_grouped_mm` writes bf16 only (a cast and a bf16 copy held for fp32 masters).
    """
    check_grouped_mm_wgrad_args(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=True)
    return _launch_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=True)


def fp8_grouped_mm_wgrad_accumulate_(
    into: torch.Tensor, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
    padded_end: torch.Tensor, rowwise: bool, promotion_interval: int = 128,
) -> None:  # fmt: skip
    """into (E, N, K), fp32, += the weight gradient of `fp8_grouped_mm_wgrad` (or, rowwise, of
    its rowwise twin) in the GEMM's epilogue: a gradient accumulated over micro-batches costs one
    read and one write of into, where a product written and then added costs two more passes.
    In eager mode only (a custom op may not mutate what the graph reads as a leaf's gradient);
    where no kernel runs, into += the reference."""
    check_grouped_mm_wgrad_args(a_q, a_scale, b_q, b_scale, padded_end, torch.float32, rowwise=rowwise)
    promote_k(promotion_interval)
    check_wgrad_into(into, (padded_end.shape[0], a_q.shape[0], b_q.shape[0]), a_q.device)
    if not use_triton(a_q):
        ref = torch_fp8_grouped_mm_wgrad_rowwise if rowwise else torch_fp8_grouped_mm_wgrad
        into.add_(ref(a_q, a_scale, b_q, b_scale, padded_end, torch.float32))
        return
    run_wgrad(into, a_q, a_scale, b_q, b_scale, padded_end, rowwise, promotion_interval, accumulate=True)


def check_wgrad_into(into: torch.Tensor, shape: tuple[int, int, int], device: torch.device) -> None:
    """A weight gradient to add into: a contiguous fp32 (E, N, K) tensor on the operands' device."""
    if into.dtype != torch.float32 or tuple(into.shape) != shape or not into.is_contiguous() or into.device != device:
        raise ValueError(f"into must be a contiguous float32 {shape} tensor on {device}, got {into.dtype} "
                         f"{tuple(into.shape)} on {into.device} (contiguous={into.is_contiguous()})")  # fmt: skip


def _fake_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16):
    return a_q.new_empty(padded_end.shape[0], a_q.shape[0], b_q.shape[0], dtype=out_dtype)


def _fake_wgrad_blockwise(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16, promotion_interval=128):
    promote_k(promotion_interval)
    return _fake_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype)


def _reference_wgrad_blockwise(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16,
                               promotion_interval=128):  # fmt: skip
    """kernels/reference_gemm.py's reference: exact fp32 sums, so every interval gives the same."""
    promote_k(promotion_interval)
    return torch_fp8_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype)


fp8_grouped_mm_wgrad = kernel_op(
    "fp8_grouped_mm_wgrad", triton_fp8_grouped_mm_wgrad, _fake_wgrad_blockwise, _reference_wgrad_blockwise
)
fp8_grouped_mm_wgrad_rowwise = kernel_op(
    "fp8_grouped_mm_wgrad_rowwise", triton_fp8_grouped_mm_wgrad_rowwise, _fake_wgrad,
    torch_fp8_grouped_mm_wgrad_rowwise,
)  # fmt: skip
