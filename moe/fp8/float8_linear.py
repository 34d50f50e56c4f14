"""Float8Linear: nn.Linear whose three GEMMs run in FP8 (E4M3 forward, E4M3 or E5M2 gradients).

Shape letters (README.md): M rows (all leading dims of x flattened), K in_features (the forward's
reduction dim), N out_features, O operands with delayed scales (0: x, 1: dy), L amax-history length.

Same constructor arguments and parameters as nn.Linear (plus `recipe`), so a converter swaps one
for the other with the same Parameter objects (moe/fp8/linear_convert.py); state dicts and
optimizer state carry over. The delayed-scaling state is in registered buffers (checkpointed).

Scale convention (kernels/common.py): scale = amax / fmax is the dequantization multiplier,
x ~= q * scale, fmax = 448 (E4M3) or 57344 (E5M2), scale = 1 where amax = 0.
    tensorwise          one scale per tensor, from this call's amax (current scaling)
    tensorwise_delayed  x and dy: scale = max(amax history) * 2**margin / fmax, fixed for a whole
                        optimizer step; the fused cast records this step's amax, and
                        `sync_float8_amax_and_scale_history` (once per step) reduces it over ranks,
                        updates the scale and rolls the history. Until the first sync (no history)
                        the layer uses current scaling, or step 1's gradients would underflow at
                        scale 1 (E4M3's smallest subnormal is 2**-9).
    rowwise             one scale per row along the reduction dimension (kernels/quantize.py)
The weight always uses current scaling: it is quantized once per optimizer step from the tensor
in hand (cached across micro-batches), so its exact amax costs one read per step, and a stale
history scale would buy nothing.

Alignment (torch._scaled_mm, `check_scaled_mm_operands`): mat1 (rows, inner) needs inner % 16 == 0,
mat2 (inner, cols) both dims % 16 == 0. So K and N must be multiples of 16: Float8Linear refuses
other widths (ValueError) and the converter's default filter leaves such layers in high
precision. M (tokens) is the user's batch shape: the forward and dgrad GEMMs take any M (mat1's
rows), but wgrad contracts over M, so its two operands (dy^T and x^T, both FP8 copies made for
it anyway) get zero columns up to the next multiple of 16, exact for every recipe (zeros change
no amax and add nothing to the sum). The CPU emulation checks the same constraints.

On a CPU the quantizers are the kernels' entry points as everywhere (kernels/dispatch.py: their
torch references, or the Triton kernels under TRITON_INTERPRET, bitwise the same), and the GEMMs
the one CPU emulation of a scaled GEMM (kernels/reference_gemm.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from kernels.common import FP32_MIN_NORMAL, dequantize
from kernels.quantize import quantize_rows
from kernels.quantize_tensor import quantize_tensor
from kernels.reference_gemm import emulated_grouped_mm
from moe.fp8.recipe import Float8LinearRecipe
from moe.fp8.weight_cache import WeightCache

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_X, _DY = 0, 1  # rows of amax_history_OL / scale_O
GEMM_ALIGN = 16  # torch._scaled_mm: mat1's inner dim and both of mat2's dims


def float8_dims_problem(in_features: int, out_features: int) -> Optional[str]:
    """Why a Linear of these widths cannot run its GEMMs in FP8, or None if it can."""
    bad = [f"{name}={n}" for name, n in (("in_features", in_features), ("out_features", out_features))
           if n <= 0 or n % GEMM_ALIGN]  # fmt: skip
    if not bad:
        return None
    return (
        f"in_features and out_features must be positive multiples of {GEMM_ALIGN} (torch._scaled_mm's "
        f"FP8 GEMM alignment), got in_features={in_features}, out_features={out_features} "
        f"({', '.join(bad)} is not)"
    )


def fp8_dtype_of(name: str) -> torch.dtype:
    return E4M3 if name == "e4m3" else E5M2


def amax_to_scale(amax: torch.Tensor, fmax: torch.Tensor | float, pow2: bool = False) -> torch.Tensor:
    """Dequantization scale amax / fmax (fp32, IEEE division by a tensor), 1 where amax == 0,
    floored at 2**-126 as kernels/common.py's scale rule (quantizing multiplies by 1 / scale,
    which a subnormal scale would make inf); pow2: rounded up to a power of two, as that rule's
    pow2_scale (the fp32 bits' mantissa carried into the exponent)."""
    amax = amax.float()
    fmax = torch.as_tensor(fmax, dtype=torch.float32, device=amax.device)
    scale = (amax / fmax).clamp_min(FP32_MIN_NORMAL)
    if pow2:
        scale = ((scale.view(torch.int32) + 0x007FFFFF) & 0x7F800000).view(torch.float32)
    return torch.where(amax == 0, torch.ones_like(amax), scale)


class Fp8Operand(NamedTuple):
    """q in the layout the GEMM reads; scale fp32: 0-dim (tensorwise), or (rows, 1) / (1, cols)."""

    q: torch.Tensor
    scale: torch.Tensor


def check_scaled_mm_operands(a_q: torch.Tensor, b_q: torch.Tensor) -> None:
    """torch._scaled_mm's shape and layout rules, checked on every device (the CPU emulation
    too, so a shape the GPU would refuse fails in CPU tests as well): a (M, K) row-major,
    b (K, N) column-major, K and N multiples of 16 (M free)."""
    (_, K), (K2, N) = a_q.shape, b_q.shape
    if K != K2:
        raise ValueError(f"scaled_mm: inner dims differ, a {tuple(a_q.shape)} b {tuple(b_q.shape)}")
    if K % GEMM_ALIGN or N % GEMM_ALIGN:
        raise ValueError(
            f"scaled_mm: K={K} and N={N} must be multiples of {GEMM_ALIGN} (torch._scaled_mm), "
            f"got a {tuple(a_q.shape)} b {tuple(b_q.shape)}"
        )
    if a_q.stride(1) != 1 or b_q.stride(0) != 1:
        raise ValueError(
            f"scaled_mm: a must be row-major and b column-major, got strides {a_q.stride()} and {b_q.stride()}"
        )


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, never t itself through a no-op `.to()`: see _Float8LinearFunction's note."""
    return t if t.dtype == dtype else t.to(dtype)


def scaled_mm(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """a.q (M, K) row-major times b.q (K, N) column-major, dequantized by the scales.

    CUDA: torch._scaled_mm (`_hardware_scaled_mm`). CPU: an emulation (`_emulated_scaled_mm`).
    Both check the same shapes and layouts first.
    """
    check_scaled_mm_operands(a.q, b.q)
    gemm = _hardware_scaled_mm if a.q.is_cuda else _emulated_scaled_mm
    return gemm(a, b, out_dtype, rowwise)


def _hardware_scaled_mm(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """torch._scaled_mm: cuBLASLt tensorwise, CUTLASS rowwise (bf16 output only, so other
    output dtypes are cast after)."""
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    out = torch._scaled_mm(a.q, b.q, scale_a=a.scale, scale_b=b.scale, out_dtype=mm_dtype)
    return _cast(out, out_dtype)


def _emulated_scaled_mm(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """Dequantize and multiply in fp32: what the hardware computes, up to accumulation order. b
    is read as the (N, K) weight layout it views (`b.q.t()`, its scale (N, 1) or ())."""
    with torch.autocast(a.q.device.type, enabled=False):
        b_NK = dequantize(b.q.t(), b.scale.t())
        return _cast(emulated_grouped_mm(dequantize(a.q, a.scale), b_NK), out_dtype)


def _cols_padded(q_MK: torch.Tensor) -> torch.Tensor:
    """A row-major copy of FP8 q_MK (any strides) with zero columns up to a multiple of 16: M
    rows of a GEMM operand, K its reduction dim.

    For wgrad's operands, which contract over the token dim. At most one copy, padded or not (the
    transpose the caller needs anyway), through uint8 views: an FP8 zero is the byte 0 in both
    formats.
    """
    M, K = q_MK.shape
    pad = -K % GEMM_ALIGN
    if pad == 0:
        return q_MK.contiguous()
    u8 = q_MK.view(torch.uint8)
    return torch.cat([u8, u8.new_zeros(M, pad)], dim=1).view(q_MK.dtype)


def quantize_tensorwise(
    x: torch.Tensor, scale: Optional[torch.Tensor], fp8_dtype: torch.dtype, pow2: bool = False
) -> tuple[Fp8Operand, torch.Tensor]:
    """(x quantized with one scale, x's amax). scale None: current scaling, from x's amax
    (pow2: rounded up to a power of two)."""
    if scale is None:
        # A separate read for the amax: the scale must exist before the first element is cast.
        scale = amax_to_scale(x.abs().amax(), torch.finfo(fp8_dtype).max, pow2)
    q, amax = quantize_tensor(x, scale.reshape(()).float(), fp8_dtype)
    # q row-major (the kernel writes it so; the CPU reference keeps a transposed input's strides).
    return Fp8Operand(q.contiguous(), scale.reshape(()).float()), amax


def quantize_rowwise(x_MK: torch.Tensor, pow2: bool = False) -> Fp8Operand:
    """E4M3 rows of x_MK (M rows of a GEMM operand, K its reduction dim) with a scale per row,
    scale shaped (M, 1) (a's side of scaled_mm); pow2: scales rounded up to powers of two.
    q row-major (the kernel writes it so; the CPU reference keeps a transposed input's strides)."""
    q, scale_M = quantize_rows(x_MK, 0, pow2)
    return Fp8Operand(q.contiguous(), scale_M.unsqueeze(1))


class QuantizedLinearWeight(NamedTuple):
    """w_NK for the forward (row-major, read as (K, N) column-major) and wt_KN for dgrad."""

    w: Fp8Operand  # q (N, K), scale () or (1, N)
    wt: Fp8Operand  # q (K, N), scale () or (1, K)


def quantize_linear_weight(weight_NK: torch.Tensor, recipe: Float8LinearRecipe) -> QuantizedLinearWeight:
    w, pow2 = weight_NK.detach(), recipe.pow2_scales
    if recipe.scaling == "rowwise":
        # Forward reduces over K: a scale per output channel; dgrad reduces over N: per input channel.
        w_op, wt_op = quantize_rowwise(w, pow2), quantize_rowwise(w.t(), pow2)
        return QuantizedLinearWeight(
            Fp8Operand(w_op.q, w_op.scale.reshape(1, -1)), Fp8Operand(wt_op.q, wt_op.scale.reshape(1, -1))
        )
    w_op, _ = quantize_tensorwise(w, None, E4M3, pow2)
    # The transpose of one-byte FP8 moves half the bytes of a bf16 transpose; same scale.
    return QuantizedLinearWeight(w_op, Fp8Operand(w_op.q.t().contiguous(), w_op.scale))


def _record_amax(amax_history_OL: Optional[torch.Tensor], operand: int, amax: torch.Tensor) -> None:
    """Fold this call's amax into the current slot (max over the step's micro-batches)."""
    if amax_history_OL is not None:
        slot = amax_history_OL[operand, 0]
        slot.copy_(torch.maximum(slot, amax))


class _Float8LinearFunction(torch.autograd.Function):
    """y = x W^T in FP8, and both backward GEMMs in FP8.

        forward  y_MN  = x_MK  @ w_NK^T   a = x_q (M, K) row-major,    b = w_q (N, K) read as (K, N) col-major
        dgrad    dx_MK = dy_MN @ w_NK     a = dy_q (M, N) row-major,   b = wt_q (K, N) read as (N, K) col-major
        wgrad    dW_NK = dy_MN^T @ x_MK   a = dyt_q (N, M16) row-major, b = xt_q (K, M16) read as (M16, K) col-major

    Dtypes: x, w E4M3; dy (and dyt) E4M3 or E5M2 (recipe.grad_dtype); scales fp32; y and dx in
    the compute dtype (bf16 under autocast), dW in the weight's dtype. Scales: tensorwise 0-dim
    each; rowwise along the reduction dimension: x (M,1), w (1,N) | dy (M,1), wt (1,K) |
    dyt (N,1), xt (1,K). Saved for backward: xt_q (K, M16) FP8 and its scale, never the bf16 x.
    M16: M rounded up to 16, wgrad's operands carry zero columns past M (`_cols_padded`).
    wt_s None: the same scale as w_s (tensorwise).

    torch.compile rules (Dynamo captures forward and backward as subgraphs):
    - forward's result must be a tensor no other forward intermediate *is*: no no-op `.to()` /
      `.contiguous()` / in-place op producing it (`_cast`). torch 2.11 returns every forward
      intermediate as an extra subgraph output; one that is the result itself takes over the
      result's autograd slot, so dy is routed to a dead output and x, W and everything upstream
      silently get no gradient from this layer (pytorch/pytorch#180642; later releases filter
      such aliases). This was the compiled block's all-ones x.grad on the H200.
    - no tensor in two argument slots (hence wt_s None rather than w_s twice): 2.11 mis-wires
      such inputs' gradients (pytorch/pytorch#181146), later releases refuse the trace (a graph
      break, an error under fullgraph=True).
    """

    @staticmethod
    def forward(ctx, x_MK, weight_NK, w_q, w_s, wt_q, wt_s, recipe, amax_history_OL, scale_O, out_dtype):
        rowwise, pow2 = recipe.scaling == "rowwise", recipe.pow2_scales
        if rowwise:
            x_op = quantize_rowwise(x_MK, pow2)
            xt = quantize_rowwise(x_MK.t(), pow2)  # TODO(perf) in the note: one fused rows+cols pass
            xt = Fp8Operand(xt.q, xt.scale.reshape(1, -1))
        else:
            x_scale = None if scale_O is None else scale_O[_X]
            x_op, amax = quantize_tensorwise(x_MK, x_scale, E4M3, pow2)
            _record_amax(amax_history_OL, _X, amax)
            xt = Fp8Operand(x_op.q.t(), x_op.scale)
        y_MN = scaled_mm(x_op, Fp8Operand(w_q.t(), w_s), out_dtype, rowwise)
        xt_q = _cols_padded(xt.q)  # (K, M16)
        ctx.save_for_backward(xt_q, xt.scale, wt_q, w_s if wt_s is None else wt_s, amax_history_OL, scale_O)
        ctx.recipe, ctx.dtypes = recipe, (x_MK.dtype, weight_NK.dtype)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        xt_q, xt_s, wt_q, wt_s, amax_history_OL, scale_O = ctx.saved_tensors
        recipe = ctx.recipe
        rowwise, pow2 = recipe.scaling == "rowwise", recipe.pow2_scales
        dy_MN = dy_MN.contiguous()
        if rowwise:
            dy_op = quantize_rowwise(dy_MN, pow2)
            dyt_op = quantize_rowwise(dy_MN.t(), pow2)
        else:
            dy_scale = None if scale_O is None else scale_O[_DY]
            dy_op, amax = quantize_tensorwise(dy_MN, dy_scale, fp8_dtype_of(recipe.grad_dtype), pow2)
            _record_amax(amax_history_OL, _DY, amax)
            dyt_op = Fp8Operand(dy_op.q.t(), dy_op.scale)
        dyt_op = Fp8Operand(_cols_padded(dyt_op.q), dyt_op.scale)  # (N, M16)
        x_dtype, w_dtype = ctx.dtypes
        dx_MK = _cast(scaled_mm(dy_op, Fp8Operand(wt_q.t(), wt_s), dy_MN.dtype, rowwise), x_dtype)
        dw_NK = scaled_mm(dyt_op, Fp8Operand(xt_q.t(), xt_s), w_dtype, rowwise)
        return dx_MK, dw_NK, None, None, None, None, None, None, None, None


class Float8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs; `recipe` (Float8LinearRecipe) picks the scaling.

    in_features and out_features must be multiples of 16 (ValueError otherwise); any number of
    tokens is fine."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: Optional[Float8LinearRecipe] = None) -> None:  # fmt: skip
        problem = float8_dims_problem(in_features, out_features)
        if problem is not None:
            raise ValueError(f"Float8Linear: {problem}; keep such a layer as nn.Linear "
                             "(convert_to_float8_training's default filter skips it)")  # fmt: skip
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = recipe if recipe is not None else Float8LinearRecipe()
        self.init_fp8_state(self.weight.device)

    def init_fp8_state(self, device: torch.device) -> None:
        """(Re)create the delayed-scaling buffers on `device` (the converter builds on meta)."""
        self._weight_cache = WeightCache(quantize_linear_weight)
        self._delayed_ready = False  # True once a sync (or a checkpoint) has filled the history
        if self.recipe.delayed:
            L = self.recipe.history_len
            self.register_buffer("amax_history_OL", torch.zeros(2, L, dtype=torch.float32, device=device))
            self.register_buffer("scale_O", torch.ones(2, dtype=torch.float32, device=device))

    def reset_buffers(self) -> None:
        """The delayed-scaling state as built, in place (after `to_empty` on a meta-built model)."""
        self.init_fp8_state(self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Float8LinearRecipe) -> "Float8Linear":
        """A Float8Linear holding `linear`'s Parameter objects (not copies)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe=recipe)
        new.weight, new.bias = linear.weight, linear.bias
        new.init_fp8_state(linear.weight.device)
        new.train(linear.training)
        return new

    def invalidate_weight_cache(self) -> None:
        self._weight_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        wq = self._weight_cache.get(self.weight, self.recipe)
        delayed = self.recipe.delayed
        history = self.amax_history_OL if delayed else None
        # Before the first sync there is no history: current scaling, still recording amaxes.
        scale = self.scale_O if delayed and self._delayed_ready else None
        x_MK = x.reshape(-1, self.in_features)
        # Tensorwise shares one weight scale between both copies: pass it once (see the Function).
        w_s, wt_s = wq.w.scale, wq.wt.scale
        wt_s = None if wt_s is w_s else wt_s
        with torch.autocast(dev, enabled=False):
            y_MN = _Float8LinearFunction.apply(
                x_MK, self.weight, wq.w.q, w_s, wq.wt.q, wt_s, self.recipe, history, scale, out_dtype
            )
        y = y_MN.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y

    @torch.no_grad()
    def update_delayed_scales(self, amax_O: torch.Tensor) -> None:
        """This step's amaxes (x, dy; already reduced over ranks) -> new scales, then roll.

        history[:, 0] = amax; scale = max(history) * 2**margin / fmax; history rolls one slot
        (the oldest amax leaves) and the new slot 0 starts at zero for the next step.
        """
        hist = self.amax_history_OL
        # A non-finite amax (a skipped, overflowing step) would poison the next `L` scales: drop it.
        amax_O = torch.where(torch.isfinite(amax_O), amax_O, torch.zeros_like(amax_O))
        hist[:, 0] = amax_O
        fmax_O = torch.tensor([torch.finfo(E4M3).max, torch.finfo(fp8_dtype_of(self.recipe.grad_dtype)).max],
                              dtype=torch.float32, device=hist.device)  # fmt: skip
        amax_O = hist.amax(dim=1) * 2.0**self.recipe.margin
        self.scale_O.copy_(amax_to_scale(amax_O, fmax_O, self.recipe.pow2_scales))
        hist.copy_(hist.roll(1, dims=1))
        hist[:, 0] = 0
        self._delayed_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        hist = state_dict.get(prefix + "amax_history_OL")
        if hist is not None:
            # A restored history means restored scales: use them from the first step on.
            self._delayed_ready = bool(torch.as_tensor(hist).any())

    def extra_repr(self) -> str:
        r = self.recipe
        extra = f", history_len={r.history_len}, margin={r.margin}" if r.delayed else ""
        return super().extra_repr() + f", scaling={r.scaling}, grad_dtype={r.grad_dtype}{extra}"
