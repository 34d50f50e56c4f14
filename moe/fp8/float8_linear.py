"""Float8Linear: nn.Linear whose three GEMMs run in FP8 (E4M3 forward, E4M3 or E5M2 gradients).

Legend: M rows (all leading dims of x flattened), K in_features, N out_features,
O operands with delayed scales (0: x, 1: dy), L amax history length.

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
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from kernels.quantize import quantize_rows
from kernels.quantize_tensor import quantize_tensor
from kernels.reference import torch_quantize_rows, torch_quantize_tensor
from moe.fp8.recipe import Float8LinearRecipe
from moe.fp8.weight_cache import WeightCache

# _cpu_note: on CPU tensors the casts are the kernels' pure-torch references, even under
# TRITON_INTERPRET: the interpreter's fp32 -> fp8 cast mis-rounds ~2.5% of random elements
# (kernels/common.py), 5-6% relative error, which would swamp the emulation comparison. The
# kernels are tested against the references on their own (tests/test_kernels_*.py).
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_X, _DY = 0, 1  # rows of amax_history_OL / scale_O


def fp8_dtype_of(name: str) -> torch.dtype:
    return E4M3 if name == "e4m3" else E5M2


def amax_to_scale(amax: torch.Tensor, fmax: torch.Tensor | float) -> torch.Tensor:
    """Dequantization scale amax / fmax (fp32, IEEE division by a tensor), 1 where amax == 0."""
    amax = amax.float()
    fmax = torch.as_tensor(fmax, dtype=torch.float32, device=amax.device)
    return torch.where(amax == 0, torch.ones_like(amax), amax / fmax)


class Fp8Operand(NamedTuple):
    """q in the layout the GEMM reads; scale fp32: 0-dim (tensorwise), or (rows, 1) / (1, cols)."""

    q: torch.Tensor
    scale: torch.Tensor


def scaled_mm(a: Fp8Operand, b: Fp8Operand, out_dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    """a.q (M, K) row-major times b.q (K, N) column-major, dequantized by the scales.

    CUDA: torch._scaled_mm (cuBLASLt tensorwise, CUTLASS rowwise; rowwise writes bf16 only, so
    other output dtypes are cast after). CPU: an emulation, dequantize and multiply in fp32,
    which is what the hardware computes up to accumulation order.
    """
    if a.q.is_cuda:
        mm_dtype = torch.bfloat16 if rowwise else out_dtype
        out = torch._scaled_mm(a.q, b.q, scale_a=a.scale, scale_b=b.scale, out_dtype=mm_dtype)
        return out.to(out_dtype)
    with torch.autocast(a.q.device.type, enabled=False):
        return ((a.q.float() * a.scale) @ (b.q.float() * b.scale)).to(out_dtype)


def quantize_tensorwise(
    x: torch.Tensor, scale: Optional[torch.Tensor], fp8_dtype: torch.dtype
) -> tuple[Fp8Operand, torch.Tensor]:
    """(x quantized with one scale, x's amax). scale None: current scaling, from x's amax."""
    if scale is None:
        # A separate read for the amax: the scale must exist before the first element is cast.
        scale = amax_to_scale(x.abs().amax(), torch.finfo(fp8_dtype).max)
    quantize = quantize_tensor if x.is_cuda else torch_quantize_tensor  # CPU: see _cpu_note
    q, amax = quantize(x, scale.reshape(()).float(), fp8_dtype)
    return Fp8Operand(q, scale.reshape(()).float()), amax


def quantize_rowwise(x_RC: torch.Tensor) -> Fp8Operand:
    """E4M3 rows of x_RC with a scale per row, scale shaped (R, 1) (a's side of scaled_mm)."""
    q, scale_R = (quantize_rows if x_RC.is_cuda else torch_quantize_rows)(x_RC)
    return Fp8Operand(q, scale_R.unsqueeze(1))


class QuantizedLinearWeight(NamedTuple):
    """w_NK for the forward (row-major, read as (K, N) column-major) and wt_KN for dgrad."""

    w: Fp8Operand  # q (N, K), scale () or (1, N)
    wt: Fp8Operand  # q (K, N), scale () or (1, K)


def quantize_linear_weight(weight_NK: torch.Tensor, recipe: Float8LinearRecipe) -> QuantizedLinearWeight:
    w = weight_NK.detach()
    if recipe.scaling == "rowwise":
        # Forward reduces over K: a scale per output channel; dgrad reduces over N: per input channel.
        w_op, wt_op = quantize_rowwise(w), quantize_rowwise(w.t())
        return QuantizedLinearWeight(
            Fp8Operand(w_op.q, w_op.scale.reshape(1, -1)), Fp8Operand(wt_op.q, wt_op.scale.reshape(1, -1))
        )
    w_op, _ = quantize_tensorwise(w, None, E4M3)
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
        wgrad    dW_NK = dy_MN^T @ x_MK   a = dyt_q (N, M) row-major,  b = xt_q (K, M) read as (M, K) col-major

    Dtypes: x, w E4M3; dy (and dyt) E4M3 or E5M2 (recipe.grad_dtype); scales fp32; y and dx in
    the compute dtype (bf16 under autocast), dW in the weight's dtype. Scales: tensorwise 0-dim
    each; rowwise along the reduction dimension: x (M,1), w (1,N) | dy (M,1), wt (1,K) |
    dyt (N,1), xt (1,K). Saved for backward: xt_q (K, M) FP8 and its scale, never the bf16 x.
    """

    @staticmethod
    def forward(ctx, x_MK, weight_NK, w_q, w_s, wt_q, wt_s, recipe, amax_history_OL, scale_O, out_dtype):
        rowwise = recipe.scaling == "rowwise"
        if rowwise:
            x_op = quantize_rowwise(x_MK)
            xt = quantize_rowwise(x_MK.t())  # TODO(perf) in the note: one fused rows+cols pass
            xt = Fp8Operand(xt.q, xt.scale.reshape(1, -1))
        else:
            x_scale = None if scale_O is None else scale_O[_X]
            x_op, amax = quantize_tensorwise(x_MK, x_scale, E4M3)
            _record_amax(amax_history_OL, _X, amax)
            xt = Fp8Operand(x_op.q.t().contiguous(), x_op.scale)
        y_MN = scaled_mm(x_op, Fp8Operand(w_q.t(), w_s), out_dtype, rowwise)
        ctx.save_for_backward(xt.q, xt.scale, wt_q, wt_s, amax_history_OL, scale_O)
        ctx.recipe, ctx.dtypes = recipe, (x_MK.dtype, weight_NK.dtype)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        xt_q, xt_s, wt_q, wt_s, amax_history_OL, scale_O = ctx.saved_tensors
        recipe = ctx.recipe
        rowwise = recipe.scaling == "rowwise"
        dy_MN = dy_MN.contiguous()
        if rowwise:
            dy_op = quantize_rowwise(dy_MN)
            dyt_op = quantize_rowwise(dy_MN.t())
        else:
            dy_scale = None if scale_O is None else scale_O[_DY]
            dy_op, amax = quantize_tensorwise(dy_MN, dy_scale, fp8_dtype_of(recipe.grad_dtype))
            _record_amax(amax_history_OL, _DY, amax)
            dyt_op = Fp8Operand(dy_op.q.t().contiguous(), dy_op.scale)
        x_dtype, w_dtype = ctx.dtypes
        dx_MK = scaled_mm(dy_op, Fp8Operand(wt_q.t(), wt_s), dy_MN.dtype, rowwise).to(x_dtype)
        dw_NK = scaled_mm(dyt_op, Fp8Operand(xt_q.t(), xt_s), w_dtype, rowwise)
        return dx_MK, dw_NK, None, None, None, None, None, None, None, None


class Float8Linear(nn.Linear):
    """nn.Linear with FP8 GEMMs; `recipe` (Float8LinearRecipe) picks the scaling."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe: Optional[Float8LinearRecipe] = None) -> None:  # fmt: skip
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
        with torch.autocast(dev, enabled=False):
            y_MN = _Float8LinearFunction.apply(
                x_MK, self.weight, wq.w.q, wq.w.scale, wq.wt.q, wq.wt.scale, self.recipe, history, scale, out_dtype
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
        self.scale_O.copy_(amax_to_scale(hist.amax(dim=1) * 2.0**self.recipe.margin, fmax_O))
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
