"""Router: score the experts for every token, pick the top-k, and compute the balancing losses.

Shape letters (README.md): T tokens (B sequences of S tokens, flattened batch-major: t = b*S + s),
E experts, A experts a token is routed to (top-k), H hidden, G expert groups, I = E // G experts
per group.

The choices follow megatron-core's TopKRouter (checked against its functions in
tests/test_router.py), with these deliberate differences:
- group-limited top-k for softmax ranks groups by probabilities; megatron's default softmax path
  (top-k before the softmax) ranks them by logits. A group's score is, as in megatron, the sum of
  its best A // topk_groups scores (DeepSeek-V3: top-2 of each of 8 groups), but at least 1.
- norm_topk_prob renormalises also when A = 1 (the weight is then 1); megatron's sigmoid path
  skips A = 1.
- the expert bias also works with softmax scores (megatron applies it to sigmoid only).
- the losses are returned whenever their coefficient is > 0 (also in eval, for logging);
  megatron computes them only while training with gradients enabled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.config import MoEConfig

# Guards the division of sigmoid scores by their sum; megatron and DeepSeek-V3 use the same.
_NORM_EPS = 1e-20


@dataclass(frozen=True)
class RouterOutput:
    topk_ids_TA: Tensor  # int64 (T, A); a dropped assignment (capacity) holds E
    topk_weights_TA: Tensor  # fp32 (T, A); 0 where dropped; scaled; differentiable w.r.t. weight
    tokens_per_expert_E: Tensor  # int64 (E,), kept assignments per expert, detached
    aux_losses: dict[str, Tensor]  # fp32 scalars already times their coefficient, coeff > 0 only


def count_tokens_per_expert(topk_ids_TA: Tensor, num_experts: int) -> Tensor:
    """int64 (E,) count of the assignments to each expert; dropped ids (== E) are not counted.

    A scatter-add into E + 1 bins rather than `torch.bincount`: bincount sizes its output from
    the data's maximum, which costs a host synchronisation on a GPU.
    """
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids_TA.device)
    ids_M = topk_ids_TA.reshape(-1)
    counts_E1.scatter_add_(0, ids_M, torch.ones_like(ids_M, dtype=torch.int64))
    return counts_E1[:num_experts]


class _GateLogits(torch.autograd.Function):
    """logits_TE = x_TH @ weight_EH.T computed in fp32 (fp64 when an input is fp64).

    The one GEMM of each direction runs on upcast copies: forward x32 @ W32.T, backward
    grad_x = grad @ W32 and grad_W = grad.T @ x32, cast back to each input's dtype. Unlike
    autograd on `x.float() @ w.float().t()` this saves x in its own dtype: the fp32 copy would
    hold 1 GiB per layer until backward at T = 65536, H = 4096. Autocast is turned off inside so
    an enclosing bf16 autocast cannot bring the logits back to bf16.
    """

    @staticmethod
    def forward(ctx, x_TH: Tensor, weight_EH: Tensor) -> Tensor:
        ctx.save_for_backward(x_TH, weight_EH)
        acc = torch.promote_types(torch.promote_types(torch.float32, x_TH.dtype), weight_EH.dtype)
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            return x_TH.to(acc) @ weight_EH.to(acc).t()

    @staticmethod
    def backward(ctx, grad_TE: Tensor):
        x_TH, weight_EH = ctx.saved_tensors
        grad_x_TH = grad_weight_EH = None
        with torch.autocast(device_type=grad_TE.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x_TH = (grad_TE @ weight_EH.to(grad_TE.dtype)).to(x_TH.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight_EH = (grad_TE.t() @ x_TH.to(grad_TE.dtype)).to(weight_EH.dtype)
        return grad_x_TH, grad_weight_EH


def _switch_loss(prob_sum_XE: Tensor, count_XE: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """Switch-Transformer balance loss E * sum_e f_e * P_e for each row X (a batch or a sequence).

    f_e = count_e / (num_tokens * A) is the fraction of assignments, P_e = prob_sum_e / num_tokens
    the mean probability; a perfectly balanced router scores 1.
    """
    E = prob_sum_XE.shape[-1]
    return (prob_sum_XE * count_XE).sum(-1) * (E / (top_k * num_tokens * num_tokens))


class Router(nn.Module):
    """Linear gate (like nn.Linear(H, E, bias=False)) + top-k selection + balancing losses."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        if cfg.expert_bias:
            # Persistent: a resumed run must keep its balance. fp32 always: updates of 1e-3 on a
            # bf16 bias of magnitude 0.5 would round away (bf16's spacing there is 2**-8).
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            # Kept assignments per expert since the last `update_expert_bias`. Under data
            # parallelism, sum it across ranks (all-reduce) before calling the update.
            self.register_buffer(
                "load_since_update", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False
            )
        else:
            self.register_buffer("expert_bias", None)
            self.register_buffer("load_since_update", None)
        # Logits of unit scale until the model calls reset_parameters with its own init_std.
        self.reset_parameters(init_std=dim**-0.5)

    def reset_parameters(self, init_std: float) -> None:
        """Normal(0, init_std) weight; zero bias and load (also needed after `to_empty()` from meta)."""
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()
                self.load_since_update.zero_()

    def forward(self, x_TH: Tensor, seq_len: int) -> RouterOutput:
        T = x_TH.shape[0]
        if seq_len < 1 or T % seq_len != 0:
            raise ValueError(
                f"seq_len must be >= 1 and divide the number of tokens x_TH.shape[0]={T} "
                f"(the flattened batch x sequence), got seq_len={seq_len}"
            )
        cfg = self.cfg
        logits_TE = _GateLogits.apply(x_TH, self.weight)
        if cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:  # "sigmoid", the only other value MoEConfig.validate allows
            scores_TE = torch.sigmoid(logits_TE)

        topk_ids_TA = self._select(scores_TE.detach())
        topk_weights_TA = self._weights(logits_TE, scores_TE, topk_ids_TA)
        if cfg.capacity_factor is not None:
            topk_ids_TA, topk_weights_TA = self._drop_over_capacity(topk_ids_TA, topk_weights_TA)
        tokens_per_expert_E = count_tokens_per_expert(topk_ids_TA, cfg.num_experts)

        # Only training steps count towards the bias update: not eval, not no_grad passes. A
        # recomputation (activation checkpointing) counts a layer twice, which leaves
        # sign(mean - load) unchanged.
        if self.expert_bias is not None and self.training and torch.is_grad_enabled():
            self.load_since_update += tokens_per_expert_E
        return RouterOutput(
            topk_ids_TA=topk_ids_TA,
            topk_weights_TA=topk_weights_TA,
            tokens_per_expert_E=tokens_per_expert_E,
            aux_losses=self._aux_losses(logits_TE, scores_TE, seq_len),
        )

    def _select(self, scores_TE: Tensor) -> Tensor:
        """Top-k expert ids, sorted by score; the bias and the group limit change only this choice."""
        cfg = self.cfg
        select_TE = scores_TE
        if self.expert_bias is not None:
            select_TE = scores_TE + self.expert_bias.to(scores_TE.dtype)
        if cfg.topk_groups < cfg.num_groups:
            T, G = select_TE.shape[0], cfg.num_groups
            select_TGI = select_TE.view(T, G, cfg.num_experts // G)
            best_per_group = max(1, cfg.top_k // cfg.topk_groups)
            group_score_TG = select_TGI.topk(best_per_group, dim=-1).values.sum(-1)
            best_groups_TG = group_score_TG.topk(cfg.topk_groups, dim=-1, sorted=False).indices
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
            select_TE = select_TGI.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)
        return select_TE.topk(cfg.top_k, dim=-1).indices

    def _weights(self, logits_TE: Tensor, scores_TE: Tensor, topk_ids_TA: Tensor) -> Tensor:
        """Combine weights of the selected experts, from the unbiased scores."""
        cfg = self.cfg
        if cfg.score_func == "softmax" and cfg.norm_topk_prob:
            # A softmax over the k selected logits: the renormalised probabilities, one op.
            weights_TA = torch.softmax(logits_TE.gather(1, topk_ids_TA), dim=-1)
        else:
            weights_TA = scores_TE.gather(1, topk_ids_TA)
            if cfg.norm_topk_prob:  # sigmoid, as DeepSeek-V3
                weights_TA = weights_TA / (weights_TA.sum(-1, keepdim=True) + _NORM_EPS)
        return weights_TA * cfg.routed_scaling_factor

    def _drop_over_capacity(self, topk_ids_TA: Tensor, topk_weights_TA: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert keeps its `capacity` highest-weight assignments; the rest become id E, weight 0.

        By weight, as megatron's default drop policy ("probs"); capacity as megatron's
        get_capacity: ceil(T * A / E * capacity_factor). T is static, so no host sync here either.
        """
        cfg = self.cfg
        T, E = topk_ids_TA.shape[0], cfg.num_experts
        capacity = math.ceil((T * cfg.top_k / E) * cfg.capacity_factor)
        if capacity >= T:  # an expert appears at most once per token: nothing to drop
            return topk_ids_TA, topk_weights_TA
        # -1 marks "not routed here": weights are >= 0, so every routed assignment ranks above.
        weight_TE = torch.full((T, E), -1.0, dtype=topk_weights_TA.dtype, device=topk_ids_TA.device)
        weight_TE.scatter_(1, topk_ids_TA, topk_weights_TA.detach())
        top_rows_CE = weight_TE.topk(capacity, dim=0, sorted=False).indices
        within_TE = torch.zeros_like(weight_TE, dtype=torch.bool).scatter_(0, top_rows_CE, True)
        kept_TA = within_TE.gather(1, topk_ids_TA)
        return (
            torch.where(kept_TA, topk_ids_TA, E),
            torch.where(kept_TA, topk_weights_TA, 0.0),
        )

    def _aux_losses(self, logits_TE: Tensor, scores_TE: Tensor, seq_len: int) -> dict[str, Tensor]:
        cfg = self.cfg
        T, E, A = logits_TE.shape[0], cfg.num_experts, cfg.top_k
        losses: dict[str, Tensor] = {}
        if cfg.aux_loss_coeff > 0 or cfg.seq_aux_loss_coeff > 0:
            # As megatron and DeepSeek-V3: the balance losses see the plain top-k of the scores
            # (no bias, no group limit, no dropping), sigmoid scores normalised over all experts.
            probs_TE = scores_TE
            if cfg.score_func == "sigmoid":
                probs_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + _NORM_EPS)
            routed_TE = torch.zeros_like(probs_TE).scatter_(1, probs_TE.detach().topk(A, dim=-1).indices, 1.0)
            if cfg.aux_loss_coeff > 0:
                loss = _switch_loss(probs_TE.sum(0), routed_TE.sum(0), T, A)
                losses["aux_loss"] = loss * cfg.aux_loss_coeff
            if cfg.seq_aux_loss_coeff > 0:
                B = T // seq_len
                prob_sum_BE = probs_TE.view(B, seq_len, E).sum(1)
                count_BE = routed_TE.view(B, seq_len, E).sum(1)
                loss = _switch_loss(prob_sum_BE, count_BE, seq_len, A).mean()
                losses["seq_aux_loss"] = loss * cfg.seq_aux_loss_coeff
        if cfg.z_loss_coeff > 0:
            # ST-MoE z-loss: keeps the logits small, so the softmax stays in fp32's comfortable range.
            losses["z_loss"] = torch.logsumexp(logits_TE, dim=-1).square().mean() * cfg.z_loss_coeff
        return losses

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step: bias += rate * sign(mean load - load), then reset the load.

        Call once per optimizer step, after the load was summed across data-parallel ranks.
        """
        if self.expert_bias is None:
            return
        if self.expert_bias.dtype != torch.float32:
            # A blanket model.to(bf16) casts floating buffers too; the bias must stay fp32.
            self.expert_bias = self.expert_bias.float()
        load_E = self.load_since_update.to(torch.float32)
        self.expert_bias.add_(torch.sign(load_E.mean() - load_E), alpha=self.cfg.expert_bias_update_rate)
        self.load_since_update.zero_()
