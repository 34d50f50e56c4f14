"""One pass of AdamW over an fp32 parameter with bfloat16 or fp32 moments: `adamw_step_`.

Per element the kernel reads p (4 bytes), g (4, or 2 for a bf16 gradient), m and v (2 each in bf16,
4 in fp32) and writes p, m and v: 20 bytes with bf16 moments (optim.state_dtype=bfloat16,
trainer/fused_adamw.py: 4 bytes of state a parameter instead of 8), 28 with fp32 ones, as torch's
fused AdamW moves.

The math and its order of roundings are kernels/reference_adamw.py's. FMA contraction is off and
the square root and the quotient are IEEE (sqrt_rn, div_rn), so each element's fp32 operations
round exactly as the reference's; under Triton's interpreter the bf16 stores round to nearest
even first (its cast truncates). tests/test_optim_bf16.py compares the two.

amax (an expert weight (E, N, K) that the rowwise FP8 recipe quantizes next): the same step over
2-D tiles, which also takes the new weight's per-row and per-column amaxes of its bf16 rounding,
by atomic max: the amax pass kernels/quantize_weight.py would otherwise run over the fp32 master
(4 bytes an element read again) is done while the value is in registers.

Shape letters (README.md): the flat kernel's N is a parameter's element count; the amax kernel's
p is (E, N, K), R = E * N rows of K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import CAST_TRUNCATES, tl_round_bf16_if, triton_interpret, use_triton
from kernels.reference_adamw import AdamWScalars, check_adamw_args, torch_adamw_step_

BLOCK = 2048  # elements a program: 8 warps of 256
# Rows of an amax program's tile (at most; a power of two dividing N): column atomics are
# E * K * N / AMAX_BLOCK_R, row atomics E * N * K / (BLOCK / AMAX_BLOCK_R).
AMAX_BLOCK_R = 16


@triton.jit
def _step_at(p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, offs, mask, decay, beta1, beta2, one_minus_beta1, one_minus_beta2,
             step_size, inv_bc2_sqrt, eps, HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """The step (module docstring) of the elements at offs, in place; returns the new p (fp32)."""
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr))
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p * decay
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, tl_round_bf16_if(m, ROUND_BF16).to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, tl_round_bf16_if(v, ROUND_BF16).to(v_ptr.dtype.element_ty), mask=mask)
    return p


@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, N,
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_bc2_sqrt, eps,
    HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _step_at(p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, offs, offs < N, decay, beta1, beta2, one_minus_beta1,
             one_minus_beta2, step_size, inv_bc2_sqrt, eps, HAS_SCALE, ROUND_BF16)  # fmt: skip


@triton.jit
def _adamw_amax_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, amax_ptr, R, N, K,
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_bc2_sqrt, eps,
    HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The step over a BLOCK_R x BLOCK_K tile of p viewed as (R, K) = (E * N, K), BLOCK_R dividing N
    (the tile lies in one expert), then the rowwise amaxes of the new p's bf16 rounding, as fp32
    bits into amax_ptr: rows (E * N,) then columns (E * K,), by atomic max (they start at 0)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r < R)[:, None] & (k < K)[None, :]
    p = _step_at(p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, r.to(tl.int64)[:, None] * K + k[None, :], mask, decay,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_bc2_sqrt, eps, HAS_SCALE,
                 ROUND_BF16)  # fmt: skip
    # |bf16(p)| as kernels/quantize_weight.py's amax pass reads an fp32 master with round_bf16
    a = tl.where(mask, tl.abs(tl_round_bf16_if(p, CAST_TRUNCATES).to(tl.bfloat16).to(tl.float32)), 0.0)
    tl.atomic_max(amax_ptr + r, tl.max(a, axis=1).to(tl.int32, bitcast=True), mask=r < R, sem="relaxed")
    e = (tl.program_id(0) * BLOCK_R) // N
    tl.atomic_max(amax_ptr + R + e * K + k, tl.max(a, axis=0).to(tl.int32, bitcast=True), mask=k < K,
                  sem="relaxed")  # fmt: skip


def triton_adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamWScalars,
                       grad_scale: torch.Tensor | None = None, amax: torch.Tensor | None = None) -> None:  # fmt: skip
    """The kernel over p's elements, in place on p, m and v; g divided by grad_scale where given;
    amax (see `adamw_step_`) overwritten where given."""
    check_adamw_args(p, g, m, v, grad_scale, amax)
    if p.numel() == 0:
        return
    scalars = (s.decay, s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2, s.step_size, s.inv_bc2_sqrt, s.eps)
    flags = dict(HAS_SCALE=grad_scale is not None, ROUND_BF16=triton_interpret() and m.dtype == torch.bfloat16)
    scale = p if grad_scale is None else grad_scale  # p: an unread placeholder pointer
    if amax is None:
        _adamw_kernel[(triton.cdiv(p.numel(), BLOCK),)](
            p, g, m, v, scale, p.numel(), *scalars, **flags, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False
        )
        return
    N, K = p.shape[-2:]
    amax.zero_()
    block_r = min(AMAX_BLOCK_R, N & -N)  # a power of two dividing N: a tile within one expert
    block_k = min(BLOCK // block_r, triton.next_power_of_2(K))
    grid = (triton.cdiv(p.numel() // K, block_r), triton.cdiv(K, block_k))
    _adamw_amax_kernel[grid](
        p, g, m, v, scale, amax, p.numel() // K, N, K, *scalars, **flags, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip


def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamWScalars,
                grad_scale: torch.Tensor | None = None, amax: torch.Tensor | None = None) -> None:  # fmt: skip
    """One AdamW step of p (fp32) with moments m, v (both bf16 or both fp32), in place, on
    g / grad_scale where given: the kernel on a GPU or under the interpreter, else the reference
    (kernels/common.py `use_triton`). amax: None, or for p of shape (E, N, K) an int32 tensor of
    E * N + E * K elements that gets the rowwise amaxes of the new p's bf16 rounding as fp32 bits,
    rows then columns: what kernels/quantize_weight.py's rowwise amax pass would read from p."""
    (triton_adamw_step_ if use_triton(p) else torch_adamw_step_)(p, g, m, v, s, grad_scale, amax)
