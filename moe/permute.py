"""Group routed tokens by expert (permute) and fold expert outputs back into tokens (unpermute).

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), H hidden, E experts,
M = T*A routed rows.

Layout of the permuted rows (what the experts and the dispatcher rely on):
- M = T*A rows always, whatever the routing: a static shape, so no host synchronisation.
- Rows are the (t, a) assignments sorted stably by expert id: the first sum(tokens_per_expert)
  rows are the kept assignments, expert 0's first, then expert 1's, ..., and inside one expert in
  token order. Dropped assignments (id E, see `moe.router`) sort last; their rows hold a copy of
  their token but belong to no expert: the experts may leave anything there (even NaN), and
  both `unpermute` and the backward of `gather_rows` ignore those rows.

Permuting is two steps, so the FP8 experts can fuse the second into their quantization:
`plan_permute` (the sort: indices only, no activations touched) and `gather_rows` (the copy).
`gather_rows` casts to the experts' compute dtype before it gathers: under bf16 autocast the
residual stream is fp32, and casting its T rows once (6 bytes a token-element) then gathering
bf16 copies (4 a routed element) moves 7 bytes a routed element at top-2 and 4.75 at top-8,
against 14 for gathering fp32 copies and casting those (the same values either way). The
gradient is still summed in fp32 and returned in x's dtype.

Both directions are autograd Functions whose backward is a gather over the A assignments of
each token (no scatter-add): deterministic on a GPU, and the dropped rows can be masked out
of the gradient as they are out of the forward. Both run the one-pass Triton kernels of
kernels/combine.py (the unweighted `gather_sum` for the gather's backward); their torch
references on a CPU and for fp64 (gradcheck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.combine import UnpermuteCombine, gather_sum


@dataclass(frozen=True)
class PermuteMeta:
    """Where each (t, a) assignment goes: what `gather_rows`, `unpermute` and the FP8 experts'
    gathering quantizer read."""

    token_idx_M: Tensor  # int64 (M,): source token of each permuted row
    row_of_TA: Tensor  # int64 (T, A): permuted row holding assignment (t, a)
    kept_TA: Tensor  # bool (T, A): False for dropped assignments
    num_tokens: int  # T


class _GatherTokens(torch.autograd.Function):
    """x_MH = x_TH.to(dtype)[token_idx_M]; backward sums each token's A kept rows of grad_x_MH in
    fp32 (fp64 for fp64) and returns them in x's dtype.

    Dropped rows get no gradient path: grouped GEMMs leave rows past the last group untouched,
    so their gradient rows may be garbage, and must not reach x.
    """

    @staticmethod
    def forward(ctx, x_TH: Tensor, token_idx_M: Tensor, row_of_TA: Tensor, kept_TA: Tensor, dtype: torch.dtype):
        ctx.save_for_backward(row_of_TA, kept_TA)
        ctx.x_dtype = x_TH.dtype
        return x_TH.to(dtype).index_select(0, token_idx_M)

    @staticmethod
    def backward(ctx, grad_x_MH: Tensor):
        row_of_TA, kept_TA = ctx.saved_tensors
        return gather_sum(grad_x_MH, row_of_TA, kept_TA, ctx.x_dtype), None, None, None, None


def plan_permute(topk_ids_TA: Tensor, num_experts: int) -> PermuteMeta:
    """The indices of the layout above. Reads only the ids (no activations, no host sync).

    topk_ids_TA: int64 in [0, E], E marking a dropped assignment (not checked: that would sync).
    The per-expert counts come from the router (`RouterOutput.tokens_per_expert_E`).
    """
    T, A = topk_ids_TA.shape
    M = T * A
    ids_M = topk_ids_TA.reshape(-1)
    # Stable: equal ids keep their (t, a) order, so rows inside an expert follow token order and
    # the result is reproducible; dropped (id E) sort after every expert.
    _, order_M = torch.sort(ids_M, stable=True)
    row_of_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M, device=order_M.device))
    return PermuteMeta(
        token_idx_M=order_M // A,
        row_of_TA=row_of_M.view(T, A),
        kept_TA=topk_ids_TA < num_experts,
        num_tokens=T,
    )


def gather_rows(x_TH: Tensor, meta: PermuteMeta, dtype: torch.dtype | None = None) -> Tensor:
    """x_MH: each token copied into its permuted rows, in `dtype` (x's when None). Differentiable
    w.r.t. x_TH; the gradient comes back in x's dtype."""
    if x_TH.dim() != 2 or x_TH.shape[0] != meta.num_tokens:
        raise ValueError(f"x_TH must be ({meta.num_tokens}, H) for this permutation, got {tuple(x_TH.shape)}")
    dtype = x_TH.dtype if dtype is None else dtype
    return _GatherTokens.apply(x_TH, meta.token_idx_M, meta.row_of_TA, meta.kept_TA, dtype)


def unpermute(y_MH: Tensor, meta: PermuteMeta, topk_weights_TA: Tensor) -> Tensor:
    """out_TH[t] = sum_a w[t, a] * y_MH[row_of_TA[t, a]], dropped assignments contributing exactly 0.

    The sum runs in fp32 (fp64 for fp64 inputs) and is cast once to y's dtype. Differentiable
    w.r.t. y_MH and topk_weights_TA (the router learns through the weights).
    """
    T, A = meta.row_of_TA.shape
    assert T == meta.num_tokens and y_MH.shape[0] == T * A, f"y_MH {tuple(y_MH.shape)} vs T={T}, A={A}"
    assert topk_weights_TA.shape == (T, A), f"topk_weights_TA {tuple(topk_weights_TA.shape)} vs {(T, A)}"
    return UnpermuteCombine.apply(y_MH, meta.row_of_TA, topk_weights_TA, meta.kept_TA)
