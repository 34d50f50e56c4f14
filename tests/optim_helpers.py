"""A tiny model and fixed gradients for the optimizer tests (test_optim_fused, test_optim_bf16)."""

import torch

from moe.config import ModelConfig, MoEConfig
from moe.model import build_model


def tiny_model():
    """Two layers (one dense, one MoE), every kind of parameter group; the same weights each call."""
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=24), first_k_dense=1)  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def set_grads(model, step: int) -> None:
    """Gradients of every magnitude from 1e-6 to 10, some parameters' exactly zero; the same at
    every call with the same step."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        scale = 10.0 ** torch.randint(-6, 2, (), generator=gen).item()
        p.grad = (torch.randn(p.shape, generator=gen) * scale * (i % 7 != 3)).to(p.dtype)


def take_steps(model, opt, first: int, last: int) -> None:
    for step in range(first, last):
        set_grads(model, step)
        opt.step()
