"""The one CPU emulation of a scaled FP8 GEMM, and with it the pure-torch references of the grouped
GEMM kernels (kernels/grouped_gemm.py).

Emulating a scaled GEMM is two steps, shared by every caller (these references, the rowwise
experts' CPU path in moe/fp8/gemm.py, Float8Linear's CPU path in moe/fp8/float8_linear.py):
`dequantize` (kernels/common.py) both operands to fp32, then `emulated_grouped_mm` or
`emulated_grouped_mm_wgrad` in fp32 (a plain GEMM is one group). The kernels promote per 128-wide
K block and the hardware accumulates in its own order; in exact arithmetic that is the same sum,
so kernel and emulation differ only by fp32 accumulation order. The loops read group ends on the
host (a sync): fine for a reference and the CPU path, never used inside a GPU training step.

Shape letters (README.md): M rows (grouped by expert), K reduction dim, N output dim, E experts,
P padded rows (each group's tokens start at a multiple of 128 in the weight gradient); Kb, Nb,
Pb = K, N, P // 128 scale blocks.
"""

from __future__ import annotations

import torch

from kernels.common import dequantize
from kernels.contracts import check_grouped_mm_args, check_grouped_mm_wgrad_args


def _group_ranges(ends: torch.Tensor, limit: int) -> list[tuple[int, int, int]]:
    """(group, start, end) of each non-empty group, ends clamped to `limit` (a host sync)."""
    ranges, start = [], 0
    for e, end in enumerate(ends.clamp(max=limit).tolist()):
        if end > start:
            ranges.append((e, start, end))
        start = max(start, end)
    return ranges


def emulated_grouped_mm(a_MK: torch.Tensor, b_ENK: torch.Tensor, group_end_E: torch.Tensor | None = None):
    """fp32 out_MN: out[rows of e] = a[rows of e] @ b[e].T, rows past group_end_E[-1] zero.
    group_end_E None: one group of every row and b (N, K), out = a @ b.T. In fp32 also under an
    enclosing autocast (which would run the matmuls in bf16)."""
    with torch.autocast(a_MK.device.type, enabled=False):
        if group_end_E is None:
            return a_MK.float() @ b_ENK.float().T
        out_MN = torch.zeros(a_MK.shape[0], b_ENK.shape[1], dtype=torch.float32, device=a_MK.device)
        for e, start, end in _group_ranges(group_end_E, a_MK.shape[0]):
            out_MN[start:end] = a_MK[start:end].float() @ b_ENK[e].float().T
        return out_MN


def emulated_grouped_mm_wgrad(a_NP: torch.Tensor, b_KP: torch.Tensor, padded_end_E: torch.Tensor) -> torch.Tensor:
    """fp32 out_ENK: out[e] = a[:, tokens of e] @ b[:, tokens of e].T, a zero block for an expert
    without tokens. In fp32 also under an enclosing autocast."""
    (N, P), K = a_NP.shape, b_KP.shape[0]
    out_ENK = torch.zeros(padded_end_E.shape[0], N, K, dtype=torch.float32, device=a_NP.device)
    with torch.autocast(a_NP.device.type, enabled=False):
        for e, start, end in _group_ranges(padded_end_E, P):
            out_ENK[e] = a_NP[:, start:end].float() @ b_KP[:, start:end].float().T
    return out_ENK


def torch_fp8_grouped_mm(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, group_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # fmt: skip
    """out (M, N): out[rows of e] = dequant(a_q rows) @ dequant(b_q[e]).T; rows past
    group_end[-1] are zeros. a_q (M, K), a_scale (M, Kb), b_q (E, N, K), b_scale (E, Nb, Kb),
    group_end (E,) cumulative row ends."""
    check_grouped_mm_args(a_q, a_scale, b_q, b_scale, group_end, out_dtype)
    return emulated_grouped_mm(dequantize(a_q, a_scale), dequantize(b_q, b_scale), group_end).to(out_dtype)


def torch_fp8_grouped_mm_wgrad(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # fmt: skip
    """out (E, N, K): out[e] = dequant(a_q)[:, tokens of e] @ dequant(b_q)[:, tokens of e].T.
    a_q (N, P), a_scale (N, Pb), b_q (K, P), b_scale (K, Pb), padded_end (E,) cumulative token
    ends (multiples of 128); an expert without tokens gets a zero block."""
    check_grouped_mm_wgrad_args(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=False)
    return emulated_grouped_mm_wgrad(dequantize(a_q, a_scale), dequantize(b_q, b_scale), padded_end).to(out_dtype)


def torch_fp8_grouped_mm_wgrad_rowwise(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # fmt: skip
    """`torch_fp8_grouped_mm_wgrad` with one scale per row and group: a_scale (N, E), b_scale
    (K, E), the column scales `quantize_cols_grouped` writes for the rowwise recipe, so
    out[e] = (a_q[:, tokens of e] @ b_q[:, tokens of e].T) * a_scale[:, e, None] * b_scale[None, :, e]."""
    check_grouped_mm_wgrad_args(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, rowwise=True)
    P = a_q.shape[1]
    group_of_P = torch.searchsorted(padded_end.to(torch.int64), torch.arange(P, device=a_q.device), right=True)
    group_of_P = group_of_P.clamp_max(padded_end.shape[0] - 1)  # padding past every group: zero bytes
    a, b = dequantize(a_q, a_scale[:, group_of_P]), dequantize(b_q, b_scale[:, group_of_P])
    return emulated_grouped_mm_wgrad(a, b, padded_end).to(out_dtype)


def torch_fp8_grouped_mm_wgrad_segments(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    rowwise: bool,
) -> torch.Tensor:  # fmt: skip
    """fp32 (E, N, K): the sum over S segments of each segment's weight gradient (the rowwise or
    blockwise reference above on a_q[s], a_scale[s], b_q[s], b_scale[s], padded_end[s])."""
    ref = torch_fp8_grouped_mm_wgrad_rowwise if rowwise else torch_fp8_grouped_mm_wgrad
    out = ref(a_q[0], a_scale[0], b_q[0], b_scale[0], padded_end[0], torch.float32)
    for s in range(1, a_q.shape[0]):
        out += ref(a_q[s], a_scale[s], b_q[s], b_scale[s], padded_end[s], torch.float32)
    return out
