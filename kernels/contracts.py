"""What each kernel entry point accepts: the argument checks that its Triton launcher, its fake
(torch.compile) implementation and its pure-torch reference all run first, so that every path
refuses the same input with the same `ValueError`; and the host-side sizes they agree on.

Shape letters (README.md): M rows (routed rows, grouped by expert), K reduction dim, N output
dim, E experts, P padded rows (each group starts at a multiple of `align`), F expert FFN hidden
size, X = 2F (SwiGLU) or F (GELU), T tokens, A experts a token is routed to, H hidden size.
"""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE, round_up

QUANT_BLOCKS = (0, 128)  # 0: one scale per row / column (rowwise); 128: 1x128 tiles (blockwise)
WEIGHT_MODES = ("rowwise", "blockwise", "tensorwise")
ACT_FUNCS = ("swiglu", "gelu")
TENSOR_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # quantize_tensor's formats
GEMM_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMM_SCALE_BLOCK = 128  # the grouped GEMMs: one scale per 128 of K (activations), 128x128 (weights)


def padded_size(M: int, E: int, align: int) -> int:
    """P, the host-side upper bound on sum_e round_up(size_e, align): no device sync needed."""
    return round_up(M, align) + E * align


# ---- quantization (kernels/quantize*.py) --------------------------------------------------------


def check_quantize_rows_args(x_MK: torch.Tensor, block_k: int) -> None:
    if x_MK.ndim != 2:
        raise ValueError(f"x_MK must be 2-D (M, K), got shape {tuple(x_MK.shape)}")
    if block_k not in QUANT_BLOCKS:
        raise ValueError(f"block_k must be one of {QUANT_BLOCKS}, got {block_k}")
    K = x_MK.shape[1]
    if K == 0 or (block_k and K % block_k):
        raise ValueError(f"K={K} must be positive and a multiple of block_k={block_k} when block_k > 0")


def check_quantize_cols_grouped_args(x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int, block_m: int) -> None:
    if x_MK.ndim != 2 or x_MK.shape[1] == 0:
        raise ValueError(f"x_MK must be 2-D (M, K) with K > 0, got shape {tuple(x_MK.shape)}")
    if group_end_E.ndim != 1 or group_end_E.numel() == 0 or group_end_E.is_floating_point():
        raise ValueError("group_end_E must be a non-empty 1-D integer tensor of cumulative row offsets")
    if block_m not in QUANT_BLOCKS:
        raise ValueError(f"block_m must be one of {QUANT_BLOCKS}, got {block_m}")
    if align <= 0 or align % 16 or (block_m and align % block_m):
        raise ValueError(
            f"align must be a positive multiple of 16 (and of block_m={block_m} when block_m > 0), got {align}"
        )


def check_quantize_rows_and_cols_grouped_args(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int, block: int
) -> None:
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block)
    check_quantize_rows_args(x_MK, block)


def check_quantize_weight_args(w_ENK: torch.Tensor, scaling: str) -> None:
    if w_ENK.ndim != 3 or w_ENK.shape[1] == 0 or w_ENK.shape[2] == 0:
        raise ValueError(f"w_ENK must be 3-D (E, N, K) with N, K > 0, got shape {tuple(w_ENK.shape)}")
    if scaling not in WEIGHT_MODES:
        raise ValueError(f"scaling must be one of {WEIGHT_MODES}, got {scaling!r}")
    if scaling == "blockwise" and (w_ENK.shape[1] % 128 or w_ENK.shape[2] % 128):
        raise ValueError(f"blockwise scaling needs N and K multiples of 128, got {tuple(w_ENK.shape[1:])}")


def check_amax_arg(amax: torch.Tensor | None, w_ENK: torch.Tensor, scaling: str, round_bf16: bool) -> None:
    """amax: None, or for rowwise the amaxes of w_ENK's bf16 rounding (round_bf16, or a bf16 w_ENK)
    as fp32 bits, int32 (E * N + E * K,): rows then columns (kernels/adamw.py writes them)."""
    if amax is None:
        return
    E, N, K = w_ENK.shape
    if scaling != "rowwise" or not (round_bf16 or w_ENK.dtype == torch.bfloat16):
        raise ValueError(f"a given amax is the rowwise amax of the weight's bf16 rounding: it takes scaling "
                         f"'rowwise' and round_bf16 (or a bf16 weight), got {scaling!r}, round_bf16={round_bf16}, "
                         f"{w_ENK.dtype}")  # fmt: skip
    if amax.dtype != torch.int32 or amax.shape != (E * N + E * K,) or amax.device != w_ENK.device:
        raise ValueError(f"amax must be int32 of shape ({E * N + E * K},) on {w_ENK.device} (E * N row amaxes, "
                         f"then E * K column amaxes), got {amax.dtype} {tuple(amax.shape)} on {amax.device}")


