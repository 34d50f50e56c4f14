"""FP8 grouped GEMMs with DeepSeek-V3 blockwise scales: E4M3 operands, fp32 accumulation.

Shape letters: M routed rows, K reduction dim, N output features, E experts, P padded tokens,
Kb = K // 128 and so on for scale blocks. Every operand is K-major (the reduction dim is
contiguous), the only layout Hopper's fp8 wgmma accepts, so no kernel transposes anything.

    triton_fp8_grouped_mm(a_q_MK, a_scale_MKb, b_q_ENK, b_scale_ENbKb, group_end_E, out_dtype)
        -> out_MN,  out[rows of e] = dequant(a rows) @ dequant(b[e]).T
        forward GEMM1/GEMM2, and the dgrads with a pre-transposed contiguous weight copy.
    triton_fp8_grouped_mm_wgrad(a_q_NP, a_scale_NPb, b_q_KP, b_scale_KPb, padded_end_E, out_dtype)
        -> out_ENK, out[e] = dequant(a[:, tokens of e]) @ dequant(b[:, tokens of e]).T
        the weight gradient dW_e = dY_e^T X_e, tokens padded per expert to multiples of 128.
    triton_fp8_grouped_mm_wgrad_rowwise(a_q_NP, a_scale_NE, b_q_KP, b_scale_KE, padded_end_E, out_dtype)
        the same GEMM with the rowwise recipe's scales: one per row and expert group.

Scales are dequantization multipliers (x ~= q * scale, see kernels/common.py): 1x128 tiles for
activations (a_scale[m, k // 128]), 128x128 blocks for weights (b_scale[e, n // 128, k // 128]);
in the rowwise weight gradient, a_scale[n, e] and b_scale[k, e] for the tokens of group e.

Scale promotion (DeepSeek-V3): the K loop steps 128 at a time, one scale block per step. Each
step's fp8 dot starts from zero (Hopper's tensor core keeps ~14 mantissa bits while it sums fp8
products, so it never sums more than 128 of them) and its fp32 result is promoted:
acc += dot(a_blk, b_blk) * sa[:, None] * sb[None, :]. A tile's N side is SPLIT_N halves of 128
columns with their own accumulators, so each half meets one weight block (a scalar scale: one
FMA per element) and a 128x256 tile holds 3 fp32 tiles in registers, not 4. Rowwise weight
gradients keep the per-128 promotion (acc += dot: one FADD per element; triton leaves fp8 dots
with an imprecise-accumulation limit unfused with the add) and scale once, in the epilogue: their
scales are constant over an expert's tokens. (Blockwise promotion costs an FMUL + FFMA per
element and step there, which the CTA's wgmma waits on: 559 TFLOP/s at Mixtral against 845 for
the forward's one FFMA: torch.profiler over bench.moe_block, H200, commit ce4f306.)

2d x 3d schedule (group sizes stay on the device, no host sync): a persistent grid of
PROGRAMS_PER_SM x #SMs programs. Each loads group_end once (E_PAD lanes), adds a pseudo-group
for the rows past group_end[-1] (written as zeros, never garbage), and computes on device the
M-tiles per group, their inclusive cumsum and the total. It walks the concatenated M-tiles of
all groups x N-tiles with stride #programs, GROUP_M-swizzled for L2 reuse; a tile finds its
group by one compare-and-sum over the cumsum, so no M-tile spans two groups (rows of the next
group that a TMA load brings in are computed and masked at the store). The host bounds the
tile count by (cdiv(M, BM) + E + 1) x N-tiles only to size the grid.

2d x 2d (wgrad) schedule: the tile set E x cdiv(N, BM) x cdiv(K, 128 SPLIT_N) is static, one
program per tile (the block scheduler balances experts of different token counts); only the
expert's token range is read on device. An expert without tokens runs no K step and writes
its zero block.

Memory path: TMA through host-side `TensorDescriptor`s (the API is the same in triton 3.6 and
3.9), or masked pointer loads. The TMA path is tried once per kernel at its first launch; if it
raises, the pointer path is used from then on and a warning is logged (`_PATH` records the
choice). FP8MOE_GEMM_PATH=tma|pointer forces one path.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, triton_interpret, use_triton
from kernels.reference import torch_fp8_grouped_mm, torch_fp8_grouped_mm_wgrad, torch_fp8_grouped_mm_wgrad_rowwise

try:  # host-side TMA descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer path only
    TensorDescriptor = None

log = logging.getLogger(__name__)

SCALE_BLOCK = 128  # one scale per 128 elements of K (activations) and 128x128 (weights)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- configs: small lists, tuned once per (N, K, path) --------------------------------------
# What the sm_90a code looks like (triton 3.9 TTGIR/PTX/SASS, `ptxas -v`; to re-check on 3.6):
# Triton waits on each fresh fp8 wgmma at once (`warp_group_dot_wait {pendings = 0}`) and puts a
# CTA-wide bar.sync before each wgmma, so inside one CTA the promotion FMAs never overlap the
# tensor cores (automatic warp specialization is Blackwell-only); two CTAs on one SM do overlap.
# Candidates: 128x256 with 8 warps (fewest L2 bytes per flop; 245-248 registers, no spills),
# 128x128 with 8 warps (188-198 registers), and 64x128 with 4 warps, two CTAs per SM (96 KB
# shared memory, ~170 registers x 128 threads each).


def _cfg(block_m, split_n, warps, stages, programs_per_sm=None, group_m=8):
    meta = dict(BLOCK_M=block_m, SPLIT_N=split_n, GROUP_M=group_m)
    if programs_per_sm is not None:  # the persistent 2d x 3d kernel only
        meta["PROGRAMS_PER_SM"] = programs_per_sm
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _mm_configs(interpret: bool) -> list[triton.Config]:
    if interpret:  # one config: the interpreter cannot time anything
        return [_cfg(64, 1, 4, 1, programs_per_sm=1, group_m=2)]
    return [_cfg(128, 2, 8, 3, 1), _cfg(128, 2, 8, 4, 1), _cfg(128, 1, 8, 4, 1),
            _cfg(64, 1, 4, 4, 2)]


def _wgrad_configs(interpret: bool) -> list[triton.Config]:
    if interpret:
        return [_cfg(64, 1, 4, 1, group_m=2)]
    return [_cfg(128, 2, 8, 3), _cfg(128, 1, 8, 4), _cfg(64, 1, 4, 4)]


def _set_block_shapes(nargs):
    """Autotune pre-hook: host TMA descriptors take their block shape from the chosen config."""
    if nargs["USE_TMA"]:
        nargs["a"].block_shape = [nargs["BLOCK_M"], SCALE_BLOCK]
        nargs["b"].block_shape = [SCALE_BLOCK, SCALE_BLOCK]  # one 128-row half at a time


def _autotuned(kernel, configs: list[triton.Config], key: list[str]):
    for c in configs:
        c.pre_hook = _set_block_shapes
    return triton.autotune(configs=configs, key=key)(kernel)


# ---- shared device helpers -------------------------------------------------------------------


@triton.jit
def _load_tile(src, row0, col0, n_rows, stride, BR: tl.constexpr, BC: tl.constexpr,
               USE_TMA: tl.constexpr):
    """A (BR, BC) fp8 tile at (row0, col0); rows >= n_rows read as 0 (TMA pads them likewise)."""
    if USE_TMA:
        tile = src.load([row0, col0])
    else:
        rows = row0 + tl.arange(0, BR)
        cols = col0 + tl.arange(0, BC)
        ptrs = src + rows[:, None].to(tl.int64) * stride + cols[None, :]
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    return tile


@triton.jit
def _pin(x, ENABLE: tl.constexpr):
    """Identity through a volatile asm mov, so LLVM cannot sink the arithmetic producing x past
    the next wgmma. Without it the first half's promotion FMAs were scheduled after the second
    half's wgmma, keeping both dot results live: the 128x256 forward spilled 196 bytes inside
    the K loop; with it, 245 registers and no spills (ptxas -v, sm_90a). Off in the
    interpreter, which cannot run inline asm."""
    if ENABLE:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=False, pack=1)
    return x


@triton.jit
def _swizzle(tile, m_tiles, n_tiles, GROUP_M: tl.constexpr):
    """Map a linear tile id to (m tile, n tile), GROUP_M m-tiles per band, for L2 reuse."""
    band = GROUP_M * n_tiles
    first_m = (tile // band) * GROUP_M
    band_m = tl.minimum(m_tiles - first_m, GROUP_M)
    mt = first_m + (tile % band) % band_m
    nt = (tile % band) // band_m
    return mt, nt


# ---- 2d x 3d: out_MN = a_MK @ b_ENK[e].T per group --------------------------------------------


@triton.jit
def _fp8_grouped_mm_kernel(
    a, a_scale_ptr, b, b_scale_ptr, out_ptr, group_end_ptr,
    M, N, K, E,
    stride_am, stride_bn,
    stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
    stride_om,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher's grid only
    USE_TMA: tl.constexpr, PIN: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    BLOCK_N: tl.constexpr = 128 * SPLIT_N  # SPLIT_N halves of one weight-scale block each
    # group table, E experts + the tail (g == E) of rows past group_end[E-1], all clamped to M
    g = tl.arange(0, E_PAD)
    ends = tl.minimum(tl.load(group_end_ptr + g, mask=g < E, other=M), M)
    starts = tl.load(group_end_ptr + g - 1, mask=(g >= 1) & (g <= E), other=0)
    starts = tl.where(g > E, M, tl.minimum(starts, M))
    m_tiles_g = tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M)
    m_tiles_end = tl.cumsum(m_tiles_g, 0)  # inclusive
    m_tiles = tl.sum(m_tiles_g)
    n_tiles = tl.cdiv(N, BLOCK_N)

    for tile in tl.range(tl.program_id(0), m_tiles * n_tiles, tl.num_programs(0)):
        mt, nt = _swizzle(tile, m_tiles, n_tiles, GROUP_M)
        e = tl.sum((m_tiles_end <= mt).to(tl.int32))  # the group holding m-tile mt
        here = g == e
        row0 = tl.sum(tl.where(here, starts + (mt - m_tiles_end + m_tiles_g) * BLOCK_M, 0))
        row_end = tl.sum(tl.where(here, ends, 0))
        k_steps = tl.where(e < E, K // BLOCK_K, 0)  # the tail group only writes zeros
        n0 = nt * BLOCK_N
        b_row0 = e * N + n0

        rows = row0 + tl.arange(0, BLOCK_M)
        sa_ptrs = a_scale_ptr + rows.to(tl.int64) * stride_sam
        sb_ptr = b_scale_ptr + e.to(tl.int64) * stride_sbe + (n0 // 128) * stride_sbn
        has_hi = n0 + 128 < N  # the second half exists (N is a multiple of 128, not of 256)
        acc_lo = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
        for ks in range(0, k_steps):
            a_t = _load_tile(a, row0, ks * BLOCK_K, M, stride_am, BLOCK_M, BLOCK_K, USE_TMA)
            sa = tl.load(sa_ptrs + ks * stride_sak, mask=rows < M, other=0.0)
            # one weight block per half: its scale folds into the row scales, one FMA/element
            b_lo = _load_tile(b, b_row0, ks * BLOCK_K, E * N, stride_bn, 128, BLOCK_K, USE_TMA)
            sb_lo = tl.load(sb_ptr + ks * stride_sbk)
            acc_lo += tl.dot(a_t, b_lo.T) * (sa * sb_lo)[:, None]
            if SPLIT_N == 2:
                acc_lo = _pin(acc_lo, PIN)
                b_hi = _load_tile(b, b_row0 + 128, ks * BLOCK_K, E * N, stride_bn, 128, BLOCK_K,
                                  USE_TMA)
                # no second half at the right edge: read the first half's scale (stays in
                # bounds; that half is computed on zero-padded rows and never stored)
                sb_hi = tl.load(sb_ptr + tl.where(has_hi, stride_sbn, 0) + ks * stride_sbk)
                acc_hi += tl.dot(a_t, b_hi.T) * (sa * sb_hi)[:, None]

        cols = n0 + tl.arange(0, 128)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        row_ok = (rows < row_end)[:, None]
        tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=row_ok)
        if SPLIT_N == 2:
            tl.store(out_ptrs + 128, acc_hi.to(out_ptr.dtype.element_ty),
                     mask=row_ok & (cols + 128 < N)[None, :])


# ---- 2d x 2d: out_ENK[e] = a_NP[:, tokens of e] @ b_KP[:, tokens of e].T ----------------------


@triton.jit
def _fp8_grouped_mm_wgrad_kernel(
    a, a_scale_ptr, b, b_scale_ptr, out_ptr, padded_end_ptr,
    N, K, P,
    stride_an, stride_bk,
    stride_san, stride_sap, stride_sbk, stride_sbp,
    stride_oe, stride_on,
    BLOCK_M: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr, PIN: tl.constexpr, ROWWISE: tl.constexpr,
):
    """ROWWISE: scales (N, E) and (K, E), applied in the epilogue; else (N, P/128), (K, P/128)."""
    BLOCK_K: tl.constexpr = 128
    BLOCK_N: tl.constexpr = 128 * SPLIT_N
    n_tiles = tl.cdiv(N, BLOCK_M)
    k_tiles = tl.cdiv(K, BLOCK_N)
    pid = tl.program_id(0)
    e = pid // (n_tiles * k_tiles)
    nt, kt = _swizzle(pid % (n_tiles * k_tiles), n_tiles, k_tiles, GROUP_M)
    # token range of expert e in 128-token steps (ends are multiples of 128 by contract; stepping
    # by index keeps offsets provably 128-aligned, which the pointer path needs to vectorize)
    step_hi = tl.minimum(tl.load(padded_end_ptr + e), P) // BLOCK_K
    step_lo = tl.minimum(tl.load(padded_end_ptr + e - 1, mask=e > 0, other=0) // BLOCK_K, step_hi)

    n0 = nt * BLOCK_M
    k0 = kt * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_M)
    cols_lo = k0 + tl.arange(0, 128)
    cols_hi = cols_lo + 128
    sa_ptrs = a_scale_ptr + rows.to(tl.int64) * stride_san
    sb_lo_ptrs = b_scale_ptr + cols_lo.to(tl.int64) * stride_sbk
    sb_hi_ptrs = b_scale_ptr + cols_hi.to(tl.int64) * stride_sbk
    acc_lo = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for ps in range(step_lo, step_hi):  # an expert with no tokens: zero steps, zero block
        a_t = _load_tile(a, n0, ps * BLOCK_K, N, stride_an, BLOCK_M, BLOCK_K, USE_TMA)
        b_lo = _load_tile(b, k0, ps * BLOCK_K, K, stride_bk, 128, BLOCK_K, USE_TMA)
        if ROWWISE:
            acc_lo += tl.dot(a_t, b_lo.T)
        else:
            # each 128-token step is one scale tile of both operands: promote by the outer
            # product, (d * sa) * sb in place (a materialized sa x sb tile: 64 more registers)
            sa = tl.load(sa_ptrs + ps * stride_sap, mask=rows < N, other=0.0)
            sb_lo = tl.load(sb_lo_ptrs + ps * stride_sbp, mask=cols_lo < K, other=0.0)
            acc_lo += (tl.dot(a_t, b_lo.T) * sa[:, None]) * sb_lo[None, :]
        if SPLIT_N == 2:
            acc_lo = _pin(acc_lo, PIN)
            b_hi = _load_tile(b, k0 + 128, ps * BLOCK_K, K, stride_bk, 128, BLOCK_K, USE_TMA)
            if ROWWISE:
                acc_hi += tl.dot(a_t, b_hi.T)
            else:
                sb_hi = tl.load(sb_hi_ptrs + ps * stride_sbp, mask=cols_hi < K, other=0.0)
                acc_hi += (tl.dot(a_t, b_hi.T) * sa[:, None]) * sb_hi[None, :]
    if ROWWISE:  # this expert's scales: column e of (N, E) and (K, E)
        sa_e = tl.load(sa_ptrs + e * stride_sap, mask=rows < N, other=0.0)[:, None]
        acc_lo *= sa_e * tl.load(sb_lo_ptrs + e * stride_sbp, mask=cols_lo < K, other=0.0)[None, :]
        if SPLIT_N == 2:
            acc_hi *= sa_e * tl.load(sb_hi_ptrs + e * stride_sbp, mask=cols_hi < K, other=0.0)[None, :]

    out_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + rows[:, None].to(tl.int64) * stride_on
                + cols_lo[None, :])
    row_ok = (rows < N)[:, None]
    tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=row_ok & (cols_lo < K)[None, :])
    if SPLIT_N == 2:
        tl.store(out_ptrs + 128, acc_hi.to(out_ptr.dtype.element_ty),
                 mask=row_ok & (cols_hi < K)[None, :])


_grouped_mm = _autotuned(_fp8_grouped_mm_kernel, _mm_configs(triton_interpret()), ["N", "K", "USE_TMA"])
_grouped_mm_wgrad = _autotuned(_fp8_grouped_mm_wgrad_kernel, _wgrad_configs(triton_interpret()),
                               ["N", "K", "USE_TMA", "ROWWISE"])


# ---- path selection: TMA once, pointer fallback ----------------------------------------------

_PATH: dict[str, str] = {}  # kernel name -> "tma" | "pointer", fixed at the first launch


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, so the persistent loop takes several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _desc(t: torch.Tensor):
    # block shape is a placeholder; the autotune pre-hook sets it from the config
    return TensorDescriptor.from_tensor(t, [SCALE_BLOCK, SCALE_BLOCK])


def _launch_with_path(name: str, launch) -> None:
    """Run launch(use_tma) on the path chosen at this kernel's first launch."""
    forced = os.environ.get("FP8MOE_GEMM_PATH")
    if forced not in (None, "", "tma", "pointer"):
        raise ValueError(f"FP8MOE_GEMM_PATH must be 'tma' or 'pointer', got {forced!r}")
    path = forced or _PATH.get(name)
    if path is not None:
        launch(path == "tma" and TensorDescriptor is not None)
        return
    if TensorDescriptor is None:
        _PATH[name] = "pointer"
        launch(False)
    else:
        try:
            launch(True)
            _PATH[name] = "tma"
        except Exception as err:  # compile failure on this triton: fall back for good, loudly
            log.warning("%s: TMA path failed (%s: %s); using pointer loads from now on",
                        name, type(err).__name__, err)
            _PATH[name] = "pointer"
            launch(False)
    log.info("%s: using the %s path", name, _PATH[name])


