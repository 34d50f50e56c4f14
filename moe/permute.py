"""Group routed tokens by expert (permute) and fold expert outputs back into tokens (unpermute).

Shape letters: T tokens, K top-k, H hidden, E experts, M = T*K routed rows.

Layout of the permuted rows (what the experts and the dispatcher rely on):
- M = T*K rows always, whatever the routing: a static shape, so no host synchronisation.
- Rows are the (t, k) assignments sorted stably by expert id: the first sum(tokens_per_expert)
  rows are the kept assignments, expert 0's first, then expert 1's, ..., and inside one expert in
  token order. Dropped assignments (id E, see `moe.router`) sort last; their rows hold a copy of
  their token but belong to no expert: the experts may leave anything there (even NaN), and
  both `unpermute` and the backward of `permute` ignore those rows.

Both directions are autograd Functions whose backward is a gather over the K assignments of
each token (no scatter-add): deterministic on a GPU, and the dropped rows can be masked out
of the gradient as they are out of the forward. `unpermute` is the one-pass Triton kernel of
kernels/combine.py (forward and backward, 0.75-0.91 of copy on an H200 where the gather-and-add
loop in torch ran at 0.04-0.05); its torch reference on a CPU and for fp64 (gradcheck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.combine import UnpermuteCombine


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


def _accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, fp64 when any is fp64 (gradcheck)."""
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


class _GatherTokens(torch.autograd.Function):
    """x_MH = x_TH[token_idx_M]; backward sums each token's K kept rows of grad_x_MH.

    Dropped rows get no gradient path: grouped GEMMs leave rows past the last group untouched,
    so their gradient rows may be garbage, and must not reach x.
    """

    @staticmethod
    def forward(ctx, x_TH: Tensor, token_idx_M: Tensor, row_of_TK: Tensor, kept_TK: Tensor) -> Tensor:
        ctx.save_for_backward(row_of_TK, kept_TK)
        ctx.x_dtype = x_TH.dtype
        return x_TH.index_select(0, token_idx_M)

    @staticmethod
    def backward(ctx, grad_x_MH: Tensor):
        row_of_TK, kept_TK = ctx.saved_tensors
        T, K = row_of_TK.shape
        acc = _accumulate_dtype(grad_x_MH.dtype)
        grad_x_TH = torch.zeros(T, grad_x_MH.shape[1], dtype=acc, device=grad_x_MH.device)
        # A loop over the K slots keeps the temporaries at (T, H) instead of (T, K, H).
        for k in range(K):
            g_TH = grad_x_MH.index_select(0, row_of_TK[:, k]).to(acc)
            grad_x_TH += torch.where(kept_TK[:, k, None], g_TH, 0.0)
        return grad_x_TH.to(ctx.x_dtype), None, None, None


def permute(x_TH: Tensor, topk_ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, PermuteMeta]:
    """Copy each token once per assignment and group the copies by expert.

    topk_ids_TK: int64 in [0, E], E marking a dropped assignment (not checked: that would sync).
    Returns x_MH (x's dtype), tokens_per_expert_E (int64, x's device, kept assignments only)
    and the metadata for `unpermute`. Differentiable w.r.t. x_TH.
    """
    T, K = topk_ids_TK.shape
    assert x_TH.dim() == 2 and x_TH.shape[0] == T, f"x_TH {tuple(x_TH.shape)} vs topk_ids_TK {(T, K)}"
    M = T * K
    ids_M = topk_ids_TK.reshape(-1)
    # Stable: equal ids keep their (t, k) order, so rows inside an expert follow token order and
    # the result is reproducible; dropped (id E) sort after every expert.
    _, order_M = torch.sort(ids_M, stable=True)
    token_idx_M = order_M // K
    row_of_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M, device=order_M.device))
    meta = PermuteMeta(
        token_idx_M=token_idx_M,
        row_of_TK=row_of_M.view(T, K),
        kept_TK=topk_ids_TK < num_experts,
        num_tokens=T,
    )
    x_MH = _GatherTokens.apply(x_TH, token_idx_M, meta.row_of_TK, meta.kept_TK)
    return x_MH, count_tokens_per_expert(topk_ids_TK, num_experts), meta


def unpermute(y_MH: Tensor, meta: PermuteMeta, topk_weights_TK: Tensor) -> Tensor:
    """out_TH[t] = sum_k w[t, k] * y_MH[row_of_TK[t, k]], dropped assignments contributing exactly 0.

    The sum runs in fp32 (fp64 for fp64 inputs) and is cast once to y's dtype. Differentiable
    w.r.t. y_MH and topk_weights_TK (the router learns through the weights).
    """
    T, K = meta.row_of_TK.shape
    assert T == meta.num_tokens and y_MH.shape[0] == T * K, f"y_MH {tuple(y_MH.shape)} vs T={T}, K={K}"
    assert topk_weights_TK.shape == (T, K), f"topk_weights_TK {tuple(topk_weights_TK.shape)} vs {(T, K)}"
    return UnpermuteCombine.apply(y_MH, meta.row_of_TK, topk_weights_TK, meta.kept_TK)
