"""FP8 training through one handle: what to convert, what runs after backward, what runs after
the optimizer step.

The trainer knows FP8 only through `Fp8Training` (the model-converter pattern of torchtitan): the
model code never branches on FP8, and the trainer never on a recipe.

    fp8 = Fp8Training(cfg.fp8, grad_accum=run.grad_accum, stats_interval=logging.fp8_stats_interval)
    fp8.convert(model)              # on the built model, before parallelism: the swaps below
    fp8.before_step(model, step)    # every stats_interval-th step: the experts count FP8 statistics
    for each micro-batch: its forward and backward
    fp8.after_backward(model)       # delayed scaling: the step's amaxes reduced, next scales set;
                                    # FSDP's FP8 all-gather inputs dropped; statistics stop
    fp8.stats.read(...)             # at log time: per-layer metrics, warnings (moe/fp8/stats.py)
    optimizer.step()
    fp8.after_optimizer_step(model) # FP8 weight copies of the old weights dropped

`FP8Config` (moe/fp8/recipe.py) is the `fp8` group of the trainer's config (configs/fp8/*.yaml).
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from moe.fp8.convert import convert_experts_to_fp8
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.fsdp_all_gather import clear_shard_caches
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.linear_convert import convert_to_float8_training, sync_float8_amax_and_scale_history
from moe.fp8.recipe import FP8Config, Float8LinearRecipe, Fp8Recipe
from moe.fp8.stats import Fp8StatsCollector
from moe.fp8.step_amax import want_step_amax


class Fp8Training:
    """The FP8 side of a training run, from its config.

    grad_accum: micro-batches per optimizer step. With more than one, the FP8 expert weights are
    quantized once per step and shared by the micro-batches (moe/fp8/grouped_mlp.py says what a
    cache costs in memory when nothing shares it). stats_interval: every how many steps the FP8
    experts count their operands' statistics (0: never; moe/fp8/stats.py).
    """

    def __init__(self, cfg: FP8Config, grad_accum: int = 1, stats_interval: int = 0) -> None:
        cfg.validate()
        self.experts_recipe: Optional[Fp8Recipe] = (
            None if cfg.experts == "bf16" else Fp8Recipe(cfg.experts, cfg.pow2_scales, **cfg.expert_knobs())
        )
        self.dense_recipe: Optional[Float8LinearRecipe] = (
            None
            if cfg.dense == "bf16"
            else Float8LinearRecipe(cfg.dense, cfg.dense_grad_dtype, cfg.amax_history_len, cfg.amax_margin,
                                    cfg.pow2_scales)  # fmt: skip
        )
        self.cache_weights = grad_accum > 1
        self.stats = Fp8StatsCollector(stats_interval if self.experts_recipe is not None else 0)

    def convert(self, model: nn.Module) -> nn.Module:
        """Swap the experts (GroupedMLP -> Fp8GroupedMLP) and the dense projections (nn.Linear ->
        Float8Linear) the config asks for, in place: the same Parameter objects, so do it before
        the optimizer and parallelism wrap the model. Rowwise expert weights are marked for the
        optimizer to take their amaxes (moe/fp8/step_amax.py)."""
        if self.experts_recipe is not None:
            convert_experts_to_fp8(model, self.experts_recipe, cache_weights=self.cache_weights)
            if self.experts_recipe.name == "rowwise":  # the optimizer takes their amaxes
                for module in model.modules():
                    if isinstance(module, Fp8GroupedMLP):
                        want_step_amax(module.w1)
                        want_step_amax(module.w2)
        if self.dense_recipe is not None:
            convert_to_float8_training(model, self.dense_recipe)
        return model

    def before_step(self, model: nn.Module, step: int) -> None:
        """Before the first forward of `step` (counted from 1): on every stats_interval-th step the
        FP8 experts count their operands' statistics until `after_backward`."""
        self.stats.attach(model, step)

    def after_backward(self, model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
        """After the step's last backward, before the next forward (and before the loss check: a
        non-finite amax is dropped inside, whether or not the update is then skipped). Delayed
        scaling only: every micro-batch's amaxes (x in forward, dy in backward) are in, reduced
        over `group` (default: the world), so the next step's scales see the whole step, and a
        checkpoint saved after this step holds the scales the next step uses. FSDP's FP8
        all-gather inputs (each rank's quantized shard, moe/fp8/fsdp_all_gather.py) are dropped:
        the step's gathers are done, and they need not live through the optimizer step's peak.
        FP8 statistics stop: evaluation and probes count nothing."""
        if self.dense_recipe is not None and self.dense_recipe.delayed:
            sync_float8_amax_and_scale_history(model, group)
        clear_shard_caches(model)
        self.stats.detach()

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Every FP8 module re-quantizes its weights on next use (moe/fp8/weight_cache.py says why
        the version counter alone is not enough)."""
        for module in model.modules():
            if isinstance(module, (Fp8GroupedMLP, Float8Linear)):
                module.invalidate_weight_cache()
