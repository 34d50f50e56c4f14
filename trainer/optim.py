"""AdamW over fp32 master parameters with linear warm-up and cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Matrices (and the embedding table) decay; norms and 1-D parameters do not, as in LLaMa.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Expert parallelism holds expert weights as DTensors; AdamW's foreach path cannot mix them
    # with plain tensors in one group, so they get a group of their own.
    from torch.distributed.tensor import DTensor

    sharded = [p for p in decay if isinstance(p, DTensor)]
    if sharded:
        groups[0]["params"] = [p for p in decay if not isinstance(p, DTensor)]
        groups.append({"params": sharded, "weight_decay": cfg.weight_decay})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of optim.lr at a step: linear warm-up, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
