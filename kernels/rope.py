"""Rotary position embedding of q and k in one launch, forward and backward; `rope_qk` is the
differentiable entry point the model uses, `torch_rope_qk` its pure-torch reference.

Shape letters (README.md): B batch, S sequence, Q query heads, J key/value heads, D head dim.

    rope_qk(q_BSQD, k_BSJD, cos_SD, sin_SD, inverse) -> q_BSQD, k_BSJD (new, contiguous, inputs' dtypes)
        x1, x2 = x[..., :D/2], x[..., D/2:] in fp32 (rotate-half convention), position s of row s:
        out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]; inverse: sin -> -sin
cos_SD, sin_SD: fp32 tables of at least S rows and D/2 columns (moe/model.py: `rope_tables`; fp64
for an fp64 model, which takes the reference).
q and k may be strided views (the projections' outputs as (B, S, heads, D)); only D must be
contiguous.

The backward of a rotation is the rotation by the opposite angle, so it is the same kernel with
-sin. Each product and sum is one fp32 rounding, as in the reference's separate torch ops (FMA
contraction off), so kernel, reference and autograd through the reference agree bit for bit,
forward and backward (tests/test_glue_rope.py).
Against the torch ops (nine kernels over q and nine over k, an fp32 copy of each, forward and
again backward) one program per token and block of heads reads each value once and writes it
once, and nothing is saved for backward but the tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_to_bf16_grid, triton_interpret
from kernels.dispatch import kernel_op

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_rope_args(q_BSQD: torch.Tensor, k_BSJD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> None:
    if q_BSQD.ndim != 4 or k_BSJD.ndim != 4 or q_BSQD.shape[:2] != k_BSJD.shape[:2]:
        raise ValueError(f"q and k must be (B, S, heads, D) with the same B and S, got {tuple(q_BSQD.shape)} "
                         f"and {tuple(k_BSJD.shape)}")  # fmt: skip
    D, S = q_BSQD.shape[3], q_BSQD.shape[1]
    if D % 2 or k_BSJD.shape[3] != D:
        raise ValueError(f"q and k must share an even head dim D, got {D} and {k_BSJD.shape[3]}")
    for name, t in (("cos_SD", cos_SD), ("sin_SD", sin_SD)):
        if t.ndim != 2 or t.shape[0] < S or t.shape[1] != D // 2 or t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be an fp32 (or fp64) table of at least S={S} rows and D/2={D // 2} "
                             f"columns, got {tuple(t.shape)} {t.dtype}")  # fmt: skip


# ---- reference ---------------------------------------------------------------------------------


def _torch_rotate(x_BSHD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    S = x_BSHD.shape[1]
    acc = torch.promote_types(x_BSHD.dtype, torch.float32)
    x1, x2 = x_BSHD.to(acc).chunk(2, dim=-1)
    cos, sin = cos_SD[:S, None].to(acc), sin_SD[:S, None].to(acc)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BSHD.dtype)


def torch_rope_qk(
    q_BSQD: torch.Tensor, k_BSJD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation as plain torch ops (see the module docstring); differentiable by autograd."""
    check_rope_args(q_BSQD, k_BSJD, cos_SD, sin_SD)
    sin_SD = -sin_SD if inverse else sin_SD
    return _torch_rotate(q_BSQD, cos_SD, sin_SD), _torch_rotate(k_BSJD, cos_SD, sin_SD)


