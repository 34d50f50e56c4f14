"""FP8 grouped GEMMs with DeepSeek-V3 blockwise scales: E4M3 operands, fp32 accumulation; the
2d x 3d GEMM (forward and dgrad) and what both grouped GEMMs share (tile loads, configs, the
memory path). The 2d x 2d weight-gradient GEMM: kernels/grouped_gemm_wgrad.py.

Shape letters (README.md): M routed rows (grouped by expert), K reduction dim, N output dim,
E experts, P padded rows; Kb, Nb, Pb = K, N, P // 128 scale blocks. Every operand is K-major (the
reduction dim is contiguous), the only layout Hopper's fp8 wgmma accepts, so no kernel transposes
anything.

    fp8_grouped_mm(a_q_MK, a_scale_MKb, b_q_ENK, b_scale_ENbKb, group_end_E, out_dtype)
        -> out_MN,  out[rows of e] = dequant(a rows) @ dequant(b[e]).T
        forward GEMM1/GEMM2, and the dgrads with a pre-transposed contiguous weight copy.
    fp8_grouped_mm_wgrad(a_q_NP, a_scale_NPb, b_q_KP, b_scale_KPb, padded_end_E, out_dtype)
        -> out_ENK, out[e] = dequant(a[:, tokens of e]) @ dequant(b[:, tokens of e]).T
        the weight gradient dW_e = dY_e^T X_e, tokens padded per expert to multiples of 128.
    fp8_grouped_mm_wgrad_rowwise(a_q_NP, a_scale_NE, b_q_KP, b_scale_KE, padded_end_E, out_dtype)
        the same GEMM with the rowwise recipe's scales: one per row and expert group.

Scales are dequantization multipliers (x ~= q * scale, see kernels/common.py): 1x128 tiles for
activations (a_scale[m, k // 128]), 128x128 blocks for weights (b_scale[e, n // 128, k // 128]);
in the rowwise weight gradient, a_scale[n, e] and b_scale[k, e] for the tokens of group e.

Scale promotion (DeepSeek-V3): the K loop steps 128 at a time, one scale block per step. Each
step's fp8 dot starts from zero (Hopper's tensor core keeps ~14 mantissa bits while it sums fp8
products, so it never sums more than 128 of them) and its fp32 result is promoted:
acc += dot(a_blk, b_blk) * sa[:, None] * sb[None, :]. A tile's N side is SPLIT_N halves of 128
columns with their own accumulators, so each half meets one weight block (a scalar scale: one
FMA per element) and a 128x256 tile holds 3 fp32 tiles in registers, not 4. `promotion_interval`
(32 or 64; an ablation knob, fp8.promotion_interval) promotes more often, inside each step:
Triton's max_num_imprecise_acc makes the tensor core start a fresh partial sum every that many
K elements and adds it into an fp32 one; 128 (the default) leaves each step's dot to Triton's own
default, one unpromoted sum of 128 products. The pure-torch references sum exactly in fp32
whatever the interval: it only changes what the tensor core rounds.

2d x 3d schedule (group sizes stay on the device, no host sync): a persistent grid of
PROGRAMS_PER_SM x #SMs programs. Each loads group_end once (E_PAD lanes), adds a pseudo-group
for the rows past group_end[-1] (written as zeros, never garbage), and computes on device the
M-tiles per group, their inclusive cumsum and the total. It walks the concatenated M-tiles of
all groups x N-tiles with stride #programs, GROUP_M-swizzled for L2 reuse; a tile finds its
group by one compare-and-sum over the cumsum, so no M-tile spans two groups (rows of the next
group that a TMA load brings in are computed and masked at the store). The host bounds the
tile count by (cdiv(M, BM) + E + 1) x N-tiles only to size the grid.

Memory path: TMA through host-side `TensorDescriptor`s (the API is the same in triton 3.6 and
3.9), or masked pointer loads. The TMA path is tried once per kernel at its first launch; if it
raises, the pointer path is used from then on and a warning is logged (`_PATH` records the
choice). FP8MOE_GEMM_PATH=tma|pointer forces one path.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import triton
import triton.language as tl

from kernels.common import triton_interpret
from kernels.contracts import GEMM_SCALE_BLOCK, check_grouped_mm_args
from kernels.dispatch import kernel_op
from kernels.reference_gemm import torch_fp8_grouped_mm

# K elements the tensor core sums before promotion into fp32 (module docstring); wgmma takes 32
# fp8 products per instruction and Triton accepts at most the dot's K, one 128-wide step.
PROMOTION_INTERVALS = (32, 64, 128)

try:  # host-side TMA descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer path only
    TensorDescriptor = None

log = logging.getLogger(__name__)


# ---- configs: small lists, tuned once per (N, K, path) --------------------------------------
# What the sm_90a code looks like (triton 3.9 TTGIR/PTX/SASS, `ptxas -v`; to re-check on 3.6):
# Triton waits on each fresh fp8 wgmma at once (`warp_group_dot_wait {pendings = 0}`) and puts a
# CTA-wide bar.sync before each wgmma, so inside one CTA the promotion FMAs never overlap the
# tensor cores (automatic warp specialization is Blackwell-only); two CTAs on one SM do overlap.
# Candidates: 128x256 with 8 warps (fewest L2 bytes per flop; 245-248 registers, no spills) at
# 3 or 4 stages, and 64x128 with 4 warps, two CTAs per SM (96 KB shared memory, ~170 registers x
# 128 threads each), which wins where experts are narrow (bench/NOTES.md, the GEMM sweep).


def gemm_config(block_m, split_n, warps, stages, programs_per_sm=None, group_m=8) -> triton.Config:
    """One autotune candidate; programs_per_sm: the persistent 2d x 3d kernel only."""
    meta = dict(BLOCK_M=block_m, SPLIT_N=split_n, GROUP_M=group_m)
    if programs_per_sm is not None:
        meta["PROGRAMS_PER_SM"] = programs_per_sm
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _mm_configs(interpret: bool) -> list[triton.Config]:
    if interpret:  # one config: the interpreter cannot time anything
        return [gemm_config(64, 1, 4, 1, programs_per_sm=1, group_m=2)]
    return [gemm_config(128, 2, 8, 3, 1), gemm_config(128, 2, 8, 4, 1), gemm_config(64, 1, 4, 4, 2)]


def _set_block_shapes(nargs):
    """Autotune pre-hook: host TMA descriptors take their block shape from the chosen config."""
    if nargs["USE_TMA"]:
        nargs["a"].block_shape = [nargs["BLOCK_M"], GEMM_SCALE_BLOCK]
        nargs["b"].block_shape = [GEMM_SCALE_BLOCK, GEMM_SCALE_BLOCK]  # one 128-row half at a time
    if nargs.get("out_desc") is not None:  # the wgrad's (E, N, K) output, 64-column subtiles
        nargs["out_desc"].block_shape = [1, nargs["BLOCK_M"], 64]


def autotuned(kernel, configs: list[triton.Config], key: list[str]):
    for c in configs:
        c.pre_hook = _set_block_shapes
    return triton.autotune(configs=configs, key=key)(kernel)


# ---- shared device helpers -------------------------------------------------------------------


def promote_k(promotion_interval: int) -> int:
    """The kernels' PROMOTE_K for an interval: 0 for 128, which keeps Triton's default (an
    explicit 128 would add a partial-sum register tile for the same arithmetic)."""
    if promotion_interval not in PROMOTION_INTERVALS:
        raise ValueError(f"promotion_interval must be one of {PROMOTION_INTERVALS}, got {promotion_interval!r}")
    return 0 if promotion_interval == 128 else promotion_interval


@triton.jit
def tl_fp8_dot(a, b, PROMOTE_K: tl.constexpr):
    """fp32 a @ b of one 128-wide K step; PROMOTE_K > 0: promoted into fp32 every PROMOTE_K
    products (module docstring)."""
    if PROMOTE_K:
        d = tl.dot(a, b, max_num_imprecise_acc=PROMOTE_K)
    else:
        d = tl.dot(a, b)
    return d


@triton.jit
def tl_load_tile(src, row0, col0, n_rows, stride, BR: tl.constexpr, BC: tl.constexpr,
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
def tl_pin(x, ENABLE: tl.constexpr):
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
def tl_swizzle(tile, m_tiles, n_tiles, GROUP_M: tl.constexpr):
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
    USE_TMA: tl.constexpr, PIN: tl.constexpr, PROMOTE_K: tl.constexpr,
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
        mt, nt = tl_swizzle(tile, m_tiles, n_tiles, GROUP_M)
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
            a_t = tl_load_tile(a, row0, ks * BLOCK_K, M, stride_am, BLOCK_M, BLOCK_K, USE_TMA)
            sa = tl.load(sa_ptrs + ks * stride_sak, mask=rows < M, other=0.0)
            # one weight block per half: its scale folds into the row scales, one FMA/element
            b_lo = tl_load_tile(b, b_row0, ks * BLOCK_K, E * N, stride_bn, 128, BLOCK_K, USE_TMA)
            sb_lo = tl.load(sb_ptr + ks * stride_sbk)
            acc_lo += tl_fp8_dot(a_t, b_lo.T, PROMOTE_K) * (sa * sb_lo)[:, None]
            if SPLIT_N == 2:
                acc_lo = tl_pin(acc_lo, PIN)
                b_hi = tl_load_tile(b, b_row0 + 128, ks * BLOCK_K, E * N, stride_bn, 128, BLOCK_K,
                                  USE_TMA)
                # no second half at the right edge: read the first half's scale (stays in
                # bounds; that half is computed on zero-padded rows and never stored)
                sb_hi = tl.load(sb_ptr + tl.where(has_hi, stride_sbn, 0) + ks * stride_sbk)
                acc_hi += tl_fp8_dot(a_t, b_hi.T, PROMOTE_K) * (sa * sb_hi)[:, None]

        cols = n0 + tl.arange(0, 128)
        out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
        row_ok = (rows < row_end)[:, None]
        tl.store(out_ptrs, acc_lo.to(out_ptr.dtype.element_ty), mask=row_ok)
        if SPLIT_N == 2:
            tl.store(out_ptrs + 128, acc_hi.to(out_ptr.dtype.element_ty),
                     mask=row_ok & (cols + 128 < N)[None, :])


tuned_grouped_mm = autotuned(
    _fp8_grouped_mm_kernel, _mm_configs(triton_interpret()), ["N", "K", "USE_TMA", "PROMOTE_K"]
)


# ---- path selection: TMA once, pointer fallback ----------------------------------------------

_PATH: dict[str, str] = {}  # kernel name -> "tma" | "pointer", fixed at the first launch


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, so the persistent loop takes several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def tensor_desc(t: torch.Tensor):
    # block shape is a placeholder; the autotune pre-hook sets it from the config
    return TensorDescriptor.from_tensor(t, [GEMM_SCALE_BLOCK, GEMM_SCALE_BLOCK])


def out_tensor_desc(out: torch.Tensor):
    """A TMA descriptor over a 3-d output, or None where TMA cannot address it (a start or a row
    stride that is not 16-byte aligned): the kernel then stores through pointers."""
    if TensorDescriptor is None or out.data_ptr() % 16 or any(s * out.element_size() % 16 for s in out.stride()[:-1]):
        return None
    return TensorDescriptor.from_tensor(out, [1, 64, 64])  # placeholder, as tensor_desc


def launch_on_path(name: str, launch: Callable[[bool], None]) -> None:
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
                        name, type(err).__name__, err)  # fmt: skip
            _PATH[name] = "pointer"
            launch(False)
    log.info("%s: using the %s path", name, _PATH[name])


def check_tma_aligned(**tensors: torch.Tensor) -> None:
    for field, t in tensors.items():
        if t.data_ptr() % 16:  # TMA needs it; torch allocations always are, views may not be
            raise ValueError(f"{field} must start 16-byte aligned (got a view at byte offset "
                             f"{t.storage_offset() * t.element_size()})")  # fmt: skip


def run_gemm(kernel, grid, args, use_tma: bool, config: dict | None, **meta) -> None:
    """Launch through the autotuner, or with one explicit config (tests and benchmarks)."""
    meta["PIN"] = not triton_interpret()
    if config is None:
        kernel[grid](*args, USE_TMA=use_tma, **meta)
        return
    config = dict(config)
    warps, stages = config.pop("num_warps", 8), config.pop("num_stages", 3)
    nargs = dict(zip(kernel.fn.arg_names, args), USE_TMA=use_tma, **config)
    _set_block_shapes(nargs)
    kernel.fn[grid](*args, USE_TMA=use_tma, num_warps=warps, num_stages=stages, **config, **meta)


# ---- 2d x 3d launcher and entry point --------------------------------------------------------


def launch_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out, use_tma: bool, config: dict | None = None,
                      promotion_interval: int = 128) -> None:  # fmt: skip
    """Write out (M, N) in place (rows past group_end[-1] get zeros); config: one explicit
    autotune candidate's meta-parameters instead of the autotuner (tests and benchmarks)."""
    (M, K), (E, N, _) = a_q.shape, b_q.shape
    a_q = a_q.contiguous()
    b_2d = b_q.contiguous().view(E * N, K)
    a_arg, b_arg = (tensor_desc(a_q), tensor_desc(b_2d)) if use_tma else (a_q, b_2d)
    sms = num_sms(a_q.device)

    def grid(meta):
        n_tiles = triton.cdiv(N, 128 * meta["SPLIT_N"])
        bound = (triton.cdiv(M, meta["BLOCK_M"]) + E + 1) * n_tiles
        return (max(1, min(sms * meta["PROGRAMS_PER_SM"], bound)),)

    args = (a_arg, a_scale, b_arg, b_scale, out, group_end, M, N, K, E, K, K,
            a_scale.stride(0), a_scale.stride(1), *b_scale.stride(), out.stride(0))  # fmt: skip
    if config is not None:
        config = {"PROGRAMS_PER_SM": 1, **config}
    run_gemm(tuned_grouped_mm, grid, args, use_tma, config, E_PAD=triton.next_power_of_2(E + 1),
             PROMOTE_K=promote_k(promotion_interval))  # fmt: skip


