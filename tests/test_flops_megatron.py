"""moe.counting.megatron_flops_per_token: Megatron-LM's FLOP formula, against a hand count and
against our own count (which differs by the router and the norms' weights only)."""

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.counting import megatron_flops_per_token, training_flops_per_token
from moe.model import MoETransformer


def _cfg(activation: str = "swiglu", tie: bool = False) -> ModelConfig:
    return ModelConfig(
        vocab_size=1000, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, first_k_dense=1, dense_ffn_dim=96,
        tie_embeddings=tie, qk_norm=True,
        moe=MoEConfig(num_experts=8, top_k=2, ffn_dim=32, activation=activation, num_shared_experts=1),
    )  # fmt: skip


def test_hand_count():
    # Per token, seq_len 128, head dim 64 / 4 = 16: q = 4 * 16 = 64, k = v = 2 * 16 = 32.
    dense = 6 * 64 * (3 * 96) * 1  # one dense SwiGLU layer: 110,592
    routed = 6 * 64 * (3 * 32 * 2) * 2  # top-2 of ffn 32, two MoE layers: 147,456
    shared = 6 * 64 * (3 * 32 * 1) * 2  # one shared expert of ffn 32: 73,728
    attention = 3 * 6 * (64 * (64 + 2 * 32) + 64 * 64 + 64 * 128)  # three layers: 368,640
    logits = 6 * 64 * 1000  # 384,000
    assert dense + routed + shared + attention + logits == 1_084_416
    assert megatron_flops_per_token(_cfg(), 128) == 1_084_416
    # GELU experts: two weight matrices' worth (w1 is F x H), the dense and shared MLPs stay SwiGLU.
    assert megatron_flops_per_token(_cfg("gelu"), 128) == 1_084_416 - 6 * 64 * 32 * 2 * 2
    # The sequence enters through the causal attention term only: 6 * q per layer per extra position.
    assert megatron_flops_per_token(_cfg(), 256) - megatron_flops_per_token(_cfg(), 128) == 3 * 6 * 64 * 128


@pytest.mark.parametrize("tie", [False, True])
def test_ours_exceeds_megatron_by_router_and_norms(tie):
    cfg = _cfg(tie=tie)
    with torch.device("meta"):
        model = MoETransformer(cfg)
    router = sum(layer.router.weight.numel() for layer in model.moe_layers())
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert router == 2 * 8 * 64 and norms == 3 * (2 * 64 + 2 * 16) + 64
    diff = training_flops_per_token(model, 128) - megatron_flops_per_token(cfg, 128)
    assert diff == 6 * (router + norms)
