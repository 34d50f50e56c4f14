"""Per-layer metrics of a log window: the MoE layers' routing and, when logging.fp8_stats_interval
is on, the FP8 experts' operand statistics (moe/fp8/stats.py). i in every key is the block's index
in model.layers (as in sqnr/L{i}); each value covers the window's steps, over all ranks.

    moe/layer{i}/aux_loss, seq_aux_loss, z_loss   each balancing loss the config turns on, as it
                                                  enters the loss (times its coefficient), the
                                                  mean over the window's steps and the ranks
    moe/layer{i}/load_max_over_mean               the busiest expert's assignments over the mean
    moe/layer{i}/load_p95_over_mean               the 95th percentile of the experts' assignments
                                                  (linear interpolation) over the mean
    moe/layer{i}/dropped                          the share of the routed assignments a capacity
                                                  limit dropped (model.moe.capacity_factor set)
    moe/layer{i}/expert_bias_norm                 the L2 norm of the router's expert bias at log
                                                  time (model.moe.expert_bias=true)
    fp8/layer{i}/{operand}/amax|underflow|saturation   moe/fp8/stats.py

Shape letters (README.md): Y MoE layers, E experts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from trainer.parallel import all_reduce_

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("fp8moe")

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def moe_layer_metrics(
    layer_ids: list[int], counts_YE: torch.Tensor, aux_sums_Y: dict[str, torch.Tensor], steps: int,
    assignments: int | None, expert_bias_E: list[torch.Tensor] | None,
) -> dict[str, float]:  # fmt: skip
    """The moe/ keys (module docstring) from the window's data, already summed over ranks:
    counts_YE the kept assignments per expert, summed over the window's steps; aux_sums_Y per
    kind the sum over the steps of each layer's loss (a mean over ranks); assignments the routed
    assignments of the window's tokens, T x A over every rank (None: no capacity limit, nothing
    dropped); expert_bias_E each MoE layer's router bias (None: no bias). One read to the host."""
    load_YE = counts_YE.double()
    mean_Y = load_YE.mean(dim=1).clamp_min(1e-9)
    names = ["load_max_over_mean", "load_p95_over_mean"]
    columns = [load_YE.amax(dim=1) / mean_Y, torch.quantile(load_YE, 0.95, dim=1) / mean_Y]
    if assignments:
        names.append("dropped")
        columns.append(1.0 - load_YE.sum(dim=1) / assignments)
    for name, sum_Y in aux_sums_Y.items():
        names.append(name)
        columns.append(sum_Y.to(load_YE.device, torch.float64) / max(steps, 1))
    if expert_bias_E is not None:
        names.append("expert_bias_norm")
        columns.append(torch.stack([b.detach().double().norm().to(load_YE.device) for b in expert_bias_E]))
    table = torch.stack(columns, dim=1).tolist()
    return {f"moe/layer{i}/{name}": value for i, row in zip(layer_ids, table) for name, value in zip(names, row)}


def layer_metrics(trainer: Trainer, counts_YE: torch.Tensor | None, aux_sums_Y: dict[str, torch.Tensor],
                  steps: int, tokens: int) -> dict[str, float]:  # fmt: skip
    """Every per-layer key of a window (module docstring). counts_YE: summed over ranks already;
    aux_sums_Y: this rank's, averaged over ranks here; tokens: the window's tokens on every rank.
    Every rank calls it (collectives); only the logging rank logs the FP8 warnings."""
    env, model, lg = trainer.env, trainer.model, trainer.cfg.logging
    record: dict[str, float] = {}
    if counts_YE is not None:
        aux = {name: all_reduce_(v.clone(), env) / env.world_size for name, v in aux_sums_Y.items()}
        moe = trainer.cfg.model.moe
        layers = model.moe_layers()
        biases = [layer.router.expert_bias for layer in layers]
        record |= moe_layer_metrics(
            [i for i, block in enumerate(model.layers) if block.is_moe], counts_YE, aux, steps,
            tokens * moe.top_k if moe.capacity_factor is not None else None,
            biases if all(b is not None for b in biases) else None,
        )  # fmt: skip
    metrics, warnings = trainer.fp8.stats.read(
        lambda t, op: all_reduce_(t, env, _REDUCE_OPS[op]), lg.fp8_saturation_warn, lg.fp8_underflow_warn
    )
    if env.is_main:
        for message in warnings:
            log.warning("step %d: %s", trainer.step, message)
    return record | metrics
