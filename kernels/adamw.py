"""One pass of AdamW over an fp32 parameter with bfloat16 moments: `adamw_step_`.

Per element the kernel reads p (4 bytes), g (4, or 2 for a bf16 gradient), m and v (2 each) and
writes p, m and v (8): 20 bytes, where torch's fused AdamW with fp32 moments moves 28, and the
state is 4 bytes a parameter instead of 8 (optim.state_dtype=bfloat16, trainer/optim_bf16.py).

The math and its order of roundings are kernels/reference_adamw.py's. FMA contraction is off and
the square root and the quotient are IEEE (sqrt_rn, div_rn), so each element's fp32 operations
round exactly as the reference's; under Triton's interpreter the bf16 stores round to nearest
even first (its cast truncates). tests/test_optim_bf16.py compares the two.

Shape letters (README.md): N a parameter's elements, flattened.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import tl_round_to_bf16_grid, triton_interpret, use_triton
from kernels.reference_adamw import AdamWScalars, check_adamw_args, torch_adamw_step_

BLOCK = 2048  # elements a program: 8 warps of 256


@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, scale_ptr, N,
    decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_bc2_sqrt, eps,
    HAS_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p * decay
    p = p - step_size * tl.div_rn(m, denom)
    if ROUND_BF16:
        m = tl_round_to_bf16_grid(m)
        v = tl_round_to_bf16_grid(v)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m.to(tl.bfloat16), mask=mask)
    tl.store(v_ptr + offs, v.to(tl.bfloat16), mask=mask)


def triton_adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamWScalars,
                       grad_scale: torch.Tensor | None = None) -> None:  # fmt: skip
    """The kernel over p's N elements, in place on p, m and v; g divided by grad_scale where given."""
    check_adamw_args(p, g, m, v, grad_scale)
    N = p.numel()
    if N == 0:
        return
    _adamw_kernel[(triton.cdiv(N, BLOCK),)](
        p, g, m, v, p if grad_scale is None else grad_scale, N,  # p: an unread placeholder pointer
        s.decay, s.beta1, s.beta2, 1.0 - s.beta1, 1.0 - s.beta2, s.step_size, s.inv_bc2_sqrt, s.eps,
        HAS_SCALE=grad_scale is not None, ROUND_BF16=triton_interpret(), BLOCK=BLOCK, num_warps=8,
        enable_fp_fusion=False,
    )


def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamWScalars,
                grad_scale: torch.Tensor | None = None) -> None:  # fmt: skip
    """One AdamW step of p (fp32) with moments m, v (bf16), in place, on g / grad_scale where given:
    the kernel on a GPU or under the interpreter, else the reference (kernels/common.py `use_triton`)."""
    (triton_adamw_step_ if use_triton(p) else torch_adamw_step_)(p, g, m, v, s, grad_scale)
