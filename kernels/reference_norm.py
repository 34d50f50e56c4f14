"""Pure-torch references of kernels/rmsnorm.py: the residual add fused with RMSNorm, forward and
backward, with the launchers' arguments and outputs.

Shape letters (README.md): M rows (tokens, or tokens x heads for the per-head q/k norms), H the
normalised size.

    z = x + r (r optional; z in torch's promoted dtype of x and r)
    rstd = rsqrt(mean(z^2) + eps)                  fp32 (fp64 for fp64 rows), one per row
    y = ((z * rstd) * w).to(z.dtype)
Backward, with xhat = z * rstd, g = dy * w and dz the gradient reaching z from the residual path:
    dz_total = (g - xhat * (sum(g * xhat) / H)) * rstd + dz      -> dx (x's dtype), dr (r's dtype)
    dw = sum over rows of dy * xhat

The forward is the model's RMSNorm as it always computed it (fp32 statistics of the fp32 rows: bf16's
8 mantissa bits lose the mean of squares over thousands of channels). Every line below is one
rounding in the accumulation dtype, in the order the kernels compute it.
"""

from __future__ import annotations

import torch

NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_rms_norm_args(x_MH: torch.Tensor, r_MH: torch.Tensor | None, w_H: torch.Tensor) -> None:
    """What every path of `add_rms_norm_fwd` refuses, with the same ValueError (the launcher, its
    fake and this reference all call it first)."""
    if x_MH.ndim != 2:
        raise ValueError(f"x_MH must be 2-D (M, H), got shape {tuple(x_MH.shape)}")
    if w_H.shape != x_MH.shape[1:]:
        raise ValueError(f"w_H must have shape ({x_MH.shape[1]},) to match x_MH's H, got {tuple(w_H.shape)}")
    if r_MH is not None and r_MH.shape != x_MH.shape:
        raise ValueError(f"r_MH must have x_MH's shape {tuple(x_MH.shape)}, got {tuple(r_MH.shape)}")
    for name, t in (("x_MH", x_MH), ("r_MH", r_MH), ("w_H", w_H)):
        if t is not None and t.dtype not in NORM_DTYPES:
            raise ValueError(f"{name} must be one of {NORM_DTYPES}, got {t.dtype}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 rows (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def torch_add_rms_norm_fwd(
    x_MH: torch.Tensor, r_MH: torch.Tensor | None, w_H: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_MH, z_MH, rstd_M); z_MH is empty without r (z is x itself)."""
    check_rms_norm_args(x_MH, r_MH, w_H)
    z_MH = x_MH if r_MH is None else x_MH + r_MH
    acc = _acc(z_MH.dtype)
    z = z_MH.to(acc)
    rstd_M = torch.rsqrt(z.pow(2).mean(-1) + eps)
    y_MH = ((z * rstd_M[:, None]) * w_H.to(acc)).to(z_MH.dtype)
    return y_MH, (z_MH if r_MH is not None else x_MH.new_empty(0)), rstd_M


def torch_add_rms_norm_bwd(
    dy_MH: torch.Tensor, dz_MH: torch.Tensor | None, z_MH: torch.Tensor, w_H: torch.Tensor, rstd_M: torch.Tensor,
    x_dtype: torch.dtype, r_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx_MH in x_dtype, dr_MH in r_dtype (empty when r_dtype is None), dw_H in w's dtype)."""
    acc = _acc(z_MH.dtype)
    xhat = z_MH.to(acc) * rstd_M[:, None].to(acc)
    dy = dy_MH.to(acc)
    g = dy * w_H.to(acc)
    c_M = (g * xhat).sum(-1) * (1.0 / z_MH.shape[-1])
    dz = (g - xhat * c_M[:, None]) * rstd_M[:, None].to(acc)
    if dz_MH is not None:
        dz = dz + dz_MH.to(acc)
    dw_H = (dy * xhat).sum(0).to(w_H.dtype)
    dr_MH = dz.to(r_dtype) if r_dtype is not None else dz.new_empty(0)
    return dz.to(x_dtype), dr_MH, dw_H


def torch_add_rms_norm(
    x_MH: torch.Tensor, r_MH: torch.Tensor | None, w_H: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) as plain autograd ops over any leading dims: the definition the tests hold both
    paths to (its gradients are autograd's, not the formula above)."""
    z = x_MH if r_MH is None else x_MH + r_MH
    z32 = z.to(_acc(z.dtype))
    y = z32 * torch.rsqrt(z32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w_H.to(z32.dtype)).to(z.dtype), z
