"""Unpermute + weighted combine of the expert outputs in one pass, and its backward.

Legend: T tokens, K top-k, M = T*K permuted rows, H hidden.

    unpermute_combine(y_MH, row_of_TK, weights_TK, kept_TK) -> out_TH (y's dtype)
        out[t] = sum over kept k (k = 0..K-1, in that order) of w[t, k] * y[row_of_TK[t, k]], in fp32
    unpermute_combine_bwd(dout_TH, y_MH, row_of_TK, weights_TK, kept_TK) -> (dy_MH, dweights_TK)
        dy[row(t, k)] = w[t, k] * dout[t] (0 for a dropped (t, k)); dweights[t, k] = <dout[t], y[row(t, k)]>
    gather_sum(dx_MH, row_of_TK, kept_TK, out_dtype) -> dx_TH (out_dtype)
        dx[t] = sum over kept k of dx_MH[row_of_TK[t, k]], in fp32: the backward of the permutation
        (each token's K copies summed), the forward kernel without weights. out_dtype lets the
        gradient of an fp32 residual stream keep the fp32 sum of bf16 rows.

A gather formulation: one program per tile of tokens reads the K rows of each token, so there are
no atomics and the result is deterministic. Dropped assignments are masked before any load, so
their rows (which may hold garbage or NaN) and their row indices are never read.
Layout contract (moe/permute.py): when M == T*K, row_of_TK is a permutation of 0..M-1 (a dropped
assignment keeps its own row), so the backward writes every row of dy exactly once; for any other
M, dy starts from zeros.
`UnpermuteCombine` is the autograd Function the MoE layer uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_to_bf16_grid, triton_interpret, use_triton
from kernels.reference import torch_gather_sum, torch_unpermute_combine, torch_unpermute_combine_bwd

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _assignment(t, t_ok, k, row_ptr, w_ptr, kept_ptr, K: tl.constexpr, HAS_W: tl.constexpr):
    """(kept, row, weight) of assignment (t, k); row and weight read only where kept (weight 1
    without weights)."""
    kept = tl.load(kept_ptr + t * K + k, mask=t_ok, other=0) != 0
    row = tl.load(row_ptr + t * K + k, mask=kept, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + t * K + k, mask=kept, other=0.0).to(tl.float32)
    else:
        w = tl.full(t.shape, 1.0, tl.float32)
    return kept, row, w


@triton.jit
def _to_out(x, ROUND_BF16: tl.constexpr):
    """Under Triton's interpreter its fp32 -> bf16 cast truncates: round to the grid first."""
    if ROUND_BF16:
        x = tl_round_to_bf16_grid(x)
    return x


