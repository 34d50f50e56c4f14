"""Unpermute + weighted combine of the expert outputs in one pass, and its backward.

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), M = T*A routed rows,
H hidden size.

    unpermute_combine(y_MH, row_of_TA, weights_TA, kept_TA) -> out_TH (y's dtype)
        out[t] = sum over kept a (a = 0..A-1, in that order) of w[t, a] * y[row_of_TA[t, a]], in fp32
    unpermute_combine_bwd(dout_TH, y_MH, row_of_TA, weights_TA, kept_TA) -> (dy_MH, dweights_TA)
        dy[row(t, a)] = w[t, a] * dout[t] (0 for a dropped (t, a)); dweights[t, a] = <dout[t], y[row(t, a)]>
    gather_sum(dx_MH, row_of_TA, kept_TA, out_dtype) -> dx_TH (out_dtype)
        dx[t] = sum over kept a of dx_MH[row_of_TA[t, a]], in fp32: the backward of the permutation
        (each token's A copies summed), the forward kernel without weights. out_dtype lets the
        gradient of an fp32 residual stream keep the fp32 sum of bf16 rows.

A gather formulation: one program per tile of tokens reads the A rows of each token, so there are
no atomics and the result is deterministic. Dropped assignments are masked before any load, so
their rows (which may hold garbage or NaN) and their row indices are never read.
Layout contract (moe/permute.py): when M == T*A, row_of_TA is a permutation of 0..M-1 (a dropped
assignment keeps its own row), so the backward writes every row of dy exactly once; for any other
M, dy starts from zeros.
`UnpermuteCombine` is the autograd Function the MoE layer uses.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_bf16_if, triton_interpret, use_triton
from kernels.contracts import check_combine_args, check_gather_args
from kernels.dispatch import kernel_op
from kernels.reference_combine import torch_gather_sum, torch_unpermute_combine, torch_unpermute_combine_bwd

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _assignment(t, t_ok, a, row_ptr, w_ptr, kept_ptr, A: tl.constexpr, HAS_W: tl.constexpr):
    """(kept, row, weight) of assignment (t, a); row and weight read only where kept (weight 1
    without weights)."""
    kept = tl.load(kept_ptr + t * A + a, mask=t_ok, other=0) != 0
    row = tl.load(row_ptr + t * A + a, mask=kept, other=0).to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + t * A + a, mask=kept, other=0.0).to(tl.float32)
    else:
        w = tl.full(t.shape, 1.0, tl.float32)
    return kept, row, w


@triton.jit
def _combine_fwd_kernel(
    y_ptr, row_ptr, w_ptr, kept_ptr, out_ptr, T, H, stride_y,
    A: tl.constexpr, HAS_W: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """out = sum_a w * y[row] (HAS_W) or sum_a y[row] (the permutation's backward), fp32 sums."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok, h_ok = t < T, h < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for a in tl.static_range(A):
        kept, row, w = _assignment(t, t_ok, a, row_ptr, w_ptr, kept_ptr, A, HAS_W)
        y = tl.load(y_ptr + row[:, None] * stride_y + h[None, :], mask=kept[:, None] & h_ok[None, :], other=0.0)
        term = w[:, None] * y.to(tl.float32) if HAS_W else y.to(tl.float32)
        acc = acc + tl.where(kept[:, None], term, 0.0)
    out = tl_round_bf16_if(acc, ROUND_BF16).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * H + h[None, :], out, mask=t_ok[:, None] & h_ok[None, :])


