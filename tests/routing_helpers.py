"""Test helpers for routed rows: random routing and the one-call permutation the tests compare with.

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), E experts, H hidden,
M = T*A routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.permute import PermuteMeta, gather_rows, plan_permute
from moe.router import count_tokens_per_expert


def random_routing(T: int, A: int, E: int, seed: int, drop_frac: float = 0.0) -> Tensor:
    """topk_ids_TA: A distinct experts per token; a share `drop_frac` of them dropped (id E)."""
    g = torch.Generator().manual_seed(seed)
    ids_TA = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    if drop_frac > 0:
        ids_TA = torch.where(torch.rand(T, A, generator=g) < drop_frac, E, ids_TA)
    return ids_TA


def permute(
    x_TH: Tensor, topk_ids_TA: Tensor, num_experts: int, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, PermuteMeta]:
    """(x_MH, tokens_per_expert_E, meta): plan_permute then gather_rows, as the MoE layer does them."""
    meta = plan_permute(topk_ids_TA, num_experts)
    return gather_rows(x_TH, meta, dtype), count_tokens_per_expert(topk_ids_TA, num_experts), meta
