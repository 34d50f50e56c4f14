"""The pure-torch reference of kernels/adamw.py: one AdamW step of one fp32 parameter whose two
moments are stored in bfloat16 (DeepSeek-V3's recipe: fp32 master weights and gradients, BF16
AdamW moments).

The step, in fp32, in this order of roundings (the Triton kernel's, which has FMA contraction off):
    g  = g / grad_scale                  where given: gradient clipping folded into the step
    p1 = p * decay                       decay = 1 - lr * weight_decay (decoupled decay)
    m1 = m + (g - m) * (1 - beta1)       torch's lerp for a weight below 0.5
    v1 = v * beta2 + (g * g) * (1 - beta2)
    p  = p1 - step_size * (m1 / (sqrt(v1) * inv_bc2_sqrt + eps))
    m, v = bf16(m1), bf16(v1)            round to nearest even, after the update used them in fp32
with step_size = lr / (1 - beta1 ** t) and inv_bc2_sqrt = 1 / sqrt(1 - beta2 ** t) at step t, which
the caller computes in double and passes (`AdamWScalars`). torch.optim.AdamW takes the same step up
to where it rounds; only storing the moments in bf16 (8 significant bits) differs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class AdamWScalars(NamedTuple):
    """The per-step constants of one parameter group, from its hyperparameters and step t."""

    decay: float
    beta1: float
    beta2: float
    step_size: float
    inv_bc2_sqrt: float
    eps: float

    @classmethod
    def at(cls, step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> "AdamWScalars":
        beta1, beta2 = betas
        return cls(1.0 - lr * weight_decay, beta1, beta2, lr / (1.0 - beta1**step),
                   1.0 / math.sqrt(1.0 - beta2**step), eps)  # fmt: skip


def check_adamw_args(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                     grad_scale: torch.Tensor | None = None, amax: torch.Tensor | None = None) -> None:
    """p fp32, g fp32 or bf16, m and v both bf16 or both fp32, all of p's shape, contiguous, on p's
    device; grad_scale None or one fp32 element on p's device; amax None, or for p (E, N, K) int32
    of E * N + E * K elements on p's device."""
    if amax is not None:
        want = p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.dim() == 3 and p.numel() else None
        if p.dim() != 3 or amax.dtype != torch.int32 or amax.numel() != want or amax.device != p.device:
            count = "E * N + E * K" if want is None else f"E * N + E * K = {want}"
            raise ValueError(f"amax is for an (E, N, K) parameter: int32, {count} elements on {p.device}; "
                             f"got {amax.dtype}, {amax.numel()} elements on {amax.device} for a parameter of "
                             f"shape {tuple(p.shape)}")  # fmt: skip
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.dtype != torch.float32
                                   or grad_scale.device != p.device):
        raise ValueError(f"grad_scale must be one float32 element on {p.device}, got {grad_scale.dtype} of "
                         f"shape {tuple(grad_scale.shape)} on {grad_scale.device}")
    if p.dtype != torch.float32:
        raise ValueError(f"FusedAdamW updates fp32 master weights, got a {p.dtype} parameter")
    if g.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the gradient must be float32 or bfloat16, got {g.dtype}")
    for name, t in (("exp_avg", m), ("exp_avg_sq", v)):
        if t.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be bfloat16 or float32, got {t.dtype}")
    if m.dtype != v.dtype:
        raise ValueError(f"exp_avg and exp_avg_sq must share a dtype, got {m.dtype} and {v.dtype}")
    for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(f"{name} must have the parameter's shape {tuple(p.shape)} on {p.device}, "
                             f"got {tuple(t.shape)} on {t.device}")  # fmt: skip
    for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the step reads every tensor as one flat range)")


@torch.no_grad()
def torch_adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: AdamWScalars,
                      grad_scale: torch.Tensor | None = None, amax: torch.Tensor | None = None) -> None:  # fmt: skip
    """One step in place on p (fp32), m and v (bf16 or fp32), module docstring's order of roundings;
    the gradient divided by grad_scale first where given (g itself is not written); amax: the new
    p's rowwise amaxes (kernels/adamw.py `adamw_step_`)."""
    check_adamw_args(p, g, m, v, grad_scale, amax)
    g32 = g.float() if grad_scale is None else g.float() / grad_scale.reshape(())
    # fp32 moments are updated in their own storage; bf16 ones in fp32 copies, stored once at the
    # end. In-place or not, each fp32 operation below rounds once, in this order:
    #   m1 = m + (g - m) * (1 - beta1);  v1 = v * beta2 + (g * g) * (1 - beta2)
    #   p  = p * decay - step_size * (m1 / (sqrt(v1) * inv_bc2_sqrt + eps))
    m1, v1 = (m, v) if m.dtype == torch.float32 else (m.float(), v.float())
    t = g32 - m1
    m1.add_(t.mul_(1.0 - s.beta1))
    v1.mul_(s.beta2).add_(torch.mul(g32, g32, out=t).mul_(1.0 - s.beta2))
    # The square root in fp64, rounded once to fp32: correctly rounded, as the kernel's sqrt_rn and
    # CUDA's sqrtf are, where torch's vectorized CPU sqrt is not (~1 result in 6 an ulp off).
    denom = v1.double().sqrt().float().mul_(s.inv_bc2_sqrt).add_(s.eps)
    p.mul_(s.decay)
    p.sub_(torch.div(m1, denom, out=denom).mul_(s.step_size))
    if m1 is not m:
        m.copy_(m1)
        v.copy_(v1)
    if amax is not None:
        a = p.to(torch.bfloat16).float().abs()
        amax.copy_(torch.cat([a.amax(dim=2).flatten(), a.amax(dim=1).flatten()]).view(torch.int32))
