"""One MoE FFN layer: route -> permute -> dispatch -> experts -> combine -> unpermute (+ shared).

Shape letters (README.md): B batch, S sequence, T = B*S tokens, A experts a token is routed to,
E experts, M = T*A routed rows, H hidden.

The dispatcher decides what the experts get (moe/dispatch.py): with every expert local (EP=1) the
tokens and their permutation, with expert parallelism the rows that arrived from other ranks.
The layer itself does not branch on either, nor on FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe.config import MoEConfig
from moe.dispatch import Dispatcher, LocalDispatcher
from moe.experts import DenseMLP, GroupedMLP
from moe.permute import plan_permute, unpermute
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
        # Expert parallelism replaces this (trainer/parallel.py); EP=1 moves nothing.
        self.dispatcher: Dispatcher = LocalDispatcher()

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.router.reset_parameters(init_std)
        self.experts.reset_parameters(init_std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std, out_std)

    def forward(self, x_BSH: torch.Tensor) -> MoEOutput:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)

        route = self.router(x_TH, seq_len=S)
        perm = plan_permute(route.topk_ids_TA, self.num_experts)
        expert_input, handle = self.dispatcher.dispatch(x_TH, perm, route.tokens_per_expert_E)
        y_MH = self.dispatcher.combine(self.experts(expert_input), handle)
        out_TH = unpermute(y_MH, perm, route.topk_weights_TA)

        if self.shared_experts is not None:
            out_TH = out_TH + self.shared_experts(x_TH)
        return MoEOutput(out_TH.view(B, S, H), route.aux_losses, route.tokens_per_expert_E)
