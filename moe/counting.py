"""Parameter counts and training FLOPs per token: ours, read off a built (usually meta) model, and
Megatron-LM's formula, from the config alone.

Active parameters are what one token uses: everything except the routed experts it was not sent
to, i.e. each MoE layer contributes top_k / num_experts of its routed-expert weights. The
embedding table counts in both (the published 46.7B / 12.9B of Mixtral do the same).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
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


def megatron_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token as Megatron-LM counts them: `num_floating_point_operations(args,
    batch_size)` in megatron/training/training.py, its `transformer_flops` branch with GQA
    attention (Megatron-LM core_v0.16.1, the megatron-core release pyproject.toml pins),
    divided by the batch's tokens, for our architecture.

    Every GEMM counts 3 x 2 FLOPs per weight (forward, dgrad, wgrad): per token
      6 * H * (3 * dense_ffn_dim * first_k_dense                 dense first layers (SwiGLU)
               + f * ffn_dim * top_k * moe_layers                 routed experts, f = 3 SwiGLU, 2 GELU
               + 3 * shared_ffn_dim * num_shared * moe_layers)    shared experts (SwiGLU)
      + n_layers * 6 * (H * (Q*D + 2*J*D) + Q*D * H               projections q, k, v and o
                        + Q*D * S)                                QK^T and AV, halved for the causal mask
      + 6 * H * V                                                 the logits
    Megatron gives dense layers and shared experts its one --swiglu factor; ours are SwiGLU
    whatever the routed experts' activation, so they keep 3. V is model.vocab_size: our head is
    not padded (Megatron's padded_vocab_size rounds up to a multiple of 128). Not counted, as in
    Megatron: the router's H x E GEMM, norms, RoPE, softmax and the embedding lookup; ours
    (`training_flops_per_token`) counts the router and the norms' weights, so it is the larger
    by 6 x those parameters per token.
    """
    moe = cfg.moe
    H, D = cfg.dim, cfg.attn_head_dim
    moe_layers = cfg.n_layers - cfg.first_k_dense
    routed_factor = 3 if moe.activation == "swiglu" else 2
    mlp = 6 * H * (
        3 * cfg.dense_ffn_dim * cfg.first_k_dense
        + routed_factor * moe.ffn_dim * moe.top_k * moe_layers
        + 3 * moe.shared_ffn_dim * moe.num_shared_experts * moe_layers
    )
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    attention = cfg.n_layers * 6 * (H * (q + 2 * kv) + q * H + q * seq_len)
    return mlp + attention + 6 * H * cfg.vocab_size
