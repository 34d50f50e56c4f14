"""Pure-torch references of the unpermute + combine kernels (kernels/combine.py).

The sums run in fp32 (fp64 for fp64 inputs: gradcheck), over a = 0..A-1 in that order, as the
kernels add them, so kernel and reference agree bit for bit. Dropped assignments are removed
with `where` (their rows may hold NaN; 0 * NaN is NaN) and their row index is never read.

Shape letters (README.md): T tokens, A experts a token is routed to, M = T*A routed rows,
H hidden size.
"""

from __future__ import annotations

import torch

from kernels.contracts import check_combine_args, check_gather_args


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    acc = torch.float32  # fp64 inputs (gradcheck) accumulate in fp64
    for t in tensors:
        acc = torch.promote_types(acc, t.dtype)
    return acc


def _kept_rows(x_MH: torch.Tensor, row_of_TA: torch.Tensor, kept_TA: torch.Tensor, a: int, acc: torch.dtype):
    """x_MH's row of each token's assignment a in the accumulation dtype (row 0 for a dropped one)."""
    return x_MH.index_select(0, torch.where(kept_TA[:, a], row_of_TA[:, a], 0)).to(acc)


def torch_unpermute_combine(
    y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor, kept_TA: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum over kept a, in order, of w[t, a] * y[row_of_TA[t, a]]; returns y's dtype."""
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    T, A = row_of_TA.shape
    acc = _acc_dtype(y_MH, weights_TA)
    out_TH = torch.zeros(T, y_MH.shape[1], dtype=acc, device=y_MH.device)
    for a in range(A):
        y_TH = _kept_rows(y_MH, row_of_TA, kept_TA, a, acc)
        out_TH = out_TH + torch.where(kept_TA[:, a, None], weights_TA[:, a, None].to(acc) * y_TH, 0.0)
    return out_TH.to(y_MH.dtype)


def torch_gather_sum(
    dx_MH: torch.Tensor, row_of_TA: torch.Tensor, kept_TA: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """dx[t] = sum over kept a, in order, of dx_MH[row_of_TA[t, a]], cast once to out_dtype: the
    permutation's backward, unpermute_combine without weights."""
    check_gather_args(dx_MH, row_of_TA, kept_TA)
    T, A = row_of_TA.shape
    acc = _acc_dtype(dx_MH)
    dx_TH = torch.zeros(T, dx_MH.shape[1], dtype=acc, device=dx_MH.device)
    for a in range(A):
        dx_TH = dx_TH + torch.where(kept_TA[:, a, None], _kept_rows(dx_MH, row_of_TA, kept_TA, a, acc), 0.0)
    return dx_TH.to(out_dtype)


def torch_unpermute_combine_bwd(
    dout_TH: torch.Tensor, y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor,
    kept_TA: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dy_MH, dweights_TA): dy[row(t, a)] = w[t, a] * dout[t] for kept (t, a) and 0 for dropped,
    rows no assignment points at are 0; dweights[t, a] = <dout[t], y[row(t, a)]> (0 if dropped)."""
    check_combine_args(y_MH, row_of_TA, weights_TA, kept_TA)
    T, A = row_of_TA.shape
    M = y_MH.shape[0]
    acc = _acc_dtype(y_MH, weights_TA)
    g_TH = dout_TH.to(acc)
    dy_MH = torch.zeros(M + 1, y_MH.shape[1], dtype=y_MH.dtype, device=y_MH.device)  # row M: a sink
    dw_TA = torch.zeros(T, A, dtype=acc, device=y_MH.device)
    for a in range(A):
        kept_T, rows_T = kept_TA[:, a], row_of_TA[:, a]
        valid_T = (rows_T >= 0) & (rows_T < M)
        dy_TH = torch.where(kept_T[:, None], g_TH * weights_TA[:, a, None].to(acc), 0.0)
        dy_MH.index_copy_(0, torch.where(valid_T, rows_T, M), dy_TH.to(y_MH.dtype))
        dw_TA[:, a] = torch.where(kept_T, (g_TH * _kept_rows(y_MH, row_of_TA, kept_TA, a, acc)).sum(dim=1), 0.0)
    return dy_MH[:M], dw_TA.to(weights_TA.dtype)