def check_quantize_tensor_args(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> None:
    if fp8_dtype not in TENSOR_FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be one fp32 value, got shape {tuple(scale.shape)} {scale.dtype}")


# ---- activation + quantization (kernels/act_quant*.py) ------------------------------------------


def check_act_quant_args(h_MX: torch.Tensor, activation: str, block: int) -> int:
    """Checks shared by both directions; returns F."""
    if activation not in ACT_FUNCS:
        raise ValueError(f"activation must be one of {ACT_FUNCS}, got {activation!r}")
    if block not in QUANT_BLOCKS:
        raise ValueError(f"block must be one of {QUANT_BLOCKS}, got {block}")
    if h_MX.ndim != 2:
        raise ValueError(f"h must be 2-D (M, 2F) for swiglu or (M, F) for gelu, got shape {tuple(h_MX.shape)}")
    X = h_MX.shape[1]
    F = X // 2 if activation == "swiglu" else X
    if F == 0 or (activation == "swiglu" and X % 2):
        need = "an even number" if activation == "swiglu" else "at least one"
        raise ValueError(f"h has {X} columns: {activation} needs {need}")
    if block and F % block:
        raise ValueError(f"F={F} must be a multiple of block={block} (1x{block} scale tiles)")
    return F


def check_act_quant_bwd_args(
    da_MF: torch.Tensor, h_fp8: torch.Tensor, h_scale: torch.Tensor, activation: str,
    group_end_E: torch.Tensor, align: int, block: int,
) -> int:  # fmt: skip
    """The backward's checks; returns F."""
    F = check_act_quant_args(h_fp8, activation, block)
    M = h_fp8.shape[0]
    if da_MF.shape != (M, F):
        raise ValueError(f"da must have shape {(M, F)} to match h {tuple(h_fp8.shape)}, got {tuple(da_MF.shape)}")
    scale_shape = (M, h_fp8.shape[1] // block) if block else (M,)
    if h_scale.shape != scale_shape:
        raise ValueError(f"h_scale must have shape {scale_shape} for block={block}, got {tuple(h_scale.shape)}")
    check_quantize_cols_grouped_args(da_MF, group_end_E, align, block)
    return F


# ---- unpermute + combine (kernels/combine.py) ---------------------------------------------------


def check_gather_args(y_MH: torch.Tensor, row_of_TA: torch.Tensor, kept_TA: torch.Tensor) -> None:
    if y_MH.ndim != 2:
        raise ValueError(f"y_MH must be 2-D (M, H), got shape {tuple(y_MH.shape)}")
    if row_of_TA.ndim != 2 or kept_TA.shape != row_of_TA.shape:
        raise ValueError(f"kept_TA {tuple(kept_TA.shape)} must match row_of_TA {tuple(row_of_TA.shape)}, both (T, A)")
    if kept_TA.dtype != torch.bool or row_of_TA.is_floating_point():
        raise ValueError(f"kept_TA must be bool and row_of_TA integer, got {kept_TA.dtype}, {row_of_TA.dtype}")


def check_combine_args(
    y_MH: torch.Tensor, row_of_TA: torch.Tensor, weights_TA: torch.Tensor, kept_TA: torch.Tensor
) -> None:
    check_gather_args(y_MH, row_of_TA, kept_TA)
    if weights_TA.shape != row_of_TA.shape:
        raise ValueError(f"weights_TA {tuple(weights_TA.shape)} must match row_of_TA {tuple(row_of_TA.shape)}")


# ---- FP8 grouped GEMMs (kernels/grouped_gemm*.py) -----------------------------------------------


def _check_gemm_operands(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, ends: torch.Tensor,
    out_dtype: torch.dtype, a_scale_shape: tuple[int, ...], b_scale_shape: tuple[int, ...],
) -> None:  # fmt: skip
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise ValueError(f"a_q and b_q must be {FP8_DTYPE}, got {a_q.dtype}, {b_q.dtype}")
    if tuple(a_scale.shape) != a_scale_shape or tuple(b_scale.shape) != b_scale_shape:
        raise ValueError(f"a_scale must be {a_scale_shape} and b_scale {b_scale_shape}, "
                         f"got {tuple(a_scale.shape)}, {tuple(b_scale.shape)}")  # fmt: skip
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("a_scale and b_scale must be float32")
    if ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group ends must be a 1-d int32 tensor, got {tuple(ends.shape)} {ends.dtype}")
    if out_dtype not in GEMM_OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {GEMM_OUT_DTYPES}, got {out_dtype}")


def check_grouped_mm_args(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, group_end: torch.Tensor,
    out_dtype: torch.dtype,
) -> None:  # fmt: skip
    """fp8_grouped_mm: a_q (M, K), b_q (E, N, K), blockwise scales, K and N multiples of 128."""
    if a_q.dim() != 2 or b_q.dim() != 3 or a_q.shape[1] != b_q.shape[2]:
        raise ValueError(f"a_q must be (M, K) and b_q (E, N, K), got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    (M, K), (E, N, _) = a_q.shape, b_q.shape
    if K % GEMM_SCALE_BLOCK or N % GEMM_SCALE_BLOCK:
        raise ValueError(f"K and N must be multiples of 128, got K={K}, N={N}")
    if group_end.shape != (E,):
        raise ValueError(f"group_end must have shape ({E},), got {group_end.shape}")
    _check_gemm_operands(a_q, a_scale, b_q, b_scale, group_end, out_dtype, (M, K // 128), (E, N // 128, K // 128))


def check_grouped_mm_wgrad_args(
    a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, padded_end: torch.Tensor,
    out_dtype: torch.dtype, rowwise: bool,
) -> None:  # fmt: skip
    """fp8_grouped_mm_wgrad(_rowwise): a_q (N, P), b_q (K, P), P a multiple of 128; scales per
    128-token tile (N, P//128), (K, P//128), or rowwise per group (N, E), (K, E)."""
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"a_q must be (N, P) and b_q (K, P), got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    (N, P), K = a_q.shape, b_q.shape[0]
    if P % GEMM_SCALE_BLOCK:
        raise ValueError(f"P (padded tokens) must be a multiple of 128, got {P}")
    per_scale = padded_end.shape[0] if rowwise else P // GEMM_SCALE_BLOCK  # groups, or 128-token tiles
    _check_gemm_operands(a_q, a_scale, b_q, b_scale, padded_end, out_dtype, (N, per_scale), (K, per_scale))
