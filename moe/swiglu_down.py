"""y = down(swiglu(h)): a SwiGLU MLP's activation and second projection as one autograd node that
saves h and the weight only; backward recomputes a = swiglu(h).

Shape letters (README.md): M rows, H hidden, F FFN hidden size, X = 2F ([gate | up], gate first),
E experts.

    swiglu_down(h_MX, w2_EHF, group_end_E)  the routed experts: the grouped GEMM torch._grouped_mm
                                            over the expert groups (moe/experts.py)
    swiglu_down(h_MX, w2_HF)                a dense MLP or shared experts: a @ w2.T (nn.Linear layout)

Autograd over the plain ops keeps, besides h, silu(gate) (M, F) and a (M, F) for backward: 2cMF
bytes a layer more (c the compute dtype's size; Mixtral-8x7B's 32 layers at 2048 tokens a rank,
M = 4096 rows, without activation checkpointing: 7.0 GiB a GPU) for one elementwise pass that
backward redoes from h (kernels/swiglu.py, one read of h and one write of a). The weight
gradient uses the same GEMMs as the plain ops' backward (torch's derivative formula of
_grouped_mm and of mm), on the recomputed a.
"""

from __future__ import annotations

import torch

from kernels.swiglu import swiglu_bwd, swiglu_fwd


def _down(a_MF: torch.Tensor, w2: torch.Tensor, group_end_E: torch.Tensor | None) -> torch.Tensor:
    if group_end_E is None:
        return a_MF @ w2.t()
    return torch._grouped_mm(a_MF, w2.transpose(-2, -1), offs=group_end_E)


class SwiGLUDown(torch.autograd.Function):
    """`swiglu_down`'s node: saves h, w2 and the group ends. Usage: SwiGLUDown.apply(h_MX, w2, group_end_E)."""

    @staticmethod
    def forward(ctx, h_MX, w2, group_end_E):
        ctx.save_for_backward(h_MX, w2, group_end_E)
        return _down(swiglu_fwd(h_MX), w2, group_end_E)

    @staticmethod
    def backward(ctx, dy_MH):
        h_MX, w2, group_end_E = ctx.saved_tensors
        dy_MH = dy_MH.contiguous()
        a_MF = swiglu_fwd(h_MX) if ctx.needs_input_grad[1] else None
        dh_MX = dw2 = None
        if group_end_E is None:
            if ctx.needs_input_grad[0]:
                dh_MX = swiglu_bwd(h_MX, dy_MH @ w2)
            if a_MF is not None:
                dw2 = dy_MH.t() @ a_MF
        else:
            if ctx.needs_input_grad[0]:
                dh_MX = swiglu_bwd(h_MX, torch._grouped_mm(dy_MH, w2, offs=group_end_E))
            if a_MF is not None:
                dw2 = torch._grouped_mm(dy_MH.t(), a_MF, offs=group_end_E)
        return dh_MX, dw2, None


def swiglu_down(h_MX: torch.Tensor, w2: torch.Tensor, group_end_E: torch.Tensor | None = None) -> torch.Tensor:
    """down(silu(gate) * up) -> (M, H). w2: (H, F), or (E, H, F) with group_end_E the int32 cumulative
    row ends of the expert groups (rows past the last end come back unspecified, as from
    torch._grouped_mm). h and w2 in one dtype, the compute dtype."""
    if h_MX.ndim != 2 or w2.shape[-1] * 2 != h_MX.shape[1]:
        raise ValueError(f"h_MX must be (M, 2F) for w2 of shape {tuple(w2.shape)} (F last), got {tuple(h_MX.shape)}")
    if w2.ndim != (2 if group_end_E is None else 3):
        raise ValueError(f"w2 must be (H, F) without group ends and (E, H, F) with them, got {tuple(w2.shape)}")
    if h_MX.dtype != w2.dtype:
        raise ValueError(f"h_MX and w2 must share the compute dtype, got {h_MX.dtype} and {w2.dtype}")
    return SwiGLUDown.apply(h_MX, w2, group_end_E)
