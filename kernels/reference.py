"""Pure-torch references for every Triton kernel in `kernels/`, same signatures as the launchers.

Tests compare each kernel with its reference here (bitwise for FP8 bytes and scales where the
arithmetic is the same; the activation kernels, which use hardware exp2 / reciprocals, within
the bound stated in tests/test_kernels_act_quant.py), and CPU runs outside Triton's interpreter use
these directly.
Shape letters: M rows (tokens, routed), K reduction dim, N output dim, E experts, P padded rows.
"""

from __future__ import annotations

import torch

from kernels.common import FP8_DTYPE
from kernels.common import FP32_MIN_NORMAL, round_up, torch_fp8_inverse, torch_fp8_quantize, torch_fp8_scale

# ---- quantization references (kernels/quantize*.py) -------------------------------------------

# Argument checks shared with the launchers (kernels/quantize*.py), so both paths raise alike.
QUANT_BLOCKS = (0, 128)  # 0: one scale per row/column (rowwise); 128: 1x128 tiles (blockwise)
WEIGHT_MODES = ("rowwise", "blockwise", "tensorwise")


def check_quantize_rows_args(x_MK: torch.Tensor, block_k: int) -> None:
    if x_MK.ndim != 2:
        raise ValueError(f"x_MK must be 2-D (M, K), got shape {tuple(x_MK.shape)}")
    if block_k not in QUANT_BLOCKS:
        raise ValueError(f"block_k must be one of {QUANT_BLOCKS}, got {block_k}")
    K = x_MK.shape[1]
    if K == 0 or (block_k and K % block_k):
        raise ValueError(f"K={K} must be positive and a multiple of block_k={block_k} when block_k > 0")


def check_quantize_cols_grouped_args(
    x_MK: torch.Tensor, group_end_E: torch.Tensor, align: int, block_m: int
) -> None:
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


def check_quantize_weight_args(w_ENK: torch.Tensor, mode: str) -> None:
    if w_ENK.ndim != 3 or w_ENK.shape[1] == 0 or w_ENK.shape[2] == 0:
        raise ValueError(f"w_ENK must be 3-D (E, N, K) with N, K > 0, got shape {tuple(w_ENK.shape)}")
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if mode == "blockwise" and (w_ENK.shape[1] % 128 or w_ENK.shape[2] % 128):
        raise ValueError(f"blockwise mode needs N and K multiples of 128, got {tuple(w_ENK.shape[1:])}")


def padded_size(M: int, E: int, align: int) -> int:
    """P, the host-side upper bound on sum_e round_up(size_e, align): no device sync needed."""
    return round_up(M, align) + E * align


