"""One MoE FFN layer: route -> permute -> dispatch -> experts -> combine -> unpermute (+ shared).

Legend: B batch, S sequence, T = B*S tokens, K top-k, E experts, M = T*K routed rows, H hidden.

When no rows travel (EP=1, `LocalDispatcher.moves_rows` false) the experts get the tokens and the
permutation rather than permuted rows: the FP8 experts gather the rows inside their quantization
(permute + quantize in one pass), the BF16 ones gather them first. With expert parallelism the
rows are gathered here, in the experts' compute dtype, and sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.config import MoEConfig
from moe.dispatch import LocalDispatcher
from moe.experts import DenseMLP, GroupedMLP, compute_dtype
from moe.permute import gather_rows, plan_permute, unpermute
from moe.router import Router


@dataclass(frozen=True)
class MoEOutput:
    out_BSH: torch.Tensor
    aux_losses: dict[str, torch.Tensor]  # already weighted by their coefficients
    tokens_per_expert_E: torch.Tensor  # int64, detached: for load logging


class MoELayer(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = Router(dim, cfg)
        self.experts = GroupedMLP(dim, cfg.ffn_dim, cfg.num_experts, cfg.activation, cfg.expert_impl)
        self.shared_experts = (
            DenseMLP(dim, cfg.shared_ffn_dim * cfg.num_shared_experts)
            if cfg.num_shared_experts > 0
            else None
        )
        # Expert parallelism replaces this (trainer/parallel); EP=1 moves nothing.
        self.dispatcher = LocalDispatcher()

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.router.reset_parameters(init_std)
        self.experts.reset_parameters(init_std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std, out_std)

    def forward(self, x_BSH: torch.Tensor) -> MoEOutput:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)

        route = self.router(x_TH, seq_len=S)
        tokens_per_expert_E, perm = plan_permute(route.topk_ids_TK, self.num_experts)
        if self.dispatcher.moves_rows:
            x_MH = gather_rows(x_TH, perm, compute_dtype(x_TH))
            x_MH, local_tokens_per_expert, dispatch = self.dispatcher.dispatch(x_MH, tokens_per_expert_E)
            y_MH = self.experts(x_MH, local_tokens_per_expert, x_fp8=dispatch.x_fp8)
            y_MH = self.dispatcher.combine(y_MH, dispatch)
        else:
            y_MH = self.experts(x_TH, tokens_per_expert_E, token_rows=perm)
        out_TH = unpermute(y_MH, perm, route.topk_weights_TK)

        if self.shared_experts is not None:
            out_TH = out_TH + self.shared_experts(x_TH)
        return MoEOutput(out_TH.view(B, S, H), route.aux_losses, route.tokens_per_expert_E)
