"""`run.dry_run=true`: build the model on the meta device (nothing allocated, no GPU, no process
group) and report its size, its training FLOPs and its memory plan on `run.dry_run_gpus` GPUs
(0: the world size of this launch) at the configured parallel layout."""

from __future__ import annotations

import os

from moe.counting import count_params, training_flops_per_token
from trainer.config import TrainConfig
from trainer.memory_plan import format_plan, meta_model, plan_memory


def dry_run_gpus(cfg: TrainConfig) -> int:
    """The GPU count the plan is for: run.dry_run_gpus, else torchrun's WORLD_SIZE (1 without it)."""
    return cfg.run.dry_run_gpus or int(os.environ.get("WORLD_SIZE", "1"))


def dry_run(cfg: TrainConfig) -> None:
    num_gpus = dry_run_gpus(cfg)
    # The layout on that many GPUs, checked as a launch of that size would check it.
    cfg.parallel.validate(num_experts=cfg.model.moe.num_experts, world_size=num_gpus)
    model = meta_model(cfg)
    counts = count_params(model)
    flops = training_flops_per_token(model, cfg.run.seq_len)
    print(f"params total={counts.total} active={counts.active}")
    print(f"training FLOPs per token={flops} (seq_len={cfg.run.seq_len}, {flops / 1e9:.2f} GFLOP)")
    for line in format_plan(plan_memory(cfg, num_gpus, model)):
        print(line)