def triton_fp8_grouped_mm(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, group_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, promotion_interval: int = 128,
) -> torch.Tensor:  # fmt: skip
    """out (M, N): out[rows of e] = dequant(a_q rows) @ dequant(b_q[e]).T; fp32 accumulation,
    promoted every `promotion_interval` products (module docstring).

    a_q (M, K) fp8 row-major, a_scale (M, Kb) fp32 (any strides: a column-major view,
    `scale_KbM.t()`, gives coalesced scale loads), b_q (E, N, K) fp8 (nn.Linear layout per
    expert; pass a transposed contiguous copy for dgrad), b_scale (E, Nb, Kb) fp32, group_end
    (E,) int32 cumulative row ends on the device, non-decreasing, any group sizes. Rows past
    group_end[-1] are written as zeros. K and N must be multiples of 128.
    """
    check_grouped_mm_args(a_q, a_scale, b_q, b_scale, group_end, out_dtype)
    promote_k(promotion_interval)  # refused before anything is allocated
    out = torch.empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype, device=a_q.device)
    if out.numel() == 0 or b_q.shape[0] == 0 or a_q.shape[1] == 0:
        return out.zero_()
    check_tma_aligned(a_q=a_q, b_q=b_q)
    launch_on_path(
        "fp8_grouped_mm",
        lambda tma: launch_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out, tma,
                                      promotion_interval=promotion_interval),  # fmt: skip
    )
    return out


def _fake_fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype=torch.bfloat16, promotion_interval=128):
    check_grouped_mm_args(a_q, a_scale, b_q, b_scale, group_end, out_dtype)
    promote_k(promotion_interval)
    return a_q.new_empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype)


def _reference_fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype=torch.bfloat16, promotion_interval=128):
    """kernels/reference_gemm.py's reference: exact fp32 sums, so every interval gives the same."""
    promote_k(promotion_interval)
    return torch_fp8_grouped_mm(a_q, a_scale, b_q, b_scale, group_end, out_dtype)


fp8_grouped_mm = kernel_op(
    "fp8_grouped_mm", triton_fp8_grouped_mm, _fake_fp8_grouped_mm, _reference_fp8_grouped_mm
)
