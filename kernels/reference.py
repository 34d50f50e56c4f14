"""Pure-torch references of the quantization kernels (kernels/quantize*.py): `torch_x` for each
entry point `x` (launcher `triton_x`), same arguments, same outputs.

Tests compare each kernel with its reference bit for bit (FP8 bytes, scales, offsets), on the GPU
and under Triton's interpreter; plain CPU calls outside the interpreter run these
(kernels/dispatch.py). References of the other kernels: kernels/reference_act.py (activation +
quantization), kernels/reference_combine.py (unpermute + combine), kernels/reference_gemm.py
(grouped GEMMs, and the one CPU emulation of a scaled GEMM). A `stats` buffer (kernels/fp8_stats.py)
gets the statistics of the cast its kernel counts (`torch_fp8_stats_add`).

Shape letters (README.md): M rows, K reduction dim (the row length here), N output dim, E experts,
P padded rows; Kb = K // 128, Nb = N // 128, Pb = P // 128 scale blocks.
"""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE, FP32_MIN_NORMAL, torch_fp8_inverse, torch_fp8_quantize, torch_fp8_scale
from kernels.fp8_stats import check_stats_arg, torch_fp8_stats_add
from kernels.contracts import (
    check_amax_arg,
    check_quantize_cols_grouped_args,
    check_quantize_rows_and_cols_grouped_args,
    check_quantize_rows_args,
    check_quantize_tensor_args,
    check_quantize_weight_args,
    padded_size,
)


