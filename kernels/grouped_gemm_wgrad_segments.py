"""The FP8 weight gradient summed over S segments in one GEMM: out[e] = sum over s of
a_q[s][:, tokens of e in s] @ b_q[s][:, tokens of e in s].T, dequantized by each segment's scales.

A segment is one micro-batch's operands (moe/fp8/deferred_wgrad.py): under gradient accumulation
the experts' weight gradients of a step's micro-batches are made once, in the last backward, with
every micro-batch's tokens in one K loop, instead of each micro-batch reading and writing the fp32
.grad (8 bytes an expert-weight element a micro-batch; at 1024 tokens an expert that traffic,
not the tensor cores, bounds the weight gradient). The kernel is kernels/grouped_gemm_wgrad.py's
with SEGMENTED: its `_segments_tile` docstring says how rowwise scales that change at segment
boundaries are applied.

Shape letters (README.md): S segments, N, K the output's dims, P padded tokens a segment, E experts.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernels.common import use_triton
from kernels.contracts import check_grouped_mm_wgrad_args
from kernels.grouped_gemm import promote_k
from kernels.grouped_gemm_wgrad import check_wgrad_into, run_wgrad
from kernels.reference_gemm import torch_fp8_grouped_mm_wgrad_segments


def check_wgrad_segments_args(a_q_SNP, a_scale, b_q_SKP, b_scale, padded_end_SE, rowwise: bool) -> None:
    """Each segment as `fp8_grouped_mm_wgrad(_rowwise)` takes it, and every input with the same S."""
    if a_q_SNP.dim() != 3 or b_q_SKP.dim() != 3 or padded_end_SE.dim() != 2 or a_scale.dim() != 3 \
            or b_scale.dim() != 3:
        raise ValueError(f"segmented operands are a_q (S, N, P), b_q (S, K, P), scales (S, ., .) and padded_end "
                         f"(S, E), got {tuple(a_q_SNP.shape)}, {tuple(b_q_SKP.shape)}, {tuple(a_scale.shape)}, "
                         f"{tuple(b_scale.shape)}, {tuple(padded_end_SE.shape)}")  # fmt: skip
    lead = {t.shape[0] for t in (a_q_SNP, a_scale, b_q_SKP, b_scale, padded_end_SE)}
    if len(lead) != 1 or 0 in lead:
        raise ValueError(f"every segmented input needs the same number S >= 1 of segments, got {sorted(lead)}")
    check_grouped_mm_wgrad_args(a_q_SNP[0], a_scale[0], b_q_SKP[0], b_scale[0], padded_end_SE[0], torch.float32,
                                rowwise=rowwise)  # fmt: skip


def fp8_grouped_mm_wgrad_segments(
    a_q_SNP: torch.Tensor, a_scale: torch.Tensor, b_q_SKP: torch.Tensor, b_scale: torch.Tensor,
    padded_end_SE: torch.Tensor, rowwise: bool, promotion_interval: int = 128, into: Optional[torch.Tensor] = None,
) -> torch.Tensor:  # fmt: skip
    """The fp32 (E, N, K) weight gradient over S segments (module docstring); with `into` (a
    contiguous fp32 (E, N, K) tensor) added into it in the epilogue and `into` returned. Scales
    per segment as the unsegmented ops take them: rowwise (S, N, E), (S, K, E); blockwise
    (S, N, P/128), (S, K, P/128). In eager mode only (the caller keeps Python state across
    micro-batches); where no kernel runs, the reference."""
    check_wgrad_segments_args(a_q_SNP, a_scale, b_q_SKP, b_scale, padded_end_SE, rowwise)
    promote_k(promotion_interval)
    shape = (padded_end_SE.shape[1], a_q_SNP.shape[1], b_q_SKP.shape[1])
    if into is not None:
        check_wgrad_into(into, shape, a_q_SNP.device)
    if not use_triton(a_q_SNP):
        ref = torch_fp8_grouped_mm_wgrad_segments(a_q_SNP, a_scale, b_q_SKP, b_scale, padded_end_SE, rowwise)
        return ref if into is None else into.add_(ref)
    out = torch.empty(shape, dtype=torch.float32, device=a_q_SNP.device) if into is None else into
    if not run_wgrad(out, a_q_SNP, a_scale, b_q_SKP, b_scale, padded_end_SE, rowwise, promotion_interval,
                     accumulate=into is not None) and into is None:  # fmt: skip
        out.zero_()  # nothing to compute: no tokens in any segment
    return out