@triton.jit
def _combine_fwd_kernel(
    y_ptr, row_ptr, w_ptr, kept_ptr, out_ptr, T, H, stride_y,
    K: tl.constexpr, HAS_W: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """out = sum_k w * y[row] (HAS_W) or sum_k y[row] (the permutation's backward), fp32 sums."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok, h_ok = t < T, h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(K):
        kept, row, w = _assignment(t, t_ok, k, row_ptr, w_ptr, kept_ptr, K, HAS_W)
        y = tl.load(y_ptr + row[:, None] * stride_y + h[None, :], mask=kept[:, None] & h_ok[None, :], other=0.0)
        term = w[:, None] * y.to(tl.float32) if HAS_W else y.to(tl.float32)
        acc = acc + tl.where(kept[:, None], term, 0.0)
    out = _to_out(acc, ROUND_BF16).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + h[None, :], out, mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _combine_bwd_kernel(
    dout_ptr, y_ptr, row_ptr, w_ptr, kept_ptr, dy_ptr, dw_ptr, T, H, M, stride_dout, stride_y,
    K: tl.constexpr, K_POW2: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """A program owns BLOCK_T tokens and walks H: dout is read once, y and dy once per row."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    slots = tl.arange(0, K_POW2)
    dw = tl.zeros([BLOCK_T, K_POW2], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        g = tl.load(dout_ptr + t.to(tl.int64)[:, None] * stride_dout + h[None, :],
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        for k in tl.static_range(K):
            kept, row, w = _assignment(t, t_ok, k, row_ptr, w_ptr, kept_ptr, K, True)
            y = tl.load(y_ptr + row[:, None] * stride_y + h[None, :], mask=kept[:, None] & h_ok[None, :], other=0.0)
            dw += tl.where(slots[None, :] == k, tl.sum(g * y.to(tl.float32), axis=1)[:, None], 0.0)
            # Every assignment writes its row, a dropped one zeros (its row index is still valid).
            dst = tl.load(row_ptr + t * K + k, mask=t_ok, other=-1).to(tl.int64)
            dst_ok = (dst >= 0) & (dst < M)
            dy = _to_out(tl.where(kept[:, None], w[:, None] * g, 0.0), ROUND_BF16)
            tl.store(dy_ptr + dst[:, None] * H + h[None, :], dy.to(dy_ptr.dtype.element_ty),
                     mask=dst_ok[:, None] & h_ok[None, :])  # fmt: skip
    kept_all = tl.load(kept_ptr + t[:, None] * K + slots[None, :], mask=t_ok[:, None] & (slots[None, :] < K), other=0)
    dw = tl.where(kept_all != 0, dw, 0.0)
    tl.store(dw_ptr + t[:, None] * K + slots[None, :], dw.to(dw_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (slots[None, :] < K))  # fmt: skip


def _check_rows(y_MH: torch.Tensor, row_of_TK: torch.Tensor, kept_TK: torch.Tensor) -> None:
    if y_MH.ndim != 2:
        raise ValueError(f"y_MH must be 2-D (M, H), got shape {tuple(y_MH.shape)}")
    if row_of_TK.ndim != 2 or kept_TK.shape != row_of_TK.shape:
        raise ValueError(f"kept_TK {tuple(kept_TK.shape)} must match row_of_TK {tuple(row_of_TK.shape)}, both (T, K)")
    if kept_TK.dtype != torch.bool or row_of_TK.is_floating_point():
        raise ValueError(f"kept_TK must be bool and row_of_TK integer, got {kept_TK.dtype}, {row_of_TK.dtype}")


def _check(y_MH: torch.Tensor, row_of_TK: torch.Tensor, weights_TK: torch.Tensor, kept_TK: torch.Tensor) -> None:
    _check_rows(y_MH, row_of_TK, kept_TK)
    if weights_TK.shape != row_of_TK.shape:
        raise ValueError(f"weights_TK {tuple(weights_TK.shape)} must match row_of_TK {tuple(row_of_TK.shape)}")


# Launch shapes, (BLOCK_T, BLOCK_H, num_warps). Measured on H200 (copy 4.3 TB/s) at T=16384 K=8
# H=4096, T=8192 K=2 H=4096, T=4096 K=8 H=7168: forward 16x128 ran at 0.91 / 0.84 / 0.88 of copy
# (32x128: 0.68-0.82); backward 8x256 at 0.85 / 0.85 / 0.75 (16x256: 0.75 / 0.85 / 0.66).
# torch's gather-and-add reference: 0.04-0.05. Session 11 (H200, the kernels bench's four shapes,
# bitwise the same outputs): forward 8x128 against 16x128, at top-8 unpermute_combine 1.05-1.08x
# (Qwen3-30B-A3B 0.088 -> 0.081 ms, 0.81 -> 0.88 of copy) and gather_sum 1.08-1.10x (0.098 ->
# 0.089, 0.81 -> 0.89), at top-2 within 1%; 4x128 and 4x256 as good at top-8 but 8% behind at
# top-2; 16x256, 32x128 and 16x64 on 2 warps behind everywhere.
_FWD_TILE = (8, 128, 4)
# The backward's program walks H for BLOCK_T tokens, so its BLOCK_T * K rows set both its loads in
# flight and the grid (T / BLOCK_T programs). Session 11 (H200, the kernels bench's four shapes):
# 32 rows at top-8 (BLOCK_T 4 where it was 8) took Qwen3-30B-A3B (T=8192, H=2048) 0.189 -> 0.164
# ms (0.71 -> 0.81 of copy) and DeepSeek-V3 (T=4096, H=7168) 0.312 -> 0.276 (0.75 -> 0.85); at
# top-2, 8 rows (BLOCK_T 4) lost 10% at Mixtral-8x7B width and 16 stayed best. 2x512, 8x512, 2
# warps, and H split over a 2-D grid with partial dweights summed by a second kernel (against
# 8x256: 1.03-1.13x at top-8, 0.88-0.91x at top-2) were behind. K = 4 (32 rows at BLOCK_T 8) was
# not measured.
_BWD_ROWS, _BWD_BLOCK_H, _BWD_WARPS = 32, 256, 4


def _bwd_block_t(K: int) -> int:
    """Tokens a backward program owns: ~_BWD_ROWS routed rows, at most 8 tokens (16 rows at top-2)."""
    return max(1, min(8, _BWD_ROWS // K))


def _round_bf16(t: torch.Tensor) -> bool:
    return triton_interpret() and t.dtype == torch.bfloat16


def _launch_fwd(
    y_MH: torch.Tensor, row_of_TK: torch.Tensor, weights_TK: torch.Tensor | None, kept_TK: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The forward kernel over contiguous copies of the inputs: weighted (unpermute_combine) or,
    with weights_TK None, the plain sum (gather_sum)."""
    y_MH, row_of_TK, kept_TK = (x.contiguous() for x in (y_MH, row_of_TK, kept_TK))
    has_w = weights_TK is not None
    weights_TK = weights_TK.contiguous() if has_w else row_of_TK  # unread without weights
    T, K = row_of_TK.shape
    H = y_MH.shape[1]
    out_TH = y_MH.new_empty((T, H), dtype=out_dtype)
    if T == 0 or H == 0:
        return out_TH
    BLOCK_T, BLOCK_H, num_warps = _FWD_TILE
    _combine_fwd_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
        y_MH, row_of_TK, weights_TK, kept_TK, out_TH, T, H, y_MH.stride(0),
        K=K, HAS_W=has_w, ROUND_BF16=_round_bf16(out_TH), BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out_TH


def _combine_fwd_impl(
    y_MH: torch.Tensor, row_of_TK: torch.Tensor, weights_TK: torch.Tensor, kept_TK: torch.Tensor
) -> torch.Tensor:
    _check(y_MH, row_of_TK, weights_TK, kept_TK)
    return _launch_fwd(y_MH, row_of_TK, weights_TK, kept_TK, y_MH.dtype)


def _gather_sum_impl(
    dx_MH: torch.Tensor, row_of_TK: torch.Tensor, kept_TK: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    _check_rows(dx_MH, row_of_TK, kept_TK)
    return _launch_fwd(dx_MH, row_of_TK, None, kept_TK, out_dtype)


def _combine_bwd_impl(
    dout_TH: torch.Tensor,
    y_MH: torch.Tensor,
    row_of_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    kept_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(y_MH, row_of_TK, weights_TK, kept_TK)
    dout_TH, y_MH, row_of_TK, weights_TK, kept_TK = (
        x.contiguous() for x in (dout_TH, y_MH, row_of_TK, weights_TK, kept_TK)
    )
    T, K = row_of_TK.shape
    M, H = y_MH.shape
    dy_MH = torch.empty_like(y_MH) if M == T * K else torch.zeros_like(y_MH)
    dw_TK = torch.empty_like(weights_TK)
    if T == 0:
        return dy_MH, dw_TK
    BLOCK_T = _bwd_block_t(K)
    _combine_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        dout_TH, y_MH, row_of_TK, weights_TK, kept_TK, dy_MH, dw_TK, T, H, M, dout_TH.stride(0), y_MH.stride(0),
        K=K, K_POW2=triton.next_power_of_2(K), ROUND_BF16=_round_bf16(dy_MH), BLOCK_T=BLOCK_T,
        BLOCK_H=_BWD_BLOCK_H, num_warps=_BWD_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return dy_MH, dw_TK


triton_unpermute_combine = torch.library.custom_op("fp8moe::unpermute_combine", mutates_args=())(_combine_fwd_impl)
triton_unpermute_combine_bwd = torch.library.custom_op("fp8moe::unpermute_combine_bwd", mutates_args=())(
    _combine_bwd_impl
)
triton_gather_sum = torch.library.custom_op("fp8moe::gather_sum", mutates_args=())(_gather_sum_impl)


@triton_unpermute_combine.register_fake
def _(y_MH, row_of_TK, weights_TK, kept_TK):
    _check(y_MH, row_of_TK, weights_TK, kept_TK)
    return y_MH.new_empty(row_of_TK.shape[0], y_MH.shape[1])


@triton_unpermute_combine_bwd.register_fake
def _(dout_TH, y_MH, row_of_TK, weights_TK, kept_TK):
    _check(y_MH, row_of_TK, weights_TK, kept_TK)
    return torch.empty_like(y_MH), torch.empty_like(weights_TK)


@triton_gather_sum.register_fake
def _(dx_MH, row_of_TK, kept_TK, out_dtype):
    _check_rows(dx_MH, row_of_TK, kept_TK)
    return dx_MH.new_empty((row_of_TK.shape[0], dx_MH.shape[1]), dtype=out_dtype)


def _kernel_ok(y_MH: torch.Tensor, other_dtype: torch.dtype) -> bool:
    """Triton for 16/32-bit floats on GPU (or the interpreter); fp64 (gradcheck) takes the reference."""
    return use_triton(y_MH) and y_MH.dtype in _KERNEL_DTYPES and other_dtype in _KERNEL_DTYPES


def unpermute_combine(
    y_MH: torch.Tensor, row_of_TK: torch.Tensor, weights_TK: torch.Tensor, kept_TK: torch.Tensor
) -> torch.Tensor:
    """Forward only (no autograd); `UnpermuteCombine.apply` for the differentiable version."""
    if not _kernel_ok(y_MH, weights_TK.dtype):
        return torch_unpermute_combine(y_MH, row_of_TK, weights_TK, kept_TK)
    if torch.compiler.is_compiling():
        return triton_unpermute_combine(y_MH, row_of_TK, weights_TK, kept_TK)
    return _combine_fwd_impl(y_MH, row_of_TK, weights_TK, kept_TK)


def unpermute_combine_bwd(
    dout_TH: torch.Tensor,
    y_MH: torch.Tensor,
    row_of_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    kept_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (dout_TH, y_MH, row_of_TK, weights_TK, kept_TK)
    if not _kernel_ok(y_MH, weights_TK.dtype):
        return torch_unpermute_combine_bwd(*args)
    if torch.compiler.is_compiling():
        return triton_unpermute_combine_bwd(*args)
    return _combine_bwd_impl(*args)


def gather_sum(
    dx_MH: torch.Tensor, row_of_TK: torch.Tensor, kept_TK: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """dx_TH[t] = sum over kept k (in order) of dx_MH[row_of_TK[t, k]], fp32 sums cast to out_dtype:
    the gradient of a permutation that copied token t into rows row_of_TK[t, :] (moe/permute.py).
    Dropped assignments' rows are never read. Not differentiable (a backward's building block)."""
    if not _kernel_ok(dx_MH, out_dtype):
        return torch_gather_sum(dx_MH, row_of_TK, kept_TK, out_dtype)
    if torch.compiler.is_compiling():
        return triton_gather_sum(dx_MH, row_of_TK, kept_TK, out_dtype)
    return _gather_sum_impl(dx_MH, row_of_TK, kept_TK, out_dtype)


class UnpermuteCombine(torch.autograd.Function):
    """out_TH = sum_k kept * w_TK * y_MH[row_of_TK], differentiable w.r.t. y_MH and weights_TK.

    Saves y_MH in its own dtype (bf16) for the weight gradient; no fp32 copy.
    Usage: UnpermuteCombine.apply(y_MH, row_of_TK, weights_TK, kept_TK).
    """

    @staticmethod
    def forward(ctx, y_MH, row_of_TK, weights_TK, kept_TK):
        ctx.save_for_backward(y_MH, row_of_TK, weights_TK, kept_TK)
        return unpermute_combine(y_MH, row_of_TK, weights_TK, kept_TK)

    @staticmethod
    def backward(ctx, dout_TH):
        y_MH, row_of_TK, weights_TK, kept_TK = ctx.saved_tensors
        dy_MH, dw_TK = unpermute_combine_bwd(dout_TH, y_MH, row_of_TK, weights_TK, kept_TK)
        return dy_MH, None, dw_TK, None
