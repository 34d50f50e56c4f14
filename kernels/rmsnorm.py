"""The residual add fused with RMSNorm, one pass over the rows forward and one backward;
`add_rms_norm` / `rms_norm` are the differentiable entry points the model uses.

Shape letters (README.md): M rows (tokens, or tokens x heads for the per-head q/k norms), H the
normalised size (the head dim D for the q/k norms).

    add_rms_norm_fwd(x_MH, r_MH | None, w_H, eps) -> y_MH, z_MH (empty without r), rstd_M (fp32)
    add_rms_norm_bwd(dy_MH, dz_MH | None, z_MH, w_H, rstd_M, x_dtype, r_dtype | None)
        -> dx_MH (x_dtype), dr_MH (r_dtype, or empty), dw_H (w's dtype)

The math, and the order of its roundings, is kernels/reference_norm.py's; FMA contraction is off
(enable_fp_fusion=False), so the kernels differ from the reference only in the order of the three
sums (sum z^2, sum g * xhat over a row, sum dy * xhat over rows): tests/test_glue_rmsnorm.py bounds
that difference.

Forward: a program owns BLOCK_M whole rows (H up to MAX_H, held in registers): it reads x and r
once and writes z, y and rstd; the plain ops read and wrote the rows about ten times.
Backward: n programs (a few per SM) sweep row blocks pid, pid + n, ...; each recomputes xhat from
the saved z and rstd, writes dx (and dr), and keeps its partial dw in registers, written once;
dw = the fp32 sum of the n partials (in a fixed order: deterministic).
Saved for backward: z (the residual stream itself) and rstd, 4 bytes a row, where autograd over
the plain ops kept an fp32 copy of the input and the normalised output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_bf16_if, triton_interpret
from kernels.dispatch import kernel_op
from kernels.reference_norm import check_rms_norm_args, torch_add_rms_norm_bwd, torch_add_rms_norm_fwd

MAX_H = 16384  # longest row a program holds whole; longer rows take the reference
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, z_ptr, rstd_ptr,
    M, H, stride_x, stride_r, inv_h, eps,
    HAS_R: tl.constexpr, Y_BF16: tl.constexpr, Z_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < H)[None, :]
    rows = rows.to(tl.int64)
    z = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z = tl_round_bf16_if(z + r, Z_BF16).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + rows[:, None] * H + cols[None, :], z, mask=mask)
        z = z.to(tl.float32)  # the norm sees z as stored, rounded to its dtype
    rstd = tl.math.rsqrt(tl.sum(z * z, axis=1) * inv_h + eps)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = (z * rstd[:, None]) * w[None, :]
    tl.store(y_ptr + rows[:, None] * H + cols[None, :], tl_round_bf16_if(y, Y_BF16).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_kernel(
    dy_ptr, dz_ptr, z_ptr, w_ptr, rstd_ptr, dx_ptr, dr_ptr, dw_ptr,
    M, H, stride_dy, stride_dz, stride_z, inv_h, n_blocks, n_programs,
    HAS_DZ: tl.constexpr, HAS_R: tl.constexpr, DX_BF16: tl.constexpr, DR_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    for blk in range(pid, n_blocks, n_programs):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = z * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) * inv_h
        dz = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DZ:
            dz += tl.load(dz_ptr + rows[:, None] * stride_dz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * H + cols[None, :], tl_round_bf16_if(dz, DX_BF16).to(dx_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        if HAS_R:
            tl.store(dr_ptr + rows[:, None] * H + cols[None, :], tl_round_bf16_if(dz, DR_BF16).to(dr_ptr.dtype.element_ty),
                     mask=mask)  # fmt: skip
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_ptr + pid * H + cols, dw, mask=col_ok)


def _tile(H: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps): whole rows, ~4096 values a program (a row of 4096 or more
    alone), 512 values a warp."""
    block_h = triton.next_power_of_2(H)
    block_m = max(1, min(64, 4096 // block_h))
    return block_m, block_h, max(1, min(16, block_m * block_h // 512))


def _round_bf16(dtype: torch.dtype) -> bool:
    return triton_interpret() and dtype == torch.bfloat16


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def triton_add_rms_norm_fwd(
    x_MH: torch.Tensor, r_MH: torch.Tensor | None, w_H: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_MH, z_MH, rstd_M); see the module docstring."""
    check_rms_norm_args(x_MH, r_MH, w_H)
    y_MH, z_MH, rstd_M = _fwd_outputs(x_MH, r_MH)
    M, H = x_MH.shape
    if M == 0:
        return y_MH, z_MH, rstd_M
    x_MH = _rows(x_MH)
    r_MH = _rows(r_MH) if r_MH is not None else x_MH  # unread without r
    BLOCK_M, BLOCK_H, num_warps = _tile(H)
    _fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        x_MH, r_MH, w_H, y_MH, z_MH, rstd_M, M, H, x_MH.stride(0), r_MH.stride(0), 1.0 / H, eps,
        HAS_R=z_MH.numel() > 0, Y_BF16=_round_bf16(y_MH.dtype), Z_BF16=_round_bf16(z_MH.dtype),
        BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return y_MH, z_MH, rstd_M


def _fwd_outputs(x_MH: torch.Tensor, r_MH: torch.Tensor | None):
    z_dtype = x_MH.dtype if r_MH is None else torch.promote_types(x_MH.dtype, r_MH.dtype)
    y_MH = x_MH.new_empty(x_MH.shape, dtype=z_dtype)
    z_MH = x_MH.new_empty(x_MH.shape if r_MH is not None else (0,), dtype=z_dtype)
    return y_MH, z_MH, x_MH.new_empty(x_MH.shape[0], dtype=torch.float32)


def _fake_add_rms_norm_fwd(x_MH, r_MH, w_H, eps):
    check_rms_norm_args(x_MH, r_MH, w_H)
    return _fwd_outputs(x_MH, r_MH)


def _bwd_programs(n_blocks: int, device: torch.device) -> int:
    """A few programs per SM (each sweeps n_blocks / n_programs row blocks), 4 under the interpreter."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_blocks, per_device))


def triton_add_rms_norm_bwd(
    dy_MH: torch.Tensor, dz_MH: torch.Tensor | None, z_MH: torch.Tensor, w_H: torch.Tensor, rstd_M: torch.Tensor,
    x_dtype: torch.dtype, r_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx_MH, dr_MH, dw_H); see the module docstring."""
    dx_MH, dr_MH, dw_H = _bwd_outputs(z_MH, w_H, x_dtype, r_dtype)
    M, H = z_MH.shape
    if M == 0:
        return dx_MH, dr_MH, dw_H.zero_()
    has_dz = dz_MH is not None
    dy_MH, z_MH = _rows(dy_MH), _rows(z_MH)
    dz_MH = _rows(dz_MH) if has_dz else dy_MH  # unread without dz
    BLOCK_M, BLOCK_H, num_warps = _tile(H)
    n_blocks = triton.cdiv(M, BLOCK_M)
    n_programs = _bwd_programs(n_blocks, z_MH.device)
    dw_partials = z_MH.new_empty((n_programs, H), dtype=torch.float32)  # each program's dw
    _bwd_kernel[(n_programs,)](
        dy_MH, dz_MH, z_MH, w_H, rstd_M, dx_MH, dr_MH if r_dtype is not None else dx_MH, dw_partials,
        M, H, dy_MH.stride(0), dz_MH.stride(0), z_MH.stride(0), 1.0 / H, n_blocks, n_programs,
        HAS_DZ=has_dz, HAS_R=r_dtype is not None, DX_BF16=_round_bf16(x_dtype),
        DR_BF16=_round_bf16(dr_MH.dtype), BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H, num_warps=num_warps,
        enable_fp_fusion=False,
    )  # fmt: skip
    return dx_MH, dr_MH, dw_partials.sum(0).to(w_H.dtype)


def _bwd_outputs(z_MH: torch.Tensor, w_H: torch.Tensor, x_dtype: torch.dtype, r_dtype: torch.dtype | None):
    dx_MH = z_MH.new_empty(z_MH.shape, dtype=x_dtype)
    dr_MH = z_MH.new_empty(z_MH.shape if r_dtype is not None else (0,), dtype=r_dtype or x_dtype)
    return dx_MH, dr_MH, torch.empty_like(w_H)


def _fake_add_rms_norm_bwd(dy_MH, dz_MH, z_MH, w_H, rstd_M, x_dtype, r_dtype):
    return _bwd_outputs(z_MH, w_H, x_dtype, r_dtype)


def _kernel_ok(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Triton for 16/32-bit rows up to MAX_H on a GPU; fp64 (gradcheck) and longer rows take the
    reference, and so does the CPU even under Triton's interpreter: the norms sit in every block,
    and interpreted they made the CPU model ~10x slower in every model test. tests/test_glue_rmsnorm.py
    runs the launchers under the interpreter itself."""
    dtypes_ok = all(t is None or t.dtype in _KERNEL_DTYPES for t in (x, *others))
    return x.is_cuda and dtypes_ok and x.shape[-1] <= MAX_H


add_rms_norm_fwd = kernel_op(
    "add_rms_norm_fwd", triton_add_rms_norm_fwd, _fake_add_rms_norm_fwd, torch_add_rms_norm_fwd,
    use_kernel=lambda x_MH, r_MH, w_H, eps: _kernel_ok(x_MH, r_MH, w_H),
)  # fmt: skip
add_rms_norm_bwd = kernel_op(
    "add_rms_norm_bwd", triton_add_rms_norm_bwd, _fake_add_rms_norm_bwd, torch_add_rms_norm_bwd,
    use_kernel=lambda dy_MH, dz_MH, z_MH, w_H, rstd_M, x_dtype, r_dtype: _kernel_ok(z_MH, dy_MH, dz_MH, w_H),
)  # fmt: skip


class AddRMSNorm(torch.autograd.Function):
    """(y_MH, z_MH) = (rmsnorm(x + r) * w, x + r), differentiable in x, r and w; without r, y_MH
    alone. Saves z (x itself without r) and rstd. Usage: AddRMSNorm.apply(x_MH, r_MH, w_H, eps)."""

    @staticmethod
    def forward(ctx, x_MH, r_MH, w_H, eps):
        y_MH, z_MH, rstd_M = add_rms_norm_fwd(x_MH, r_MH, w_H, eps)
        ctx.has_r = r_MH is not None
        ctx.dtypes = (x_MH.dtype, r_MH.dtype if ctx.has_r else None)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z_MH if ctx.has_r else x_MH, w_H, rstd_M)
        return (y_MH, z_MH) if ctx.has_r else y_MH

    @staticmethod
    def backward(ctx, dy_MH, dz_MH=None):
        z_MH, w_H, rstd_M = ctx.saved_tensors
        if dy_MH is None:
            dy_MH = torch.zeros_like(z_MH)
        dx_MH, dr_MH, dw_H = add_rms_norm_bwd(dy_MH, dz_MH, z_MH, w_H, rstd_M, *ctx.dtypes)
        return dx_MH, (dr_MH if ctx.has_r else None), dw_H, None


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, w_H: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + r) * w, x + r) over the last dim of x and r (any leading dims), each in the
    promoted dtype of x and r: the next layer's input and the residual stream."""
    H = x.shape[-1]
    y_MH, z_MH = AddRMSNorm.apply(x.reshape(-1, H), r.reshape(-1, H), w_H, eps)
    return y_MH.view(x.shape), z_MH.view(x.shape)


def rms_norm(x: torch.Tensor, w_H: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * w over the last dim (any leading dims), in x's dtype."""
    H = x.shape[-1]
    return AddRMSNorm.apply(x.reshape(-1, H), None, w_H, eps).view(x.shape)