@triton.jit
def _combine_bwd_kernel(
    dout_ptr, y_ptr, row_ptr, w_ptr, kept_ptr, dy_ptr, dw_ptr, T, H, M, stride_dout, stride_y,
    A: tl.constexpr, A_POW2: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):  # fmt: skip
    """A program owns BLOCK_T tokens and walks H: dout is read once, y and dy once per row."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    slots = tl.arange(0, A_POW2)
    dw = tl.zeros([BLOCK_T, A_POW2], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < H
        g = tl.load(dout_ptr + t.to(tl.int64)[:, None] * stride_dout + h[None, :],
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        for a in tl.static_range(A):
            kept, row, w = _assignment(t, t_ok, a, row_ptr, w_ptr, kept_ptr, A, True)
            y = tl.load(y_ptr + row[:, None] * stride_y + h[None, :], mask=kept[:, None] & h_ok[None, :], other=0.0)
            dw += tl.where(slots[None, :] == a, tl.sum(g * y.to(tl.float32), axis=1)[:, None], 0.0)
            # Every assignment writes its row, a dropped one zeros (its row index is still valid).
            dst = tl.load(row_ptr + t * A + a, mask=t_ok, other=-1).to(tl.int64)
            dst_ok = (dst >= 0) & (dst < M)
            dy = tl_round_bf16_if(tl.where(kept[:, None], w[:, None] * g, 0.0), ROUND_BF16)
            tl.store(dy_ptr + dst[:, None] * H + h[None, :], dy.to(dy_ptr.dtype.element_ty),
                     mask=dst_ok[:, None] & h_ok[None, :])  # fmt: skip
    kept_all = tl.load(kept_ptr + t[:, None] * A + slots[None, :], mask=t_ok[:, None] & (slots[None, :] < A), other=0)
    dw = tl.where(kept_all != 0, dw, 0.0)
    tl.store(dw_ptr + t[:, None] * A + slots[None, :], dw.to(dw_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (slots[None, :] < A))  # fmt: skip


# Launch shapes, (BLOCK_T, BLOCK_H, num_warps), from sweeps on an H200 over the kernels bench's four
# shapes (bitwise the same outputs; bench/NOTES.md). Forward 8x128: at top-8 1.05-1.10x over 16x128
# (0.81 -> 0.88-0.89 of copy), within 1% at top-2.
_FWD_TILE = (8, 128, 4)
# The backward's program walks H for BLOCK_T tokens, so its BLOCK_T * A rows set both its loads in
# flight and the grid (T / BLOCK_T programs): ~32 rows a program (0.71 -> 0.81 of copy at Qwen3
# width against 64 rows, top-8), but 16 at top-2 (8 lost 10%).
_BWD_ROWS, _BWD_BLOCK_H, _BWD_WARPS = 32, 256, 4


def _bwd_block_t(A: int) -> int:
    """Tokens a backward program owns: ~_BWD_ROWS routed rows, at most 8 tokens (16 rows at top-2)."""
    return max(1, min(8, _BWD_ROWS // A))


def _round_bf16(t: torch.Tensor) -> bool:
    return triton_interpret() and t.dtype == torch.bfloat16


def _launch_fwd(
    y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor | None, kept_TA: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """The forward kernel over contiguous copies of the inputs: weighted (unpermute_combine) or,
    with weights_TA None, the plain sum (gather_sum)."""
    y_MH, row_of_TA, kept_TA = (x.contiguous() for x in (y_MH, row_of_TA, kept_TA))
    has_w = weights_TA is not None
    weights_TA = weights_TA.contiguous() if has_w else row_of_TA  # unread without weights
    T, A = row_of_TA.shape
    H = y_MH.shape[1]
    out_TH = y_MH.new_empty((T, H), dtype=out_dtype)
    if T == 0 or H == 0:
        return out_TH
    BLOCK_T, BLOCK_H, num_warps = _FWD_TILE
    _combine_fwd_kernel[(triton.cdiv(T, BLOCK_T), triton.cdiv(H, BLOCK_H))](
        y_MH, row_of_TA, weights_TA, kept_TA, out_TH, T, H, y_MH.stride(0),
        A=A, HAS_W=has_w, ROUND_BF16=_round_bf16(out_TH), BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out_TH


def triton_unpermute_combine(
    y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor, kept_TA: torch.Tensor
) -> torch.Tensor:
    """Forward only (no autograd); `UnpermuteCombine.apply` for the differentiable version."""
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    return _launch_fwd(y_MH, row_of_TA, weights_TA, kept_TA, y_MH.dtype)


def triton_gather_sum(
    dx_MH: torch.Tensor, row_of_TA: torch.Tensor, kept_TA: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """dx_TH[t] = sum over kept a (in order) of dx_MH[row_of_TA[t, a]], fp32 sums cast to out_dtype:
    the gradient of a permutation that copied token t into rows row_of_TA[t, :] (moe/permute.py).
    Dropped assignments' rows are never read. Not differentiable (a backward's building block)."""
    check_gather_args(dx_MH, row_of_TA, kept_TA)
    return _launch_fwd(dx_MH, row_of_TA, None, kept_TA, out_dtype)


def triton_unpermute_combine_bwd(
    dout_TH: torch.Tensor, y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor,
    kept_TA: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dy_MH, dweights_TA), the backward of `unpermute_combine`; see the module docstring."""
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    dout_TH, y_MH, row_of_TA, weights_TA, kept_TA = (
        x.contiguous() for x in (dout_TH, y_MH, row_of_TA, weights_TA, kept_TA)
    )
    T, A = row_of_TA.shape
    M, H = y_MH.shape
    dy_MH = torch.empty_like(y_MH) if M == T * A else torch.zeros_like(y_MH)
    dw_TA = torch.empty_like(weights_TA)
    if T == 0:
        return dy_MH, dw_TA
    BLOCK_T = _bwd_block_t(A)
    _combine_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        dout_TH, y_MH, row_of_TA, weights_TA, kept_TA, dy_MH, dw_TA, T, H, M, dout_TH.stride(0), y_MH.stride(0),
        A=A, A_POW2=triton.next_power_of_2(A), ROUND_BF16=_round_bf16(dy_MH), BLOCK_T=BLOCK_T,
        BLOCK_H=_BWD_BLOCK_H, num_warps=_BWD_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return dy_MH, dw_TA