def _check_aligned(**tensors: torch.Tensor) -> None:
    for field, t in tensors.items():
        if t.data_ptr() % 16:  # TMA needs it; torch allocations always are, views may not be
            raise ValueError(f"{field} must start 16-byte aligned (got a view at byte offset "
                             f"{t.storage_offset() * t.element_size()})")


# ---- 2d x 3d launcher ------------------------------------------------------------------------


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_common(a_q, a_scale, b_q, b_scale, ends, out_dtype, a_scale_shape, b_scale_shape):
    _expect(a_q.dtype == FP8_DTYPE and b_q.dtype == FP8_DTYPE,
            f"a_q and b_q must be {FP8_DTYPE}, got {a_q.dtype}, {b_q.dtype}")
    _expect(tuple(a_scale.shape) == a_scale_shape and tuple(b_scale.shape) == b_scale_shape,
            f"a_scale must be {a_scale_shape} and b_scale {b_scale_shape}, got "
            f"{tuple(a_scale.shape)}, {tuple(b_scale.shape)}")
    _expect(a_scale.dtype == b_scale.dtype == torch.float32, "a_scale and b_scale must be float32")
    _expect(ends.dim() == 1 and ends.dtype in (torch.int32, torch.int64),
            f"group ends must be a 1-d int32 tensor, got {tuple(ends.shape)} {ends.dtype}")
    _expect(out_dtype in _OUT_DTYPES, f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def _check_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype):
    _expect(a_q.dim() == 2 and b_q.dim() == 3 and a_q.shape[1] == b_q.shape[2],
            f"a_q must be (M, K) and b_q (E, N, K), got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    (M, K), (E, N, _) = a_q.shape, b_q.shape
    _expect(K % 128 == 0 and N % 128 == 0, f"K and N must be multiples of 128, got K={K}, N={N}")
    _expect(group_end.shape == (E,), f"group_end must have shape ({E},), got {group_end.shape}")
    _check_common(a_q, a_scale, b_q, b_scale, group_end, out_dtype,
                  (M, K // 128), (E, N // 128, K // 128))


def _run(autotuned, grid, args, use_tma: bool, config: dict | None, **meta) -> None:
    """Launch through the autotuner, or with one explicit config (tests and benchmarks)."""
    meta["PIN"] = not triton_interpret()
    if config is None:
        autotuned[grid](*args, USE_TMA=use_tma, **meta)
        return
    config = dict(config)
    warps, stages = config.pop("num_warps", 8), config.pop("num_stages", 3)
    nargs = dict(a=args[0], b=args[2], USE_TMA=use_tma, **config)
    _set_block_shapes(nargs)
    autotuned.fn[grid](*args, USE_TMA=use_tma, num_warps=warps, num_stages=stages, **config, **meta)


def _launch_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out, use_tma: bool,
                       config: dict | None = None) -> None:
    """Write out (M, N) in place (rows past group_end[-1] get zeros)."""
    (M, K), (E, N, _) = a_q.shape, b_q.shape
    a_q = a_q.contiguous()
    b_2d = b_q.contiguous().view(E * N, K)
    a_arg, b_arg = (_desc(a_q), _desc(b_2d)) if use_tma else (a_q, b_2d)
    sms = _num_sms(a_q.device)

    def grid(meta):
        n_tiles = triton.cdiv(N, 128 * meta["SPLIT_N"])
        bound = (triton.cdiv(M, meta["BLOCK_M"]) + E + 1) * n_tiles
        return (max(1, min(sms * meta["PROGRAMS_PER_SM"], bound)),)

    args = (a_arg, a_scale, b_arg, b_scale, out, group_end, M, N, K, E, K, K,
            a_scale.stride(0), a_scale.stride(1), *b_scale.stride(), out.stride(0))
    if config is not None:
        config = {"PROGRAMS_PER_SM": 1, **config}
    _run(_grouped_mm, grid, args, use_tma, config, E_PAD=triton.next_power_of_2(E + 1))


def _fp8_grouped_mm_impl(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
    group_end: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out (M, N): out[rows of e] = dequant(a_q rows) @ dequant(b_q[e]).T; fp32 accumulation.

    a_q (M, K) fp8 row-major, a_scale (M, K//128) fp32 (any strides: a column-major view,
    `scale_KbM.t()`, gives coalesced scale loads), b_q (E, N, K) fp8 (nn.Linear layout per
    expert; pass a transposed contiguous copy for dgrad), b_scale (E, N//128, K//128) fp32,
    group_end (E,) int32 cumulative row ends on the device, non-decreasing, any group sizes.
    Rows past group_end[-1] are written as zeros. K and N must be multiples of 128.
    """
    _check_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype)
    if not use_triton(a_q):
        return torch_fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype)
    out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype, device=a_q.device)
    if out.numel() == 0 or b_q.shape[0] == 0 or a_q.shape[1] == 0:
        return out.zero_()
    _check_aligned(a_q=a_q, b_q=b_q)
    _launch_with_path(
        "fp8_grouped_mm",
        lambda tma: _launch_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out, tma),
    )
    return out


triton_fp8_grouped_mm = torch.library.custom_op("fp8moe::triton_fp8_grouped_mm", mutates_args=())(
    _fp8_grouped_mm_impl
)


@triton_fp8_grouped_mm.register_fake
def _(a_q, a_scale, b_q, b_scale, group_end, out_dtype=torch.bfloat16):
    return a_q.new_empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype)


# ---- 2d x 2d launcher ------------------------------------------------------------------------


def _check_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise: bool):
    _expect(a_q.dim() == 2 and b_q.dim() == 2 and a_q.shape[1] == b_q.shape[1],
            f"a_q must be (N, P) and b_q (K, P), got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    (N, P), K = a_q.shape, b_q.shape[0]
    _expect(P % 128 == 0, f"P (padded tokens) must be a multiple of 128, got {P}")
    per_scale = padded_end.shape[0] if rowwise else P // 128  # groups, or 128-token tiles
    _check_common(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, (N, per_scale), (K, per_scale))


def _launch_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out, use_tma: bool,
                  config: dict | None = None, rowwise: bool = False) -> None:
    """Write out (E, N, K) in place, every block (zeros for experts without tokens)."""
    (N, P), K, E = a_q.shape, b_q.shape[0], padded_end.shape[0]
    a_q, b_q = a_q.contiguous(), b_q.contiguous()
    a_arg, b_arg = (_desc(a_q), _desc(b_q)) if use_tma else (a_q, b_q)
    # Blockwise: b's scales index the tile's columns in every K step; with stride 1 along K their
    # addresses are immediates off one register; a runtime stride keeps 64 pointer registers live
    # per 128 columns, and 128x256 tiles then spill ~500 bytes (ptxas -v). A (P//128, K) copy is
    # 2 MB at most. (Rowwise reads them once, in the epilogue.)
    if not rowwise and b_scale.stride(0) != 1 and K > 1:
        b_scale = b_scale.t().contiguous().t()

    def grid(meta):
        return (E * triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, 128 * meta["SPLIT_N"]),)

    args = (a_arg, a_scale, b_arg, b_scale, out, padded_end, N, K, P, P, P,
            *a_scale.stride(), *b_scale.stride(), out.stride(0), out.stride(1))
    if config is not None:
        config = {k: v for k, v in config.items() if k != "PROGRAMS_PER_SM"}
    _run(_grouped_mm_wgrad, grid, args, use_tma, config, ROWWISE=rowwise)


def _fp8_grouped_mm_wgrad_impl(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
    padded_end: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out (E, N, K): out[e] = sum over tokens p of group e of dequant(a)[:, p] dequant(b)[:, p]^T.

    a_q (N, P) fp8 row-major (tokens contiguous), a_scale (N, P//128) fp32 (1x128 tiles along
    tokens), b_q (K, P) fp8, b_scale (K, P//128) fp32, padded_end (E,) int32 cumulative group
    ends along P, each a multiple of 128 (not checked: that would need a host sync), groups may
    be empty (their block is written as zeros). P must be a multiple of 128.
    """
    return _wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=False)


def _fp8_grouped_mm_wgrad_rowwise_impl(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
    padded_end: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`triton_fp8_grouped_mm_wgrad` with per-group row scales: a_scale (N, E), b_scale (K, E)
    (the rowwise recipe's column copies), out[e] = (a_q[:, tokens of e] @ b_q[:, tokens of e].T)
    * a_scale[:, e, None] * b_scale[None, :, e]. Writes fp32 directly, where CUTLASS's
    `torch._scaled_grouped_mm` writes bf16 only (a cast and a bf16 copy held for fp32 masters).
    """
    return _wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=True)


triton_fp8_grouped_mm_wgrad = torch.library.custom_op("fp8moe::triton_fp8_grouped_mm_wgrad", mutates_args=())(
    _fp8_grouped_mm_wgrad_impl
)
triton_fp8_grouped_mm_wgrad_rowwise = torch.library.custom_op(
    "fp8moe::triton_fp8_grouped_mm_wgrad_rowwise", mutates_args=()
)(_fp8_grouped_mm_wgrad_rowwise_impl)


def _wgrad_fake(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16):
    return a_q.new_empty(padded_end.shape[0], a_q.shape[0], b_q.shape[0], dtype=out_dtype)


triton_fp8_grouped_mm_wgrad.register_fake(_wgrad_fake)
triton_fp8_grouped_mm_wgrad_rowwise.register_fake(_wgrad_fake)


def _wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise: bool) -> torch.Tensor:
    """Both scalings: checks, the torch reference on a plain CPU, else the kernel."""
    _check_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise)
    if not use_triton(a_q):
        ref = torch_fp8_grouped_mm_wgrad_rowwise if rowwise else torch_fp8_grouped_mm_wgrad
        return ref(a_q, a_scale, b_q, b_scale, padded_end, out_dtype)
    E, N, K = padded_end.shape[0], a_q.shape[0], b_q.shape[0]
    out = torch.empty(E, N, K, dtype=out_dtype, device=a_q.device)
    if out.numel() == 0 or a_q.shape[1] == 0:
        return out.zero_()
    _check_aligned(a_q=a_q, b_q=b_q)
    _launch_with_path(
        "fp8_grouped_mm_wgrad",
        lambda tma: _launch_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out, tma, rowwise=rowwise),
    )
    return out


# ---- eager entry points --------------------------------------------------------------------------
# What the layer calls. Eager, the launcher itself: a custom op's eager dispatch costs 20-28 us of
# host time a call (H200 host, torch 2.11, tiny shapes, the same machine: blockwise grouped_mm
# 120 -> 102 us, wgrad 130 -> 102, rowwise wgrad 105 -> 82; a bare Triton launch 12 us). An FP8
# MoE layer at the parity model's width (dim 1024, 8 experts of 1536) is host-bound: its forward +
# backward took 4.01 -> 3.70 ms of host time blockwise (six GEMM calls), 3.66 -> 3.37 rowwise
# (two). While torch.compile traces, the custom op (its fake tensor rule is what the graph needs).


def fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype=torch.bfloat16) -> torch.Tensor:
    """`triton_fp8_grouped_mm`, without the op's dispatch in eager mode."""
    op = triton_fp8_grouped_mm if torch.compiler.is_compiling() else _fp8_grouped_mm_impl
    return op(a_q, a_scale, b_q, b_scale, group_end, out_dtype)


def fp8_grouped_mm_wgrad(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16) -> torch.Tensor:
    """`triton_fp8_grouped_mm_wgrad`, without the op's dispatch in eager mode."""
    op = triton_fp8_grouped_mm_wgrad if torch.compiler.is_compiling() else _fp8_grouped_mm_wgrad_impl
    return op(a_q, a_scale, b_q, b_scale, padded_end, out_dtype)


def fp8_grouped_mm_wgrad_rowwise(a_q, a_scale, b_q, b_scale, padded_end, out_dtype=torch.bfloat16) -> torch.Tensor:
    """`triton_fp8_grouped_mm_wgrad_rowwise`, without the op's dispatch in eager mode."""
    compiling = torch.compiler.is_compiling()
    op = triton_fp8_grouped_mm_wgrad_rowwise if compiling else _fp8_grouped_mm_wgrad_rowwise_impl
    return op(a_q, a_scale, b_q, b_scale, padded_end, out_dtype)
