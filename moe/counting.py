"""Parameter counts and training FLOPs per token, read off a built (usually meta) model.

Active parameters are what one token uses: everything except the routed experts it was not sent
to, i.e. each MoE layer contributes top_k / num_experts of its routed-expert weights. The
embedding table counts in both (the published 46.7B / 12.9B of Mixtral do the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.model import MoETransformer


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int  # the lookup table: parameters, but no matmul FLOPs


def count_params(model: MoETransformer) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    inactive = 0
    for layer in model.moe_layers():
        routed = layer.experts.w1.numel() + layer.experts.w2.numel()
        inactive += routed - routed * layer.top_k // layer.num_experts
    return ParamCounts(total, total - inactive, model.tok_embeddings.weight.numel())


def training_flops_per_token(model: MoETransformer, seq_len: int) -> int:
    """6 x active matmul parameters (forward 2, backward 4) plus causal attention scores.

    Attention: QK^T and AV cost 2 * S * D each per head per token in the forward pass; causal
    masking halves that on average, and backward doubles it: 6 * S * N * D per layer.
    """
    counts = count_params(model)
    cfg = model.cfg
    matmul_params = counts.active - counts.embedding
    if cfg.tie_embeddings:
        matmul_params += counts.embedding  # the tied head is a matmul
    attention = 6 * seq_len * cfg.n_heads * cfg.attn_head_dim * cfg.n_layers
    return 6 * matmul_params + attention
