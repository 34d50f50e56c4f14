"""Pure-torch references of kernels/swiglu.py: SwiGLU forward and backward, with the launchers'
arguments and outputs.

Shape letters (README.md): M rows, F FFN hidden size, X = 2F columns of h ([gate | up], gate first).

    swiglu_fwd(h_MX) -> a_MF = silu(gate) * up
    swiglu_bwd(h_MX, da_MF) -> dh_MX = [da * up * s * (1 + gate * (1 - s)), da * silu(gate)], s = sigmoid(gate)
Outputs in h's dtype, computed in fp32 and rounded once. The fp32 math is kernels/reference_act.py's
(`torch_act`, `torch_act_bwd`: written out in + - * / so that it rounds identically on every backend),
the same functions the FP8 experts' activation kernels are held to; fp64 rows (gradcheck, an fp64
model) are computed in fp64 with torch's sigmoid instead, since that math is fp32 only.
"""

from __future__ import annotations

import torch

from kernels.reference_act import torch_act, torch_act_bwd

SWIGLU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_swiglu_args(h_MX: torch.Tensor, da_MF: torch.Tensor | None = None) -> None:
    """What every path of `swiglu_fwd` / `swiglu_bwd` refuses, with the same ValueError."""
    if h_MX.ndim != 2 or h_MX.shape[1] % 2:
        raise ValueError(f"h_MX must be 2-D (M, 2F) with gate and up halves, got shape {tuple(h_MX.shape)}")
    if h_MX.dtype not in SWIGLU_DTYPES:
        raise ValueError(f"h_MX must be one of {SWIGLU_DTYPES}, got {h_MX.dtype}")
    if da_MF is None:
        return
    M, F = h_MX.shape[0], h_MX.shape[1] // 2
    if da_MF.shape != (M, F):
        raise ValueError(f"da_MF must have shape ({M}, {F}) to match h_MX's (M, 2F), got {tuple(da_MF.shape)}")
    if da_MF.dtype not in SWIGLU_DTYPES:
        raise ValueError(f"da_MF must be one of {SWIGLU_DTYPES}, got {da_MF.dtype}")


def _fp64_sigmoid(h_MX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate, up = h_MX.double().chunk(2, dim=1)
    return gate, up, torch.sigmoid(gate)


def torch_swiglu_fwd(h_MX: torch.Tensor) -> torch.Tensor:
    """a_MF = silu(gate) * up in h's dtype."""
    check_swiglu_args(h_MX)
    if h_MX.dtype == torch.float64:
        gate, up, s = _fp64_sigmoid(h_MX)
        return gate * s * up
    return torch_act(h_MX.float(), "swiglu").to(h_MX.dtype)


def torch_swiglu_bwd(h_MX: torch.Tensor, da_MF: torch.Tensor) -> torch.Tensor:
    """dh_MX, the gradient w.r.t. h of sum(da * swiglu(h)), in h's dtype."""
    check_swiglu_args(h_MX, da_MF)
    if h_MX.dtype == torch.float64:
        gate, up, s = _fp64_sigmoid(h_MX)
        da = da_MF.double()
        return torch.cat([(da * up) * (s * (1.0 + gate * (1.0 - s))), da * (gate * s)], dim=1)
    dh_MX, _ = torch_act_bwd(da_MF.float(), h_MX.float(), "swiglu")
    return dh_MX.to(h_MX.dtype)
