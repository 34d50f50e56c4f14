"""`run.dry_run=true`: build the model on the meta device (nothing allocated) and report its size."""

from __future__ import annotations

import torch

from moe.counting import count_params, training_flops_per_token
from moe.model import MoETransformer
from trainer.config import TrainConfig


def dry_run(cfg: TrainConfig) -> None:
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    counts = count_params(model)
    flops = training_flops_per_token(model, cfg.run.seq_len)
    print(f"params total={counts.total} active={counts.active}")
    print(f"training FLOPs per token={flops} (seq_len={cfg.run.seq_len}, {flops / 1e9:.2f} GFLOP)")