def torch_quantize_rows(
    x_MK: torch.Tensor, block_k: int = 0, pow2_scale: bool = False, row_index_M: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize each row (block_k=0: scale (M,)) or each 1x128 tile (block_k=128: scale (M, Kb)).

    With row_index_M the rows are x_MK[row_index_M] (permute + quantize); output has that many rows.
    stats: the statistics of q_MK's cast.
    """
    check_quantize_rows_args(x_MK, block_k)
    check_stats_arg(stats, x_MK, 1)
    x = (x_MK if row_index_M is None else x_MK[row_index_M]).float()
    M, K = x.shape
    span = block_k or K
    spans = x.view(M, K // span, span)  # each row in K // span scale spans of `span` elements
    scale = torch_fp8_scale(spans.abs().amax(dim=2, keepdim=True), pow2_scale)
    q_MK = torch_fp8_quantize(spans, scale).view(M, K)
    torch_fp8_stats_add(stats, spans, torch_fp8_inverse(scale))
    return q_MK, (scale.view(M) if block_k == 0 else scale.view(M, K // span))


def _grouped_rows(x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int):
    """Per row of x (grouped order): group id (E for rows past group_end_E[-1]) and padded
    position; and the padded group ends."""
    M = x_MK.shape[0]
    end_E = group_end_E.long()
    size_E = end_E - torch.cat([end_E.new_zeros(1), end_E[:-1]])
    padded_size_E = (size_E + align - 1) // align * align
    padded_end_E = torch.cumsum(padded_size_E, 0)
    row_M = torch.arange(M, device=x_MK.device)
    gid_M = torch.searchsorted(end_E, row_M, right=True)
    g_M = gid_M.clamp(max=end_E.numel() - 1)
    pos_M = padded_end_E[g_M] - padded_size_E[g_M] + row_M - (end_E - size_E)[g_M]
    return gid_M, pos_M, padded_end_E


def torch_quantize_cols_grouped(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int = 16, block_m: int = 0, pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Multi pad-cast-transpose for the weight-gradient GEMMs.

    Rows of x (x_MK[row_index_M] if given) are grouped by expert, group e ending at group_end_E[e];
    rows past group_end_E[-1] belong to no group and are dropped. Returns
      qt_KP   fp8 (K, P), P = round_up(M, align) + E * align: group e's rows transposed into
              columns [padded_start_e, padded_start_e + size_e); every other column is zero;
      scale   fp32 (K, E) per column per group (block_m=0), or (K, Pb) per 1x128 tile along
              tokens (block_m=128, align a multiple of 128; all-padding tiles get scale 1);
      padded_end_E int32, cumulative round_up(size_e, align).
    """
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block_m)
    x = (x_MK if row_index_M is None else x_MK[row_index_M]).float()
    M, K = x.shape
    E = group_end_E.numel()
    P = padded_size(M, E, align)
    gid_M, pos_M, padded_end_E = _grouped_rows(x, group_end_E, align)
    valid_M = gid_M < E
    x_PK = x.new_zeros(P, K)
    x_PK[pos_M[valid_M]] = x[valid_M]
    if block_m == 0:
        gid_P = torch.full((P,), E, dtype=torch.long, device=x.device)
        gid_P[pos_M[valid_M]] = gid_M[valid_M]
        amax_EK = x.new_zeros(E + 1, K).scatter_reduce_(0, gid_P[:, None].expand(P, K), x_PK.abs(), "amax")[:E]
        scale_EK = torch_fp8_scale(amax_EK, pow2_scale)
        scale_PK = torch.cat([scale_EK, scale_EK.new_ones(1, K)])[gid_P]
        q_PK = torch_fp8_quantize(x_PK, scale_PK)
        scale = scale_EK.t().contiguous()
    else:
        scale_PbK = torch_fp8_scale(x_PK.abs().view(P // block_m, block_m, K).amax(dim=1), pow2_scale)
        q_PK = torch_fp8_quantize(x_PK.view(P // block_m, block_m, K), scale_PbK[:, None, :]).view(P, K)
        scale = scale_PbK.t().contiguous()
    qt_KP = q_PK.view(torch.uint8).t().contiguous().view(FP8_DTYPE)
    return qt_KP, scale, padded_end_E.int()


def torch_quantize_rows_and_cols_grouped(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int = 16, block: int = 0, pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None, stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(q_MK, row_scale) of torch_quantize_rows(block_k=block) followed by the three outputs of
    torch_quantize_cols_grouped(block_m=block): both operands of the FP8 GroupedMLP input.
    stats: the statistics of q_MK's cast (the rows, every one of the M, the forward operand)."""
    check_quantize_rows_and_cols_grouped_args(x_MK, group_end_E, align, block)
    q_MK, row_scale = torch_quantize_rows(x_MK, block, pow2_scale, row_index_M, stats)
    return (q_MK, row_scale, *torch_quantize_cols_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M))


def torch_quantize_weight(
    w_ENK: torch.Tensor, scaling: str = "rowwise", pow2_scale: bool = False, round_bf16: bool = False,
    stats: torch.Tensor | None = None, amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Both FP8 operands of the expert weights, for the forward and the transposed GEMMs.

    Returns (q_ENK, scale, qt_EKN, scale_t): q_ENK scaled along K, qt_EKN (contiguous (E, K, N))
    scaled along N. rowwise: scale (E, N), scale_t (E, K); blockwise (128x128 blocks, N and K
    multiples of 128): scale (E, Nb, Kb) and scale_t its transpose (E, Kb, Nb), qt_EKN is
    exactly q_ENK transposed; tensorwise: scale and scale_t (E,), qt_EKN = q_ENK^T.
    round_bf16: the values quantized are w_ENK rounded to bf16 first. stats: the statistics of
    q_ENK's cast (the forward operand; the transposed copy holds the same values). amax (rowwise):
    the row and column amaxes given, as fp32 bits (kernels/contracts.py `check_amax_arg`).
    """
    check_quantize_weight_args(w_ENK, scaling)
    check_stats_arg(stats, w_ENK, 1)
    check_amax_arg(amax, w_ENK, scaling, round_bf16)
    w = (w_ENK.to(torch.bfloat16) if round_bf16 else w_ENK).float()
    E, N, K = w.shape
    if scaling == "rowwise":
        rows, cols = (w.abs().amax(dim=2), w.abs().amax(dim=1)) if amax is None else (
            amax[: E * N].view(torch.float32).view(E, N), amax[E * N :].view(torch.float32).view(E, K))
        scale = torch_fp8_scale(rows, pow2_scale)
        scale_t = torch_fp8_scale(cols, pow2_scale)
        q_ENK = torch_fp8_quantize(w, scale[:, :, None])
        torch_fp8_stats_add(stats, w, torch_fp8_inverse(scale[:, :, None]))
        qt_EKN = torch_fp8_quantize(w, scale_t[:, None, :]).view(torch.uint8).transpose(1, 2)
        return q_ENK, scale, qt_EKN.contiguous().view(FP8_DTYPE), scale_t
    if scaling == "blockwise":
        blocks = w.view(E, N // 128, 128, K // 128, 128)  # (E, Nb, 128, Kb, 128)
        scale = torch_fp8_scale(blocks.abs().amax(dim=(2, 4)), pow2_scale)
        q_ENK = torch_fp8_quantize(blocks, scale[:, :, None, :, None]).view(E, N, K)
        torch_fp8_stats_add(stats, blocks, torch_fp8_inverse(scale[:, :, None, :, None]))
        scale_t = scale.transpose(1, 2).contiguous()
    else:
        scale = torch_fp8_scale(w.abs().amax(dim=(1, 2)), pow2_scale)
        q_ENK = torch_fp8_quantize(w, scale[:, None, None])
        torch_fp8_stats_add(stats, w, torch_fp8_inverse(scale[:, None, None]))
        scale_t = scale.clone()
    qt_EKN = q_ENK.view(torch.uint8).transpose(1, 2).contiguous().view(FP8_DTYPE)
    return q_ENK, scale, qt_EKN, scale_t


def torch_quantize_tensor(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, amax): q = clamp(x * (1 / scale), -fmax, fmax) in fp8_dtype (x's shape), amax = max|x|
    (fp32, 0-dim). One given scale for the whole tensor (delayed scaling: from the amax history;
    current scaling: from this tensor's amax, taken first), E4M3 (fmax 448) or E5M2 (57344); the
    amax comes back for the next step's history.

    A scale below the scale rule's floor 2**-126 (which the rule never gives) acts as the floor:
    the inverse of a subnormal scale is inf, and 0 * inf would turn zeros into NaN."""
    check_quantize_tensor_args(x, scale, fp8_dtype)
    fmax = torch.finfo(fp8_dtype).max
    xf = x.float()
    inv = torch_fp8_inverse(scale.reshape(()).clamp_min(FP32_MIN_NORMAL))
    q = (xf * inv).clamp(-fmax, fmax).to(fp8_dtype)
    amax = xf.abs().amax() if xf.numel() else torch.zeros((), dtype=torch.float32, device=x.device)
    return q, amax
