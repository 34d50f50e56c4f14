"""Typed configuration of the model side: the decoder and its MoE layers.

These dataclasses are also Hydra structured configs (the trainer registers them in its
ConfigStore), so they hold only plain types. `validate()` turns bad user input into a
`ValueError` that names the field and what is allowed; the model calls it before building.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ACTIVATIONS = ("swiglu", "gelu")
SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_IMPLS = ("grouped_mm", "loop")


def require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class MoEConfig:
    """One MoE FFN: router, experts, balancing. Names follow the published model configs."""

    num_experts: int = 8
    top_k: int = 2
    ffn_dim: int = 128  # F: hidden size of one routed expert
    activation: str = "swiglu"  # one of ACTIVATIONS
    # Router.
    score_func: str = "softmax"  # one of SCORE_FUNCS; computed in fp32
    norm_topk_prob: bool = True  # renormalise the k selected weights to sum to 1
    num_groups: int = 1  # DeepSeek group-limited top-k: experts split into this many groups
    topk_groups: int = 1  # ... and tokens pick experts only inside the best this-many groups
    routed_scaling_factor: float = 1.0  # multiplies the final routing weights (DeepSeek-V3: 2.5)
    # Balancing; a coefficient of 0 disables that loss.
    aux_loss_coeff: float = 0.0  # switch-style loss over the micro-batch
    seq_aux_loss_coeff: float = 0.0  # the same loss per sequence (DeepSeek-V3)
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE)
    expert_bias: bool = False  # aux-loss-free balancing: a selection-only bias per expert
    expert_bias_update_rate: float = 1e-3  # bias += rate * sign(mean load - load) per step
    # Token dropping: None is dropless (the default); else capacity = factor * T * A / E (T tokens,
    # A = top_k, E experts).
    capacity_factor: Optional[float] = None
    # Shared experts (DeepSeek / Qwen2-MoE): dense SwiGLU MLPs every token goes through.
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int = 0  # 0 means ffn_dim
    # Experts computation: `grouped_mm` (torch._grouped_mm) or `loop` (per-expert reference,
    # also the only one that runs in float64 for gradcheck).
    expert_impl: str = "grouped_mm"

    def validate(self, prefix: str = "model.moe") -> None:
        require(self.num_experts >= 1, f"{prefix}.num_experts must be >= 1, got {self.num_experts}")
        require(
            1 <= self.top_k <= self.num_experts,
            f"{prefix}.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}",
        )
        require(self.ffn_dim >= 1, f"{prefix}.ffn_dim must be >= 1, got {self.ffn_dim}")
        require(
            self.activation in ACTIVATIONS,
            f"{prefix}.activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )
        require(
            self.score_func in SCORE_FUNCS,
            f"{prefix}.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}",
        )
        require(
            self.expert_impl in EXPERT_IMPLS,
            f"{prefix}.expert_impl must be one of {EXPERT_IMPLS}, got {self.expert_impl!r}",
        )
        require(
            self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
            f"{prefix}.num_groups must divide num_experts={self.num_experts}, got {self.num_groups}",
        )
        require(
            1 <= self.topk_groups <= self.num_groups,
            f"{prefix}.topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}",
        )
        per_group = self.num_experts // self.num_groups
        require(
            self.topk_groups * per_group >= self.top_k,
            f"{prefix}.topk_groups={self.topk_groups} groups of {per_group} experts hold fewer than "
            f"top_k={self.top_k} experts",
        )
        for name in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate"):
            require(getattr(self, name) >= 0, f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        require(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"{prefix}.capacity_factor must be null (dropless) or > 0, got {self.capacity_factor}",
        )
        require(
            self.num_shared_experts >= 0 and self.shared_expert_ffn_dim >= 0,
            f"{prefix}.num_shared_experts and shared_expert_ffn_dim must be >= 0",
        )

    @property
    def shared_ffn_dim(self) -> int:
        return self.shared_expert_ffn_dim or self.ffn_dim


@dataclass
class ModelConfig:
    """LLaMa-style MoE decoder. Defaults are the tiny CPU model."""

    name: str = "tiny"
    vocab_size: int = 4096
    dim: int = 128  # H
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 0  # 0 means dim // n_heads (Qwen3 sets 128 with dim 2048 and 32 heads)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    tie_embeddings: bool = False
    first_k_dense: int = 0  # DeepSeek: the first k layers use a dense FFN
    dense_ffn_dim: int = 512  # hidden size of those dense FFNs
    init_std: float = 0.02
    # The output head's cross-entropy this many rows at a time when the micro-batch has more rows,
    # so that its fp32 logits never exist whole (moe/loss.py); 0 computes them all at once.
    loss_chunk_rows: int = 4096
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            require(getattr(self, name) >= 1, f"{prefix}.{name} must be >= 1, got {getattr(self, name)}")
        require(self.loss_chunk_rows >= 0,
                f"{prefix}.loss_chunk_rows must be >= 0 (0: the whole micro-batch at once), got {self.loss_chunk_rows}")
        require(
            self.head_dim > 0 or self.dim % self.n_heads == 0,
            f"{prefix}.dim={self.dim} must be divisible by {prefix}.n_heads={self.n_heads} "
            f"(or set {prefix}.head_dim explicitly)",
        )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"{prefix}.n_heads={self.n_heads} must be a multiple of {prefix}.n_kv_heads={self.n_kv_heads}",
        )
        require(
            self.attn_head_dim % 2 == 0,
            f"{prefix}.head_dim must be even for RoPE, got {self.attn_head_dim}",
        )
        require(
            0 <= self.first_k_dense <= self.n_layers,
            f"{prefix}.first_k_dense must be in [0, n_layers={self.n_layers}], got {self.first_k_dense}",
        )
        require(
            self.first_k_dense == 0 or self.dense_ffn_dim >= 1,
            f"{prefix}.dense_ffn_dim must be >= 1 when first_k_dense > 0",
        )
        self.moe.validate(f"{prefix}.moe")