def _fake_unpermute_combine(y_MH, row_of_TA, weights_TA, kept_TA):
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    return y_MH.new_empty(row_of_TA.shape[0], y_MH.shape[1])


def _fake_unpermute_combine_bwd(dout_TH, y_MH, row_of_TA, weights_TA, kept_TA):
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    return torch.empty_like(y_MH), torch.empty_like(weights_TA)


def _fake_gather_sum(dx_MH, row_of_TA, kept_TA, out_dtype):
    check_gather_args(dx_MH, row_of_TA, kept_TA)
    return dx_MH.new_empty((row_of_TA.shape[0], dx_MH.shape[1]), dtype=out_dtype)


def _kernel_ok(y_MH: torch.Tensor, other_dtype: torch.dtype) -> bool:
    """Triton for 16/32-bit floats on GPU (or the interpreter); fp64 (gradcheck) takes the reference."""
    return use_triton(y_MH) and y_MH.dtype in _KERNEL_DTYPES and other_dtype in _KERNEL_DTYPES


unpermute_combine = kernel_op(
    "unpermute_combine", triton_unpermute_combine, _fake_unpermute_combine, torch_unpermute_combine,
    use_kernel=lambda y_MH, row_of_TA, weights_TA, kept_TA: _kernel_ok(y_MH, weights_TA.dtype),
)  # fmt: skip
unpermute_combine_bwd = kernel_op(
    "unpermute_combine_bwd", triton_unpermute_combine_bwd, _fake_unpermute_combine_bwd, torch_unpermute_combine_bwd,
    use_kernel=lambda dout_TH, y_MH, row_of_TA, weights_TA, kept_TA: _kernel_ok(y_MH, weights_TA.dtype),
)  # fmt: skip
gather_sum = kernel_op(
    "gather_sum", triton_gather_sum, _fake_gather_sum, torch_gather_sum,
    use_kernel=lambda dx_MH, row_of_TA, kept_TA, out_dtype: _kernel_ok(dx_MH, out_dtype),
)  # fmt: skip


class UnpermuteCombine(torch.autograd.Function):
    """out_TH = sum_a kept * w_TA * y_MH[row_of_TA], differentiable w.r.t. y_MH and weights_TA.

    Saves y_MH in its own dtype (bf16) for the weight gradient; no fp32 copy.
    Usage: UnpermuteCombine.apply(y_MH, row_of_TA, weights_TA, kept_TA).
    """

    @staticmethod
    def forward(ctx, y_MH, row_of_TA, weights_TA, kept_TA):
        ctx.save_for_backward(y_MH, row_of_TA, weights_TA, kept_TA)
        return unpermute_combine(y_MH, row_of_TA, weights_TA, kept_TA)

    @staticmethod
    def backward(ctx, dout_TH):
        y_MH, row_of_TA, weights_TA, kept_TA = ctx.saved_tensors
        dy_MH, dw_TA = unpermute_combine_bwd(dout_TH, y_MH, row_of_TA, weights_TA, kept_TA)
        return dy_MH, None, dw_TA, None
