"""FP8 GroupedMLP: the BF16 GroupedMLP with its grouped computation done in E4M3.

Shape letters (README.md): T tokens, A experts a token is routed to, M = T*A routed rows, H hidden,
F expert FFN, X = 2F (SwiGLU) or F (GELU), E experts, P padded rows (each expert's token group
starts at a multiple of the recipe's `align`).

The autograd Function runs six FP8 GEMMs; every operand is quantized by a fused kernel that also
writes the copy the next GEMM needs, so no BF16 activation is stored for backward:

    forward   x_MH  -> quantize rows (for GEMM1) + per-group transposed columns xt_HP (for wgrad1);
                     from tokens (EP=1): gathered from x_TH in the same pass
              h_MX  = GEMM1(x, w1)                          (M, X) bf16, consumed at once
              a_MF  = act(h) quantized rows (for GEMM2); h kept as FP8 for backward
              y_MH  = GEMM2(a, w2)
    backward  dy_MH -> quantize rows (dgrad2) + transposed columns dyt_HP (wgrad2)
              da_MF = dy @ w2                               dgrad2
              dh    = act'(h) * da, quantized rows (dgrad1) + columns dht_XP (wgrad1),
                      and a = act(h) recomputed as columns at_FP (wgrad2), in one kernel
              dw2   = dyt @ at^T  per expert                wgrad2
              dx    = dh @ w1                               dgrad1
              dw1   = dht @ xt^T  per expert                wgrad1
              dx_TH = each token's A rows of dx summed      from tokens (kernels/combine.py)

Saved for backward: xt (FP8), h (FP8; BF16 with unit scales under the fp8.intermediate=bf16
ablation, which act_quant_bwd reads as h * scale like FP8 bytes), their scales, the group
offsets, and the transposed FP8 weights that dgrad reads (the forward orientation is dropped
once GEMM2 ran); backward lets go of each FP8 weight as soon as its dgrad ran, and the weight
gradients come out in the parameter's dtype (fp32 master weights: both recipes' weight-gradient
GEMMs write fp32, no bf16 copy to cast).

Weights, two policies (`cache_weights`), and a third way in:
- False (default, one micro-batch per optimizer step): quantized in every forward, both
  orientations in one pass, and nothing outlives the step: a cache alive through backward would
  lift the block's peak memory above BF16's (bench/NOTES.md).
- True (gradient accumulation: moe/fp8/training.py sets it when run.grad_accum > 1): quantized once per
  optimizer step and reused by every micro-batch until the weights change (WeightCache); dropped
  after the step's last forward where the trainer defers the weight gradients (`wgrad_stash`).
- Neither under FSDP with parallel.fp8_all_gather: the weights arrive quantized (each rank
  quantizes its own shard once per step, FSDP all-gathers the FP8 bytes: moe/fp8/fsdp_all_gather.py).
Rowwise, the first two take the amaxes the optimizer step took where it did (moe/fp8/step_amax.py).

Gradient accumulation (`accumulate_grads`, moe/grad_accumulation.py): where a weight's .grad
already holds the earlier micro-batches' sum, its weight-gradient GEMM adds into it in the epilogue
and backward returns None for it, so no product is written and then added. Deferred
(`wgrad_stash`, moe/fp8/deferred_wgrad.py, run.defer_expert_wgrad): backward keeps the weight
gradients' FP8 operands and returns None until the step's last micro-batch, whose backward makes
each weight's gradient once over every micro-batch's tokens.

A recipe with `gemms` other than "all" (an ablation, moe/fp8/recipe.py) runs moe/fp8/ablation.py
instead of this Function.

Statistics (logging.fp8_stats_interval): while the trainer has set `stats` (an Fp8Stats,
moe/fp8/stats.py), the quantizers of x, w1, a, h, w2 and dy count amax, underflows and
saturations into it in the pass that casts (kernels/fp8_stats.py); None (the default) counts nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from kernels.act_quant import act_quant_fwd
from kernels.act_quant_bwd import act_quant_bwd
from kernels.combine import gather_sum
from kernels.quantize_grouped import quantize_cols_grouped, quantize_rows_and_cols_grouped
from kernels.quantize_weight import QuantizedWeight, quantize_weight
from moe.dispatch import ExpertInput, compute_dtype
from moe.experts import GroupedMLP
from moe.fp8.ablation import ablation_grouped_mlp
from moe.fp8.deferred_wgrad import WgradStash, deferrable
from moe.fp8.fsdp_all_gather import gathered_fp8
from moe.fp8.gemm import grouped_mm, grouped_mm_wgrad, grouped_mm_wgrad_accumulate_
from moe.fp8.recipe import Fp8Recipe
from moe.fp8.step_amax import fresh_amax
from moe.fp8.weight_cache import WeightCache
from moe.grad_accumulation import grad_to_add_into

if TYPE_CHECKING:
    from moe.fp8.stats import Fp8Stats


def quantize_expert_weight(
    w_ENK: torch.Tensor, recipe: Fp8Recipe, stats: Optional[torch.Tensor] = None, amax: Optional[torch.Tensor] = None
) -> QuantizedWeight:
    """Both FP8 orientations of an expert weight, quantized from its bf16 rounding for every recipe.

    fp32 masters are read as they are and rounded to bf16 inside the quantizer (round_bf16): the
    same bytes as quantizing the bf16 copy that autocast would make, on every device (the CPU
    reference included), without writing that copy (rowwise 3.62 ms against 4.32 for the copy
    and the bf16 quantizer at Mixtral-8x7B width: bench/NOTES.md). stats: the forward copy's
    cast statistics (kernels/fp8_stats.py). amax: rowwise, the amaxes the optimizer step took
    (moe/fp8/step_amax.py), so the quantizer's own amax pass does not run."""
    return quantize_weight(w_ENK, recipe.name, recipe.pow2_scales, round_bf16=True, stats=stats, amax=amax)