# ---- kernel ------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(src, dst, stride_h, n_heads, h0, cos, sin, HALF, ROUND_BF16: tl.constexpr,
                  HEADS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Heads h0 .. h0 + HEADS of one token: src strided by stride_h, dst contiguous (heads, 2 HALF)."""
    heads = h0 + tl.arange(0, HEADS)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < n_heads)[:, None] & (d < HALF)[None, :]
    x1_ptrs = src + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    if ROUND_BF16:  # the interpreter's fp32 -> bf16 cast truncates
        o1, o2 = tl_round_to_bf16_grid(o1), tl_round_to_bf16_grid(o2)
    o1_ptrs = dst + heads[:, None] * (2 * HALF) + d[None, :]
    tl.store(o1_ptrs, o1.to(dst.dtype.element_ty), mask=mask)
    tl.store(o1_ptrs + HALF, o2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    S, Q, J, HALF, sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, stride_cs, n_q_blocks,
    INVERSE: tl.constexpr, ROUND_BF16: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tok = tl.program_id(0)  # b * S + s
    hb = tl.program_id(1)  # blocks of q heads, then blocks of k heads
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + s * stride_cs + d, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + s * stride_cs + d, mask=d < HALF, other=0.0)
    if INVERSE:
        sin = -sin
    tok = tok.to(tl.int64)
    if hb < n_q_blocks:
        _rotate_heads(q_ptr + b * sq_b + s * sq_s, qo_ptr + tok * Q * 2 * HALF, sq_h, Q, hb * HEADS, cos, sin,
                      HALF, ROUND_BF16, HEADS, BLOCK_D)  # fmt: skip
    else:
        _rotate_heads(k_ptr + b * sk_b + s * sk_s, ko_ptr + tok * J * 2 * HALF, sk_h, J, (hb - n_q_blocks) * HEADS,
                      cos, sin, HALF, ROUND_BF16, HEADS, BLOCK_D)  # fmt: skip


def _heads_per_program(D: int, Q: int, J: int) -> int:
    """A power of two: ~2048 values a program (16 heads of 128), no more heads than q or k has."""
    return max(1, min(2048 // triton.next_power_of_2(D), triton.next_power_of_2(max(Q, J))))


def triton_rope_qk(
    q_BSQD: torch.Tensor, k_BSJD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated; see the module docstring."""
    check_rope_args(q_BSQD, k_BSJD, cos_SD, sin_SD)
    q_out, k_out = _outputs(q_BSQD, k_BSJD)
    B, S, Q, D = q_BSQD.shape
    J = k_BSJD.shape[2]
    if q_out.numel() == 0 and k_out.numel() == 0:
        return q_out, k_out
    if q_BSQD.stride(3) != 1:
        q_BSQD = q_BSQD.contiguous()
    if k_BSJD.stride(3) != 1:
        k_BSJD = k_BSJD.contiguous()
    cos_SD, sin_SD = cos_SD.contiguous(), sin_SD.contiguous()
    heads = _heads_per_program(D, Q, J)
    n_q_blocks = triton.cdiv(Q, heads)
    _rope_kernel[(B * S, n_q_blocks + triton.cdiv(J, heads))](
        q_BSQD, k_BSJD, q_out, k_out, cos_SD, sin_SD,
        S, Q, J, D // 2, *q_BSQD.stride()[:3], *k_BSJD.stride()[:3], cos_SD.stride(0), n_q_blocks,
        INVERSE=inverse, ROUND_BF16=triton_interpret() and q_out.dtype == torch.bfloat16, HEADS=heads,
        BLOCK_D=triton.next_power_of_2(D // 2), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q_out, k_out


def _outputs(q_BSQD: torch.Tensor, k_BSJD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(q_BSQD.shape, dtype=q_BSQD.dtype, device=q_BSQD.device), \
        torch.empty(k_BSJD.shape, dtype=k_BSJD.dtype, device=k_BSJD.device)  # fmt: skip


def _fake_rope_qk(q_BSQD, k_BSJD, cos_SD, sin_SD, inverse=False):
    check_rope_args(q_BSQD, k_BSJD, cos_SD, sin_SD)
    return _outputs(q_BSQD, k_BSJD)


def _kernel_ok(q_BSQD: torch.Tensor, k_BSJD: torch.Tensor, cos_SD: torch.Tensor, *args) -> bool:
    """Triton for 16/32-bit q and k of one dtype on a GPU; fp64 takes the reference, and so does the
    CPU even under Triton's interpreter, as for the norms (kernels/rmsnorm.py: `_kernel_ok`);
    tests/test_glue_rope.py runs the launcher under the interpreter itself."""
    same = k_BSJD.dtype == q_BSQD.dtype and cos_SD.dtype == torch.float32
    return q_BSQD.is_cuda and q_BSQD.dtype in _KERNEL_DTYPES and same


rope_qk_op = kernel_op("rope_qk", triton_rope_qk, _fake_rope_qk, torch_rope_qk, use_kernel=_kernel_ok)


class RopeQK(torch.autograd.Function):
    """(q, k) rotated by position, differentiable in q and k; the backward rotates the gradients
    back. Saves only the tables. Usage: RopeQK.apply(q_BSQD, k_BSJD, cos_SD, sin_SD)."""

    @staticmethod
    def forward(ctx, q_BSQD, k_BSJD, cos_SD, sin_SD):
        ctx.save_for_backward(cos_SD, sin_SD)
        return rope_qk_op(q_BSQD, k_BSJD, cos_SD, sin_SD, False)

    @staticmethod
    def backward(ctx, dq_BSQD, dk_BSJD):
        cos_SD, sin_SD = ctx.saved_tensors
        dq_BSQD, dk_BSJD = rope_qk_op(dq_BSQD, dk_BSJD, cos_SD, sin_SD, True)
        return dq_BSQD, dk_BSJD, None, None


def rope_qk(
    q_BSQD: torch.Tensor, k_BSJD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k rotated by their positions 0 .. S-1 (autograd through `RopeQK`)."""
    return RopeQK.apply(q_BSQD, k_BSJD, cos_SD, sin_SD)
