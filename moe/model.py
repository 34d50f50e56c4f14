"""LLaMa-style MoE decoder: embedding -> N x [RMSNorm -> attention -> RMSNorm -> FFN] -> norm -> head.

Shape letters (README.md): B batch, S sequence, H hidden (dim), V vocab, Q query heads, J key/value
heads, D head dim, Y MoE layers, E experts.
The file holds architecture only: parallelism, FP8 conversion and compilation are applied to a
built model from outside (trainer/, moe/fp8/); the fused norm and RoPE kernels are in kernels/
(rmsnorm.py, rope.py), the loss in moe/loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.rmsnorm import add_rms_norm, rms_norm
from kernels.rope import rope_qk
from moe.config import ModelConfig, require
from moe.experts import DenseMLP, scaled_out_std
from moe.kv_cache import KVCache, causal_sdpa_args
from moe.layer import MoELayer
from moe.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rmsnorm(x) * weight in x's dtype (fp32 statistics: kernels/reference_norm.py); with
        `residual`, (rmsnorm(x + residual) * weight, x + residual) from one pass over the rows."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, D/2) in fp32 for rotary embeddings (rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SD = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles_SD.cos(), angles_SD.sin()


class Attention(nn.Module):
    """Causal grouped-query attention through `F.scaled_dot_product_attention`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def forward(
        self, x_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Attention of S positions; with `cache`, they follow the cache's positions, whose keys and
        values they attend to too, and theirs are added to it (generation: moe/generate.py)."""
        B, S, _ = x_BSH.shape
        q = self.wq(x_BSH).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x_BSH).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSH).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:  # rotate by the angles of the absolute positions
            cos_SD, sin_SD = cos_SD[cache.pos : cache.pos + S], sin_SD[cache.pos : cache.pos + S]
        q, k = rope_qk(q, k, cos_SD, sin_SD)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, Q|J, S, D)
        mask = {"is_causal": True}
        if cache is not None:
            k, v = cache.append(k, v)
            mask = causal_sdpa_args(S, k.shape[2], k.device)
        # K and V keep their J heads: torch's flash kernel (bf16 on Hopper) reads each K/V head for
        # its Q/J query heads itself since torch 2.5, as do cuDNN's and the CPU flash kernel;
        # only the math fallback repeats them (sdp_utils.cpp, can_use_flash_attention).
        o = F.scaled_dot_product_attention(q, k, v, **mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense
        self.ffn = MoELayer(cfg.dim, cfg.moe) if self.is_moe else DenseMLP(cfg.dim, cfg.dense_ffn_dim)

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attn.reset_parameters(init_std, out_std)
        self.ffn.reset_parameters(init_std, out_std)

    def forward(self, x_BSH, cos_SD, sin_SD, cache: KVCache | None = None):
        # The attention's residual add is fused with the FFN norm. The FFN's stays a plain add:
        # fusing it into the next block's norm would make blocks pass (x, residual) pairs, which
        # activation checkpointing would keep both of (+50% of what it keeps per block).
        a_BSH = self.attn(self.attn_norm(x_BSH), cos_SD, sin_SD, cache)
        h_BSH, x_BSH = self.ffn_norm(x_BSH, a_BSH)
        if self.is_moe:
            moe = self.ffn(h_BSH)
            return x_BSH + moe.out_BSH, moe.aux_losses, moe.tokens_per_expert_E
        return x_BSH + self.ffn(h_BSH), {}, None


@dataclass(frozen=True)
class ModelOutput:
    loss: torch.Tensor | None  # mean cross-entropy over labelled tokens (None without labels)
    logits: torch.Tensor | None  # (B, S, V), returned only without labels
    aux_loss: torch.Tensor  # sum of all router balancing losses (already weighted)
    aux_losses: dict[str, torch.Tensor]  # per kind, summed over layers (for logging)
    tokens_per_expert_YE: torch.Tensor | None  # (MoE layers, E) routed counts, detached
    # Per kind, each MoE layer's loss (already weighted), (Y,) fp32, detached: per-layer metrics.
    layer_aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.attn_head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not saved in checkpoints: derived from the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; call after `to_empty` on a meta-built model."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            # `to_empty` materialises each parameter separately, which unties them: tie again.
            self.output.weight = self.tok_embeddings.weight
        out_std = scaled_out_std(cfg.init_std, cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        for block in self.layers:
            block.reset_parameters(cfg.init_std, out_std)
        self.norm.reset_parameters()
        if not cfg.tie_embeddings:
            # 1/sqrt(H) keeps initial logits O(1) whatever the width.
            nn.init.normal_(self.output.weight, std=cfg.dim**-0.5)
        cos, sin = rope_tables(cfg.attn_head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe]

    def forward(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None) -> ModelOutput:
        S = tokens_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x_BSH = self.tok_embeddings(tokens_BS)
        aux_losses: dict[str, torch.Tensor] = {}
        counts, per_layer = [], []
        for block in self.layers:
            x_BSH, layer_aux, tokens_per_expert_E = block(x_BSH, self.rope_cos, self.rope_sin)
            for name, value in layer_aux.items():
                aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
            if tokens_per_expert_E is not None:
                counts.append(tokens_per_expert_E)
                per_layer.append(layer_aux)
        h_BSH = self.norm(x_BSH)
        aux_loss = sum(aux_losses.values(), torch.zeros((), device=x_BSH.device))
        counts_YE = torch.stack(counts) if counts else None
        layer_aux = {name: torch.stack([d[name].detach().float() for d in per_layer]) for name in aux_losses}
        if labels_BS is None:
            return ModelOutput(None, self.output(h_BSH), aux_loss, aux_losses, counts_YE, layer_aux)
        loss = linear_cross_entropy(h_BSH.flatten(0, 1), self.output, labels_BS.flatten(), self.cfg.loss_chunk_rows)
        return ModelOutput(loss, None, aux_loss, aux_losses, counts_YE, layer_aux)

    def new_kv_caches(self, max_len: int) -> list[KVCache]:
        """One empty cache per layer, for `forward_cached` over up to `max_len` positions."""
        limit = self.cfg.max_seq_len
        require(1 <= max_len <= limit,
                f"a KV cache of {max_len} positions: need 1 <= positions <= model.max_seq_len={limit}")
        return [KVCache(max_len) for _ in self.layers]

    def forward_cached(self, tokens_BS: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """(B, V) logits of the last of S tokens that continue the positions `caches` hold (0 for
        empty ones: the prompt), which take the tokens' keys and values. Equal to `forward`'s
        logits at that position over the whole sequence: routing is per token, so the model must
        be dropless (a capacity limit would drop tokens depending on what else is in the batch)."""
        require(self.cfg.moe.capacity_factor is None,
                f"model.moe.capacity_factor={self.cfg.moe.capacity_factor}: cached decoding needs dropless "
                f"routing (capacity_factor=null), else a token's experts depend on the other tokens")  # fmt: skip
        require(len(caches) == len(self.layers), f"{len(caches)} KV caches for {len(self.layers)} layers")
        S, pos = tokens_BS.shape[1], caches[0].pos
        require(pos + S <= self.cfg.max_seq_len,
                f"positions {pos}..{pos + S - 1} exceed model.max_seq_len={self.cfg.max_seq_len}")
        x_BSH = self.tok_embeddings(tokens_BS)
        for block, cache in zip(self.layers, caches):
            x_BSH, _, _ = block(x_BSH, self.rope_cos, self.rope_sin, cache)
        return self.output(self.norm(x_BSH[:, -1]))


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> MoETransformer:
    """Build on the meta device (no memory), then materialise on `device` and initialise."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model
