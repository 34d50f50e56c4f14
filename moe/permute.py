"""Group routed tokens by expert (permute) and fold expert outputs back into tokens (unpermute).

Shape letters: T tokens, K top-k, H hidden, E experts, M = T*K routed rows.

Layout of the permuted rows (what the experts and the dispatcher rely on):
- M = T*K rows always, whatever the routing: a static shape, so no host synchronisation.
- Rows are the (t, k) assignments sorted stably by expert id: the first sum(tokens_per_expert)
  rows are the kept assignments, expert 0's first, then expert 1's, ..., and inside one expert in
  token order. Dropped assignments (id E, see `moe.router`) sort last; their rows hold a copy of
  their token but belong to no expert: the experts may leave anything there (even NaN), and
  both `unpermute` and the backward of `permute` ignore those rows.

`permute` is two steps, so the FP8 experts can fuse the second into their quantization:
`plan_permute` (the sort: counts and indices, no activations touched) and `gather_rows` (the
copy). `gather_rows` casts to the experts' compute dtype before it gathers: under bf16 autocast
the residual stream is fp32, and casting its T rows once (6 bytes a token-element) then gathering
bf16 copies (4 a routed element) moves 7 bytes a routed element at top-2 and 4.75 at top-8,
against 14 for gathering fp32 copies and casting those (the same values either way). The
gradient is still summed in fp32 and returned in x's dtype.

Both directions are autograd Functions whose backward is a gather over the K assignments of
each token (no scatter-add): deterministic on a GPU, and the dropped rows can be masked out
of the gradient as they are out of the forward. Both run the one-pass Triton kernels of
kernels/combine.py (the unweighted `gather_sum` for permute's backward), 0.82-0.93 of copy on an
H200 (gather_sum 0.86-0.93, bench/results/kernels.json) where the gather-and-add loop in torch ran
at 0.04-0.09; their torch references on a CPU and for fp64 (gradcheck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.combine import UnpermuteCombine, gather_sum


@dataclass(frozen=True)
class PermuteMeta:
    """What `unpermute` (and an all-to-all dispatcher) needs to undo a `permute`."""

    token_idx_M: Tensor  # int64 (M,): source token of each permuted row
    row_of_TK: Tensor  # int64 (T, K): permuted row holding assignment (t, k)
    kept_TK: Tensor  # bool (T, K): False for dropped assignments
    num_tokens: int  # T


def count_tokens_per_expert(topk_ids_TK: Tensor, num_experts: int) -> Tensor:
    """int64 (E,) count of the assignments to each expert; dropped ids (== E) are not counted.

    A scatter-add into E + 1 bins rather than `torch.bincount`: bincount sizes its output from
    the data's maximum, which costs a host synchronisation on a GPU.
    """
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids_TK.device)
    ids_M = topk_ids_TK.reshape(-1)
    counts_E1.scatter_add_(0, ids_M, torch.ones_like(ids_M, dtype=torch.int64))
    return counts_E1[:num_experts]


class _GatherTokens(torch.autograd.Function):
    """x_MH = x_TH.to(dtype)[token_idx_M]; backward sums each token's K kept rows of grad_x_MH in
    fp32 (fp64 for fp64) and returns them in x's dtype.

    Dropped rows get no gradient path: grouped GEMMs leave rows past the last group untouched,
    so their gradient rows may be garbage, and must not reach x.
    """

    @staticmethod
    def forward(ctx, x_TH: Tensor, token_idx_M: Tensor, row_of_TK: Tensor, kept_TK: Tensor, dtype: torch.dtype):
        ctx.save_for_backward(row_of_TK, kept_TK)
        ctx.x_dtype = x_TH.dtype
        return x_TH.to(dtype).index_select(0, token_idx_M)

    @staticmethod
    def backward(ctx, grad_x_MH: Tensor):
        row_of_TK, kept_TK = ctx.saved_tensors
        return gather_sum(grad_x_MH, row_of_TK, kept_TK, ctx.x_dtype), None, None, None, None


def plan_permute(topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, PermuteMeta]:
    """Where each (t, k) assignment goes: tokens_per_expert_E (int64, kept assignments only) and
    the indices of the layout above. Reads only the ids (no activations, no host sync).

    topk_ids_TK: int64 in [0, E], E marking a dropped assignment (not checked: that would sync).
    """
    T, K = topk_ids_TK.shape
    M = T * K
    ids_M = topk_ids_TK.reshape(-1)
    # Stable: equal ids keep their (t, k) order, so rows inside an expert follow token order and
    # the result is reproducible; dropped (id E) sort after every expert.
    _, order_M = torch.sort(ids_M, stable=True)
    row_of_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M, device=order_M.device))
    meta = PermuteMeta(
        token_idx_M=order_M // K,
        row_of_TK=row_of_M.view(T, K),
        kept_TK=topk_ids_TK < num_experts,
        num_tokens=T,
    )
    return count_tokens_per_expert(topk_ids_TK, num_experts), meta


def gather_rows(x_TH: Tensor, meta: PermuteMeta, dtype: torch.dtype | None = None) -> Tensor:
    """x_MH: each token copied into its permuted rows, in `dtype` (x's when None). Differentiable
    w.r.t. x_TH; the gradient comes back in x's dtype."""
    if x_TH.dim() != 2 or x_TH.shape[0] != meta.num_tokens:
        raise ValueError(f"x_TH must be ({meta.num_tokens}, H) for this permutation, got {tuple(x_TH.shape)}")
    dtype = x_TH.dtype if dtype is None else dtype
    return _GatherTokens.apply(x_TH, meta.token_idx_M, meta.row_of_TK, meta.kept_TK, dtype)


def permute(
    x_TH: Tensor, topk_ids_TK: Tensor, num_experts: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, PermuteMeta]:
    """Copy each token once per assignment and group the copies by expert: plan_permute, then
    gather_rows. Returns x_MH (in `dtype`, x's when None), tokens_per_expert_E and the metadata
    for `unpermute`. Differentiable w.r.t. x_TH.
    """
    T, K = topk_ids_TK.shape
    assert x_TH.dim() == 2 and x_TH.shape[0] == T, f"x_TH {tuple(x_TH.shape)} vs topk_ids_TK {(T, K)}"
    tokens_per_expert_E, meta = plan_permute(topk_ids_TK, num_experts)
    return gather_rows(x_TH, meta, dtype), tokens_per_expert_E, meta


def unpermute(y_MH: Tensor, meta: PermuteMeta, topk_weights_TK: Tensor) -> Tensor:
    """out_TH[t] = sum_k w[t, k] * y_MH[row_of_TK[t, k]], dropped assignments contributing exactly 0.

    The sum runs in fp32 (fp64 for fp64 inputs) and is cast once to y's dtype. Differentiable
    w.r.t. y_MH and topk_weights_TK (the router learns through the weights).
    """
    T, K = meta.row_of_TK.shape
    assert T == meta.num_tokens and y_MH.shape[0] == T * K, f"y_MH {tuple(y_MH.shape)} vs T={T}, K={K}"
    assert topk_weights_TK.shape == (T, K), f"topk_weights_TK {tuple(topk_weights_TK.shape)} vs {(T, K)}"
    return UnpermuteCombine.apply(y_MH, meta.row_of_TK, topk_weights_TK, meta.kept_TK)