def unit_scales(h_MX: torch.Tensor, block: int) -> torch.Tensor:
    """Scales of 1 in the shape act_quant_bwd takes for h: (M,), or (M, X // 128) for 1x128 tiles."""
    M, X = h_MX.shape
    return h_MX.new_ones((M, X // block) if block else (M,), dtype=torch.float32)


class _Fp8GroupedMLPFunction(torch.autograd.Function):
    """x: the permuted rows x_MH, or with `gather` = (token_idx_M, row_of_TA, kept_TA) the tokens
    x_TH (any float dtype, cast to `dtype` here) whose rows the quantizer gathers; dx then comes
    back as x_TH's gradient in x's dtype, each token's rows summed in fp32. stats: an Fp8Stats or
    None (module docstring)."""

    @staticmethod
    def forward(ctx, x, w1_EXH, w2_EHF, group_end_E, activation, recipe, wq1, wq2, x_fp8, gather, dtype, stats,
                accumulate, stash):  # fmt: skip
        block, align, pow2 = recipe.block, recipe.align, recipe.pow2_scales
        ctx.stats = stats
        ctx.weights = (w1_EXH, w2_EHF) if accumulate else (None, None)
        ctx.stash = stash if stash is not None and deferrable(w1_EXH) and deferrable(w2_EHF) else None
        ctx.x_dtype = x.dtype
        ctx.gather = gather is not None
        if gather is not None:
            # The T token rows cast once (fp32 residual stream under autocast), the M = T*A
            # routed rows never written: they exist only as the FP8 bytes below.
            x_q, x_s, xt_q, xt_s, padded_end_E = quantize_rows_and_cols_grouped(
                x.to(dtype), group_end_E, align, block, pow2, gather[0], stats=_of(stats, "x")
            )[:5]
        elif x_fp8 is None:
            x_q, x_s, xt_q, xt_s, padded_end_E = quantize_rows_and_cols_grouped(
                x, group_end_E, align, block, pow2, stats=_of(stats, "x")
            )[:5]
        else:
            # FP8 dispatch: the rows came quantized over the wire (the bytes this function would
            # have made from the sender's bf16 rows); only wgrad1's column copy is built here, from
            # the dequantized rows, since the bf16 rows never left the sender.
            x_q, x_s = x_fp8.q_MH, x_fp8.scale
            xt_q, xt_s, padded_end_E = quantize_cols_grouped(x, group_end_E, align, block, pow2)[:3]
        h_MX = grouped_mm(x_q, x_s, wq1.q_ENK, wq1.scale, group_end_E, recipe)
        keep_bf16_h = recipe.intermediate == "bf16"
        a_q, a_s, h_q, h_s = act_quant_fwd(h_MX, activation, block, pow2, not keep_bf16_h, stats=_of(stats, "a", 2))
        if keep_bf16_h:
            h_q, h_s = h_MX, unit_scales(h_MX, block)
        del h_MX
        y_MH = grouped_mm(a_q, a_s, wq2.q_ENK, wq2.scale, group_end_E, recipe)
        ctx.save_for_backward(xt_q, xt_s, h_q, h_s, group_end_E, padded_end_E, *(gather or ()))
        ctx.activation, ctx.recipe = activation, recipe
        # Only dgrad's orientation: with cache_weights=False nothing else holds the forward one.
        ctx.wt1, ctx.wt2 = (wq1.qt_EKN, wq1.scale_t), (wq2.qt_EKN, wq2.scale_t)
        ctx.w_dtypes = (w1_EXH.dtype, w2_EHF.dtype)
        return y_MH

    @staticmethod
    def backward(ctx, dy_MH):
        xt_q, xt_s, h_q, h_s, group_end_E, padded_end_E, *gather = ctx.saved_tensors
        recipe = ctx.recipe
        block, align, pow2 = recipe.block, recipe.align, recipe.pow2_scales
        dy_MH = dy_MH.contiguous()
        dy_q, dy_s, dyt_q, dyt_s = quantize_rows_and_cols_grouped(
            dy_MH, group_end_E, align, block, pow2, stats=_of(ctx.stats, "dy")
        )[:4]
        da_MF = grouped_mm(dy_q, dy_s, *ctx.wt2, group_end_E, recipe)
        ctx.wt2 = None  # this backward's last use of the FP8 w2
        del dy_q, dy_s
        dh_q, dh_s, dht_q, dht_s, at_q, at_s, _ = act_quant_bwd(
            da_MF, h_q, h_s, ctx.activation, group_end_E, align, block, pow2
        )
        del da_MF
        into1, into2 = (grad_to_add_into(w) for w in ctx.weights)
        ctx.weights = None
        dw2_EHF = _wgrad(into2, (dyt_q, dyt_s, at_q, at_s, padded_end_E), recipe, ctx.w_dtypes[1], ctx.stash, "w2")
        del dyt_q, dyt_s, at_q, at_s
        dx_MH = grouped_mm(dh_q, dh_s, *ctx.wt1, group_end_E, recipe)
        ctx.wt1 = None
        del dh_q, dh_s
        dw1_EXH = _wgrad(into1, (dht_q, dht_s, xt_q, xt_s, padded_end_E), recipe, ctx.w_dtypes[0], ctx.stash, "w1")
        ctx.stash = None
        if ctx.gather:
            _, row_of_TA, kept_TA = gather
            dx = gather_sum(dx_MH, row_of_TA, kept_TA, ctx.x_dtype)
        else:
            dx = dx_MH
        return dx, dw1_EXH, dw2_EHF, None, None, None, None, None, None, None, None, None, None, None


def _wgrad(into, operands, recipe: Fp8Recipe, dtype, stash: Optional[WgradStash], name: str) -> Optional[torch.Tensor]:
    """A weight's gradient for backward to return: the product, or None once added into `into`,
    or with a stash None until the step's last micro-batch (moe/fp8/deferred_wgrad.py)."""
    if stash is not None:
        grad = stash.take(name, operands, recipe.name != "blockwise", recipe.promotion_interval, into)
        return None if grad is None else grad.to(dtype)
    if into is None:
        return grouped_mm_wgrad(*operands, recipe, dtype)
    grouped_mm_wgrad_accumulate_(into, *operands, recipe)
    return None


def _of(stats: Optional[Fp8Stats], operand: str, n: int = 1) -> Optional[torch.Tensor]:
    return None if stats is None else stats.of(operand, n)


def fp8_grouped_mlp(
    inp: ExpertInput,
    w1_EXH: torch.Tensor,
    w2_EHF: torch.Tensor,
    activation: str,
    recipe: Fp8Recipe,
    wq1: QuantizedWeight | None = None,
    wq2: QuantizedWeight | None = None,
    stats: Optional[Fp8Stats] = None,
    accumulate_grads: bool = False,
    stash: Optional[WgradStash] = None,
) -> torch.Tensor:
    """The FP8 experts on weights the caller owns (Fp8GroupedMLP's, or another library's expert
    parameters in the same layout): (M, H), differentiable w.r.t. inp.x, w1 and w2.

    Tokens are gathered inside the quantization (permute + quantize in one pass); FP8 rows from an
    FP8 dispatch go to GEMM1 as they came; BF16 rows are quantized here. wq1, wq2: FP8 copies of
    the weights the caller already has (a WeightCache, FSDP's FP8 all-gather); None quantizes them
    for this call only. stats: an Fp8Stats to count into, or None; accumulate_grads: add the
    weight gradients into w1.grad and w2.grad where they exist; stash: defer them to the step's
    last micro-batch (all three: module docstring)."""
    dtype = compute_dtype(inp.x)
    if dtype != torch.bfloat16 and inp.x.is_cuda:
        raise ValueError(f"FP8 experts take bfloat16 activations on the GPU (or bf16 autocast), got {dtype}")
    gather, x = None, inp.x.to(dtype)
    if inp.perm is not None:  # x stays in its dtype: the gathering quantizer casts the T tokens
        gather, x = (inp.perm.token_idx_M, inp.perm.row_of_TA, inp.perm.kept_TA), inp.x
    if wq1 is None or wq2 is None:
        with torch.no_grad():
            wq1 = quantize_expert_weight(w1_EXH.detach(), recipe, _of(stats, "w1"))
            wq2 = quantize_expert_weight(w2_EHF.detach(), recipe, _of(stats, "w2"))
    if recipe.gemms != "all":
        return ablation_grouped_mlp(inp, w1_EXH, w2_EHF, wq1, wq2, activation, recipe, dtype)
    return _Fp8GroupedMLPFunction.apply(
        x.contiguous(), w1_EXH, w2_EHF, inp.group_end_E(), activation, recipe, wq1, wq2, inp.fp8, gather, dtype,
        stats, accumulate_grads, stash,
    )  # fmt: skip


class Fp8GroupedMLP(GroupedMLP):
    """Same constructor and parameters as GroupedMLP; only `grouped_mlp` differs."""

    recipe: Fp8Recipe = Fp8Recipe("rowwise")
    cache_weights: bool = False  # see the module docstring; moe/fp8/training.py sets it per grad_accum
    stats: Optional[Fp8Stats] = None  # see the module docstring; moe/fp8/stats.py sets it
    wgrad_stash: Optional[WgradStash] = None  # see the module docstring; the trainer sets it

    def __init__(self, *args, recipe: Fp8Recipe | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if recipe is not None:
            self.recipe = recipe
        self._w1_cache = WeightCache(quantize_expert_weight)
        self._w2_cache = WeightCache(quantize_expert_weight)

    def grouped_mlp(self, inp: ExpertInput) -> torch.Tensor:
        """`fp8_grouped_mlp` on this module's weights, their FP8 copies from where the policy in
        the module docstring says."""
        wq1, wq2 = gathered_fp8(self.w1), gathered_fp8(self.w2)
        if wq1 is not None and wq2 is not None:
            pass  # FSDP all-gathered them as FP8, quantized per shard (moe/fp8/fsdp_all_gather.py)
        elif self.cache_weights:
            wq1 = self._w1_cache.get(self.w1, self.recipe, stats=_of(self.stats, "w1"), amax=fresh_amax(self.w1))
            wq2 = self._w2_cache.get(self.w2, self.recipe, stats=_of(self.stats, "w2"), amax=fresh_amax(self.w2))
            if self.wgrad_stash is not None and self.wgrad_stash.last:
                # The step's last forward: nothing reads the copies after this call and its backward,
                # which holds dgrad's orientation itself. Dropped now, they are not held through the
                # last backward, where the deferred weight gradients are made.
                self.invalidate_weight_cache()
        else:
            if not torch.compiler.is_compiling():
                self.invalidate_weight_cache()  # a cache left from cache_weights=True would go stale
            with torch.no_grad():  # quantized for this forward only
                wq1 = quantize_expert_weight(self.w1.detach(), self.recipe, _of(self.stats, "w1"), fresh_amax(self.w1))
                wq2 = quantize_expert_weight(self.w2.detach(), self.recipe, _of(self.stats, "w2"), fresh_amax(self.w2))
        stash = None if torch.compiler.is_compiling() else self.wgrad_stash
        return fp8_grouped_mlp(inp, self.w1, self.w2, self.activation, self.recipe, wq1, wq2, self.stats,
                               self.accumulate_grads, stash)  # fmt: skip

    def invalidate_weight_cache(self) -> None:
        self._w1_cache.clear()
        self._w2_cache.clear()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"