def torch_quantize_rows(
    x_MK: torch.Tensor, block_k: int = 0, pow2_scale: bool = False, row_index_M: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (block_k=0: scale (M,)) or each 1x128 tile (block_k=128: scale (M, K//128)).

    With row_index_M the rows are x_MK[row_index_M] (permute + quantize); output has that many rows.
    """
    check_quantize_rows_args(x_MK, block_k)
    x = (x_MK if row_index_M is None else x_MK[row_index_M]).float()
    M, K = x.shape
    span = block_k or K
    x_MSB = x.view(M, K // span, span)  # S spans (tiles) of B elements per row
    scale_MS1 = torch_fp8_scale(x_MSB.abs().amax(dim=2, keepdim=True), pow2_scale)
    q_MK = torch_fp8_quantize(x_MSB, scale_MS1).view(M, K)
    scale = scale_MS1.view(M, K // span)
    return q_MK, (scale.view(M) if block_k == 0 else scale)


def _grouped_rows(x_MK, group_end_E, align):
    """Per row of x (grouped order): group id (E for rows past group_end_E[-1]) and padded position."""
    M = x_MK.shape[0]
    end_E = group_end_E.long()
    size_E = end_E - torch.cat([end_E.new_zeros(1), end_E[:-1]])
    padded_end_E = torch.cumsum((size_E + align - 1) // align * align, 0)
    row_M = torch.arange(M, device=x_MK.device)
    gid_M = torch.searchsorted(end_E, row_M, right=True)
    g_M = gid_M.clamp(max=end_E.numel() - 1)
    pos_M = padded_end_E[g_M] - ((size_E + align - 1) // align * align)[g_M] + row_M - (end_E - size_E)[g_M]
    return gid_M, pos_M, padded_end_E


def torch_quantize_cols_grouped(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int = 16,
    block_m: int = 0,
    pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi pad-cast-transpose for the weight-gradient GEMMs.

    Rows of x (x_MK[row_index_M] if given) are grouped by expert, group e ending at group_end_E[e];
    rows past group_end_E[-1] belong to no group and are dropped. Returns
      qt_KP   fp8 (K, P), P = round_up(M, align) + E * align: group e's rows transposed into
              columns [padded_start_e, padded_start_e + size_e); every other column is zero;
      scale   fp32 (K, E) per column per group (block_m=0), or (K, P // 128) per 1x128 tile along
              tokens (block_m=128, align a multiple of 128; all-padding tiles get scale 1);
      padded_end_E int32, cumulative round_up(size_e, align);
      amax_E  fp32 (E,) max |x| of each group when return_amax, else an empty tensor.
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
    gid_P = torch.full((P,), E, dtype=torch.long, device=x.device)
    gid_P[pos_M[valid_M]] = gid_M[valid_M]
    absx_PK = x_PK.abs()
    amax_EK = x.new_zeros(E + 1, K).scatter_reduce_(0, gid_P[:, None].expand(P, K), absx_PK, "amax")[:E]
    if block_m == 0:
        scale_EK = torch_fp8_scale(amax_EK, pow2_scale)
        scale_PK = torch.cat([scale_EK, scale_EK.new_ones(1, K)])[gid_P]
        q_PK = torch_fp8_quantize(x_PK, scale_PK)
        scale = scale_EK.t().contiguous()
    else:
        amax_TK = absx_PK.view(P // block_m, block_m, K).amax(dim=1)
        scale_TK = torch_fp8_scale(amax_TK, pow2_scale)
        q_PK = torch_fp8_quantize(x_PK.view(P // block_m, block_m, K), scale_TK[:, None, :]).view(P, K)
        scale = scale_TK.t().contiguous()
    amax_E = amax_EK.amax(dim=1) if return_amax else x.new_empty(0)
    qt_KP = q_PK.view(torch.uint8).t().contiguous().view(FP8_DTYPE)
    return qt_KP, scale, padded_end_E.int(), amax_E


def torch_quantize_rows_and_cols_grouped(
    x_MK: torch.Tensor,
    group_end_E: torch.Tensor,
    align: int = 16,
    block: int = 0,
    pow2_scale: bool = False,
    row_index_M: torch.Tensor | None = None,
    return_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_MK, row_scale) of torch_quantize_rows(block_k=block) followed by the four outputs of
    torch_quantize_cols_grouped(block_m=block): both operands of the FP8 GroupedMLP input."""
    check_quantize_cols_grouped_args(x_MK, group_end_E, align, block)
    q_MK, row_scale = torch_quantize_rows(x_MK, block, pow2_scale, row_index_M)
    cols = torch_quantize_cols_grouped(x_MK, group_end_E, align, block, pow2_scale, row_index_M, return_amax)
    return (q_MK, row_scale, *cols)


def torch_quantize_weight(
    w_ENK: torch.Tensor, mode: str = "rowwise", pow2_scale: bool = False, round_bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both FP8 operands of the expert weights, for the forward and the transposed GEMMs.

    Returns (q_ENK, scale, qt_EKN, scale_t): q_ENK scaled along K, qt_EKN (contiguous (E, K, N))
    scaled along N. rowwise: scale (E, N), scale_t (E, K); blockwise (128x128 blocks, N and K
    multiples of 128): scale (E, N//128, K//128) and scale_t its transpose (E, K//128, N//128),
    qt_EKN is exactly q_ENK transposed; tensorwise: scale and scale_t (E,), qt_EKN = q_ENK^T.
    round_bf16: the values quantized are w_ENK rounded to bf16 first.
    """
    check_quantize_weight_args(w_ENK, mode)
    w = (w_ENK.to(torch.bfloat16) if round_bf16 else w_ENK).float()
    E, N, K = w.shape
    if mode == "rowwise":
        scale = torch_fp8_scale(w.abs().amax(dim=2), pow2_scale)
        scale_t = torch_fp8_scale(w.abs().amax(dim=1), pow2_scale)
        q_ENK = torch_fp8_quantize(w, scale[:, :, None])
        qt_EKN = torch_fp8_quantize(w, scale_t[:, None, :]).view(torch.uint8).transpose(1, 2)
        return q_ENK, scale, qt_EKN.contiguous().view(FP8_DTYPE), scale_t
    if mode == "blockwise":
        w_EnbkB = w.view(E, N // 128, 128, K // 128, 128)
        scale = torch_fp8_scale(w_EnbkB.abs().amax(dim=(2, 4)), pow2_scale)
        q_ENK = torch_fp8_quantize(w_EnbkB, scale[:, :, None, :, None]).view(E, N, K)
        scale_t = scale.transpose(1, 2).contiguous()
    else:
        scale = torch_fp8_scale(w.abs().amax(dim=(1, 2)), pow2_scale)
        q_ENK = torch_fp8_quantize(w, scale[:, None, None])
        scale_t = scale.clone()
    qt_EKN = q_ENK.view(torch.uint8).transpose(1, 2).contiguous().view(FP8_DTYPE)
    return q_ENK, scale, qt_EKN, scale_t


# ---- activation / combine references (kernels/act_quant*.py, kernels/combine.py) -------------
# The activations are written out in + - * / so that the reference rounds identically on every
# backend: torch.exp on CPU and numpy's exp (Triton's interpreter) disagree in the last bit for
# ~40% of inputs, and a GPU's expf is not guaranteed to match libdevice's. Every line below is
# one fp32 rounding (never fused). The kernels (kernels/act_math.py) compute the same functions
# with hardware exp2 / reciprocals and FMAs instead, within tests/test_kernels_act_quant.py's bound.
# Accuracy against fp64 (measured over 4M points): exp <= 5 ulp; Phi <= 8 ulp for x >= 0 and
# relative 70 ulp at x = -12.5 (the rounding of x*x, amplified by exp); beyond |x| = 12.5
# Phi saturates (Phi(-12.5) = 4e-36 instead of ~0). GELU is the exact-erf form, F.gelu's default.

ACT_FUNCS = ("swiglu", "gelu")
# exp(x) = 2**n * p(r), x = n*ln2 + r, |r| <= ln2/2: n = round(x / ln2) by adding 1.5 * 2**23
# (the sum's low mantissa bits are n: no float->int conversion), ln2 split in two (hi has 15
# significant bits, so n*hi is exact), p the degree-6 Taylor polynomial (error 1.2e-7 there).
_EXP_LOG2E = 1.4426950216293335
_EXP_SHIFTER = 12582912.0  # 1.5 * 2**23, bits 0x4B400000
_EXP_LN2_HI = 0.693145751953125
_EXP_LN2_LO = 1.428606765330187e-06
_EXP_COEF = (0.0013888889225199819, 0.008333333767950535, 0.0416666679084301, 0.1666666716337204,
             0.5, 1.0, 1.0)  # 1/6!, ..., 1/1!, 1/0!  # fmt: skip
# Phi(x) = 1 - erfc(z)/2 for x >= 0 and erfc(z)/2 for x < 0, z = |x|/sqrt(2), with
# erfc(z) = exp(-z*z) * R(t), t = 1 / (1 + 0.4 z): R is a degree-10 least-squares Chebyshev fit
# on z in [0, 12.5/sqrt(2)] (relative error 1.7e-9 in exact arithmetic), highest power first.
_PHI_CLAMP = 12.5
_PHI_T_SCALE = 0.2828427255153656  # 0.4 / sqrt(2)
_PHI_COEF = (-0.041673850268125534, 0.26790285110473633, -0.676068127155304, 0.8065094351768494,
             -0.5256134271621704, 0.42137980461120605, 0.067561574280262, 0.23205183446407318,
             0.22195617854595184, 0.22600671648979187, -1.3042147656960879e-05)  # fmt: skip
_INV_SQRT_2PI = 0.3989422917366028


def _torch_exp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-87.0, 87.0)  # keeps 2**n and 1 / (1 + exp) normal floats
    shifted = x * _EXP_LOG2E + _EXP_SHIFTER
    n = shifted - _EXP_SHIFTER
    r = (x - n * _EXP_LN2_HI) - n * _EXP_LN2_LO
    p = torch.full_like(r, _EXP_COEF[0])
    for c in _EXP_COEF[1:]:
        p = p * r + c
    return p * ((shifted.view(torch.int32) - (0x4B400000 - 127)) << 23).view(torch.float32)


def _torch_div(num: float, den: torch.Tensor) -> torch.Tensor:
    """IEEE num / den (a python scalar over a CUDA tensor is a rounded reciprocal times num)."""
    return torch.full((), num, dtype=torch.float32, device=den.device) / den


def _torch_sigmoid_silu(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _torch_div(1.0, 1.0 + _torch_exp(-g))
    return s, g * s


def _torch_phi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xc, Phi(xc), exp(-xc*xc/2)) with xc = x clamped to +-12.5: the normal CDF and the pieces
    of the normal density."""
    xc = x.clamp(-_PHI_CLAMP, _PHI_CLAMP)
    ex = _torch_exp(xc * xc * -0.5)
    t = _torch_div(1.0, 1.0 + xc.abs() * _PHI_T_SCALE)
    r = torch.full_like(t, _PHI_COEF[0])
    for c in _PHI_COEF[1:]:
        r = r * t + c
    erfc = ex * r
    return xc, torch.where(xc >= 0.0, 1.0 - 0.5 * erfc, 0.5 * erfc), ex


def _torch_act(h_MX: torch.Tensor, activation: str) -> torch.Tensor:
    """fp32 activation of fp32 h: silu(gate) * up for SwiGLU (gate = first half), x * Phi(x) for GELU."""
    if activation == "swiglu":
        gate, up = h_MX.chunk(2, dim=1)
        return _torch_sigmoid_silu(gate)[1] * up
    return h_MX * _torch_phi(h_MX)[1]


def _torch_act_bwd(da_MF: torch.Tensor, h_MX: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dh_MX, a_MF): the gradient w.r.t. h of sum(da * act(h)), and act(h) recomputed."""
    if activation == "swiglu":
        gate, up = h_MX.chunk(2, dim=1)
        s, silu = _torch_sigmoid_silu(gate)
        dsilu = s * (1.0 + gate * (1.0 - s))
        return torch.cat([(da_MF * up) * dsilu, da_MF * silu], dim=1), silu * up
    xc, phi, ex = _torch_phi(h_MX)
    return da_MF * (phi + xc * (ex * _INV_SQRT_2PI)), h_MX * phi


def check_act_quant_args(h_MX: torch.Tensor, activation: str, block: int) -> int:
    """Checks shared by both directions and both paths; returns F."""
    if activation not in ACT_FUNCS:
        raise ValueError(f"activation must be one of {ACT_FUNCS}, got {activation!r}")
    if block not in QUANT_BLOCKS:
        raise ValueError(f"block must be one of {QUANT_BLOCKS}, got {block}")
    if h_MX.ndim != 2:
        raise ValueError(f"h must be 2-D (M, 2F) for swiglu or (M, F) for gelu, got shape {tuple(h_MX.shape)}")
    X = h_MX.shape[1]
    F = X // 2 if activation == "swiglu" else X
    if F == 0 or (activation == "swiglu" and X % 2):
        raise ValueError(f"h has {X} columns: {activation} needs {'an even number' if activation == 'swiglu' else 'at least one'}")
    if block and F % block:
        raise ValueError(f"F={F} must be a multiple of block={block} (1x{block} scale tiles)")
    return F


def check_act_quant_bwd_args(
    da_MF: torch.Tensor, h_fp8: torch.Tensor, h_scale: torch.Tensor, activation: str,
    group_end_E: torch.Tensor, align: int, block: int,
) -> int:  # fmt: skip
    F = check_act_quant_args(h_fp8, activation, block)
    M = h_fp8.shape[0]
    if da_MF.shape != (M, F):
        raise ValueError(f"da must have shape {(M, F)} to match h {tuple(h_fp8.shape)}, got {tuple(da_MF.shape)}")
    scale_shape = (M, h_fp8.shape[1] // block) if block else (M,)
    if h_scale.shape != scale_shape:
        raise ValueError(f"h_scale must have shape {scale_shape} for block={block}, got {tuple(h_scale.shape)}")
    check_quantize_cols_grouped_args(da_MF, group_end_E, align, block)
    return F


def torch_act_quant_fwd(
    h_MX: torch.Tensor, activation: str = "swiglu", block_k: int = 0, pow2_scale: bool = False, save_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 a = act(h) for GEMM2, and h itself in FP8 for the backward (empty unless save_input).

    Scales follow block_k for both: one per row (0) or per 1x128 tile (128); a's amax is taken on
    the fp32 activation of the bf16 h.
    """
    check_act_quant_args(h_MX, activation, block_k)
    h = h_MX.float()
    a_q, a_scale = torch_quantize_rows(_torch_act(h, activation), block_k, pow2_scale)
    if not save_input:
        return a_q, a_scale, h_MX.new_empty(0, dtype=FP8_DTYPE), h_MX.new_empty(0, dtype=torch.float32)
    h_q, h_scale = torch_quantize_rows(h, block_k, pow2_scale)
    return a_q, a_scale, h_q, h_scale


def torch_act_quant_bwd(
    da_MF: torch.Tensor,
    h_fp8: torch.Tensor,
    h_scale: torch.Tensor,
    activation: str,
    group_end_E: torch.Tensor,
    align: int = 16,
    block: int = 0,
    pow2_scale: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dh = act'(h) * da from the FP8 h of the forward, in the three layouts the backward GEMMs read.

    Returns (dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E):
      dh_q  (M, X) fp8, scale (M,) over the whole X-wide row (block=0) or (M, X//128): dgrad1
      dht_q (X, P) and at_q (F, P) fp8: dh and the recomputed a = act(h), each group's rows
            transposed into its padded columns exactly as `torch_quantize_cols_grouped` lays
            them out (scales (K, E) or (K, P//128)): wgrad1 and wgrad2
      padded_end_E int32.
    Rows past group_end_E[-1] belong to no group: their dh row is zeros (scale 1) and they are
    absent from the transposed copies.
    """
    check_act_quant_bwd_args(da_MF, h_fp8, h_scale, activation, group_end_E, align, block)
    M, X = h_fp8.shape
    if block:
        h = (h_fp8.float().view(M, X // block, block) * h_scale[:, :, None]).view(M, X)
    else:
        h = h_fp8.float() * h_scale[:, None]
    dh_MX, a_MF = _torch_act_bwd(da_MF.float(), h, activation)
    in_group_M1 = (_grouped_rows(da_MF, group_end_E, align)[0] < group_end_E.numel())[:, None]
    dh_MX = torch.where(in_group_M1, dh_MX, 0.0)
    dh_q, dh_scale = torch_quantize_rows(dh_MX, block, pow2_scale)
    dht_q, dht_scale, padded_end_E, _ = torch_quantize_cols_grouped(dh_MX, group_end_E, align, block, pow2_scale)
    at_q, at_scale, _, _ = torch_quantize_cols_grouped(a_MF, group_end_E, align, block, pow2_scale)
    return dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end_E


def _combine_acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    acc = torch.float32  # fp64 inputs (gradcheck) accumulate in fp64
    for t in tensors:
        acc = torch.promote_types(acc, t.dtype)
    return acc


def torch_unpermute_combine(
    y_MH: torch.Tensor, row_of_TK: torch.Tensor, weights_TK: torch.Tensor, kept_TK: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum over kept k, in order k = 0..K-1, of w[t, k] * y[row_of_TK[t, k]], in fp32.

    Dropped assignments are removed with `where` (their rows may hold NaN; 0 * NaN is NaN) and
    their row index is never read. Returns y's dtype.
    """
    T, K = row_of_TK.shape
    acc = _combine_acc_dtype(y_MH, weights_TK)
    out_TH = torch.zeros(T, y_MH.shape[1], dtype=acc, device=y_MH.device)
    for k in range(K):
        kept_T1 = kept_TK[:, k, None]
        y_TH = y_MH.index_select(0, torch.where(kept_TK[:, k], row_of_TK[:, k], 0)).to(acc)
        out_TH = out_TH + torch.where(kept_T1, weights_TK[:, k, None].to(acc) * y_TH, 0.0)
    return out_TH.to(y_MH.dtype)


def torch_gather_sum(
    dx_MH: torch.Tensor, row_of_TK: torch.Tensor, kept_TK: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """dx[t] = sum over kept k, in order k = 0..K-1, of dx_MH[row_of_TK[t, k]], in fp32 (fp64 for
    fp64 rows), cast once to out_dtype: the permutation's backward, unpermute_combine without weights."""
    T, K = row_of_TK.shape
    acc = _combine_acc_dtype(dx_MH)
    dx_TH = torch.zeros(T, dx_MH.shape[1], dtype=acc, device=dx_MH.device)
    for k in range(K):
        g_TH = dx_MH.index_select(0, torch.where(kept_TK[:, k], row_of_TK[:, k], 0)).to(acc)
        dx_TH = dx_TH + torch.where(kept_TK[:, k, None], g_TH, 0.0)
    return dx_TH.to(out_dtype)


def torch_unpermute_combine_bwd(
    dout_TH: torch.Tensor,
    y_MH: torch.Tensor,
    row_of_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    kept_TK: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_MH, dweights_TK): dy[row(t, k)] = w[t, k] * dout[t] for kept (t, k) and 0 for dropped,
    rows no assignment points at are 0; dweights[t, k] = <dout[t], y[row(t, k)]> (0 if dropped)."""
    T, K = row_of_TK.shape
    M = y_MH.shape[0]
    acc = _combine_acc_dtype(y_MH, weights_TK)
    g_TH = dout_TH.to(acc)
    dy_MH = torch.zeros(M + 1, y_MH.shape[1], dtype=y_MH.dtype, device=y_MH.device)  # row M: a sink
    dw_TK = torch.zeros(T, K, dtype=acc, device=y_MH.device)
    for k in range(K):
        kept_T = kept_TK[:, k]
        rows_T = row_of_TK[:, k]
        valid_T = (rows_T >= 0) & (rows_T < M)
        dy_TH = torch.where(kept_T[:, None], g_TH * weights_TK[:, k, None].to(acc), 0.0)
        dy_MH.index_copy_(0, torch.where(valid_T, rows_T, M), dy_TH.to(y_MH.dtype))
        y_TH = y_MH.index_select(0, torch.where(kept_T, rows_T, 0)).to(acc)
        dw_TK[:, k] = torch.where(kept_T, (g_TH * y_TH).sum(dim=1), 0.0)
    return dy_MH[:M], dw_TK.to(weights_TK.dtype)


# ---- grouped GEMM references (kernels/grouped_gemm.py) ----------------------------------------
# Dequantize to fp32 (q * expanded scale) and loop over experts with fp32 matmuls. The kernels
# promote per 128-wide K block; in exact arithmetic that is the same sum, so kernel and reference
# differ only by fp32 accumulation order. The loops read group ends on the host (a sync): fine
# for a reference and the CPU path, never used inside a GPU training step.


def _dequant_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, C) fp8 with (R, C // 128) scales along C -> fp32."""
    return q.float() * scale.float().repeat_interleave(128, dim=1)


def torch_fp8_grouped_mm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    group_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out (M, N): out[rows of e] = dequant(a_q rows) @ dequant(b_q[e]).T; rows past
    group_end[-1] are zeros. a_q (M, K), a_scale (M, K//128), b_q (E, N, K),
    b_scale (E, N//128, K//128), group_end (E,) cumulative row ends."""
    M, N = a_q.shape[0], b_q.shape[1]
    a = _dequant_rows(a_q, a_scale)
    out = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    start = 0
    for e, end in enumerate(group_end.clamp(max=M).tolist()):
        if end > start:
            b_scale_NK = b_scale[e].float().repeat_interleave(128, 0).repeat_interleave(128, 1)
            b = b_q[e].float() * b_scale_NK
            out[start:end] = a[start:end] @ b.T
        start = max(start, end)
    return out.to(out_dtype)


def torch_fp8_grouped_mm_wgrad(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """out (E, N, K): out[e] = dequant(a_q)[:, tokens of e] @ dequant(b_q)[:, tokens of e].T.
    a_q (N, P), a_scale (N, P//128), b_q (K, P), b_scale (K, P//128), padded_end (E,) cumulative
    token ends (multiples of 128); an expert without tokens gets a zero block."""
    return _wgrad_loop(_dequant_rows(a_q, a_scale), _dequant_rows(b_q, b_scale), padded_end, out_dtype)


def torch_fp8_grouped_mm_wgrad_rowwise(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    padded_end: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`torch_fp8_grouped_mm_wgrad` with one scale per row and group: a_scale (N, E), b_scale
    (K, E), the column scales `quantize_cols_grouped` writes for the rowwise recipe, so
    out[e] = (a_q[:, tokens of e] @ b_q[:, tokens of e].T) * a_scale[:, e, None] * b_scale[None, :, e]."""
    P = a_q.shape[1]
    group_of_P = torch.searchsorted(padded_end.to(torch.int64), torch.arange(P, device=a_q.device), right=True)
    group_of_P = group_of_P.clamp_max(padded_end.shape[0] - 1)  # padding past every group: zero bytes
    a = a_q.float() * a_scale.float()[:, group_of_P]
    b = b_q.float() * b_scale.float()[:, group_of_P]
    return _wgrad_loop(a, b, padded_end, out_dtype)


def _wgrad_loop(a_NP: torch.Tensor, b_KP: torch.Tensor, padded_end: torch.Tensor, out_dtype: torch.dtype):
    (N, P), K, E = a_NP.shape, b_KP.shape[0], padded_end.shape[0]
    out = torch.zeros(E, N, K, dtype=torch.float32, device=a_NP.device)
    start = 0
    for e, end in enumerate(padded_end.clamp(max=P).tolist()):
        if end > start:
            out[e] = a_NP[:, start:end] @ b_KP[:, start:end].T
        start = max(start, end)
    return out.to(out_dtype)


# ---- tensorwise quantization reference (kernels/quantize_tensor.py) ---------------------------
# One scale for the whole tensor, given (delayed scaling: from the amax history; current scaling:
# from this tensor's amax, taken first). The format may be E4M3 (max 448) or E5M2 (max 57344).
# The amax of the input comes back too: delayed scaling records it for the next step's scale.


def check_quantize_tensor_args(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> None:
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be one fp32 value, got shape {tuple(scale.shape)} {scale.dtype}")


def torch_quantize_tensor(
    x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, amax): q = clamp(x * (1 / scale), -fmax, fmax) in fp8_dtype (x's shape), amax = max|x| (fp32, 0-dim).

    A scale below the scale rule's floor 2**-126 (which the rule never gives) acts as the floor:
    the inverse of a subnormal scale is inf, and 0 * inf would turn zeros into NaN."""
    check_quantize_tensor_args(x, scale, fp8_dtype)
    fmax = torch.finfo(fp8_dtype).max
    xf = x.float()
    inv = torch_fp8_inverse(scale.reshape(()).clamp_min(FP32_MIN_NORMAL))
    q = (xf * inv).clamp(-fmax, fmax).to(fp8_dtype)
    amax = xf.abs().amax() if xf.numel() else torch.zeros((), dtype=torch.float32, device=x.device)
    return q, amax


# ---- cast (kernels/cast.py) -------------------------------------------------------------------

CAST_DTYPES = (torch.float32, torch.bfloat16)


def check_cast_args(x: torch.Tensor, dtype: torch.dtype) -> None:
    if x.dtype not in CAST_DTYPES or dtype not in CAST_DTYPES:
        raise ValueError(f"cast: fp32 <-> bf16 only, got {x.dtype} -> {dtype}")
    if not x.is_contiguous():
        # A strided cast would need a gather: callers pass parameters and GEMM outputs, which
        # are contiguous; anything else is a bug upstream, not a case to copy silently.
        raise ValueError(f"cast: x must be contiguous, got shape {tuple(x.shape)} strides {x.stride()}")


def torch_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_cast_args(x, dtype)
    return x.to(dtype)
