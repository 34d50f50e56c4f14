"""Swap a model's nn.Linear layers for Float8Linear (and back), and the delayed-scaling sync.

The swap moves the same Parameter objects over, so optimizer state, weight tying and checkpoints
keep working; the model code never branches on FP8. Convert before wrapping for parallelism.

Skipped by default: the output head (`output`: the logits feed a softmax over the vocabulary,
the layer most sensitive to FP8 error, and its width need not suit FP8 GEMMs) and any Linear
whose in/out features are not multiples of 16 (torch._scaled_mm's alignment, see
moe/fp8/float8_linear.py); the latter are named in a warning on the "fp8moe" logger, since they
stay in high precision. A custom filter that picks such a Linear gets a ValueError naming it.
The router is not an nn.Linear (it owns its gate weight), so it is never swapped.

Shape letters (README.md): O operands with delayed scales (x, dy), L amax-history length.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.fp8.float8_linear import Float8Linear, float8_dims_problem
from moe.fp8.recipe import Float8LinearRecipe

log = logging.getLogger("fp8moe")

ModuleFilter = Callable[[nn.Module, str], bool]  # (module, fully qualified name) -> convert?

_SKIPPED_NAMES = ("output",)


def default_module_filter(module: nn.Module, fqn: str) -> bool:
    if fqn.rsplit(".", 1)[-1] in _SKIPPED_NAMES:
        return False
    return float8_dims_problem(module.in_features, module.out_features) is None


def _swap_children(model: nn.Module, should_swap: Callable[[nn.Module, str], bool], make) -> int:
    swapped = 0
    for parent_fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            fqn = f"{parent_fqn}.{name}" if parent_fqn else name
            if should_swap(child, fqn):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def convert_to_float8_training(
    model: nn.Module, recipe: Float8LinearRecipe | str, module_filter_fn: Optional[ModuleFilter] = None
) -> nn.Module:
    """Replace every nn.Linear passing `module_filter_fn` (default: `default_module_filter`) with a
    Float8Linear sharing its parameters; returns `model` (swapped in place).

    The default filter leaves Linears whose widths FP8 GEMMs cannot take in high precision and
    logs a warning naming them; a custom filter choosing one raises ValueError (nothing swapped)."""
    if isinstance(recipe, str):
        recipe = Float8LinearRecipe(recipe)
    keep = module_filter_fn or default_module_filter
    if type(model) is nn.Linear:
        linears = [("", model)]
    else:  # exact type: never re-wrap a Float8Linear
        linears = [(fqn, m) for fqn, m in model.named_modules() if type(m) is nn.Linear]
    chosen, unaligned = set(), []
    for fqn, m in linears:
        problem = float8_dims_problem(m.in_features, m.out_features)
        if keep(m, fqn):
            if problem is not None:  # only a custom filter gets here: the default checks widths
                raise ValueError(f"convert_to_float8_training: the filter chose {fqn or 'the model'!r}, "
                                 f"which cannot be a Float8Linear: {problem}")  # fmt: skip
            chosen.add(id(m))
        elif problem is not None and fqn.rsplit(".", 1)[-1] not in _SKIPPED_NAMES:
            unaligned.append(f"{fqn or '<model>'} ({m.in_features} -> {m.out_features})")
    if unaligned and module_filter_fn is None:
        log.warning(
            "convert_to_float8_training: %d nn.Linear layer(s) stay in high precision, their in/out "
            "features are not multiples of 16 (torch._scaled_mm's FP8 alignment): %s",
            len(unaligned), ", ".join(unaligned),
        )  # fmt: skip
    if type(model) is nn.Linear:
        return Float8Linear.from_linear(model, recipe) if chosen else model
    _swap_children(
        model, lambda m, fqn: type(m) is nn.Linear and id(m) in chosen, lambda m: Float8Linear.from_linear(m, recipe)
    )
    return model


def _to_linear(m: Float8Linear) -> nn.Linear:
    with torch.device("meta"):
        new = nn.Linear(m.in_features, m.out_features, m.bias is not None)
    new.weight, new.bias = m.weight, m.bias
    new.train(m.training)
    return new


def convert_from_float8_training(model: nn.Module) -> nn.Module:
    """The reverse swap: every Float8Linear back to an nn.Linear with the same Parameters."""
    if isinstance(model, Float8Linear):
        return _to_linear(model)
    _swap_children(model, lambda m, fqn: isinstance(m, Float8Linear), _to_linear)
    return model


@torch.no_grad()
def sync_float8_amax_and_scale_history(model: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Once per optimizer step, after the step's last backward: every delayed-scaling layer's
    current amaxes are reduced (MAX) over the data-parallel `group` (default: the world) in one
    collective, then each layer updates its scales and rolls its history.

    One collective for the whole model: per-layer all-reduces would cost a launch and a latency
    each (hundreds per step on a deep model) for a few bytes apiece. Every rank then holds the
    same scales, so replicated weights stay bitwise identical across ranks.
    """
    layers = [m for m in model.modules() if isinstance(m, Float8Linear) and m.recipe.delayed]
    if not layers:
        return
    amax_O_per_layer = torch.cat([m.amax_history_OL[:, 0] for m in layers])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(amax_O_per_layer, op=dist.ReduceOp.MAX, group=group)
    for m, amax_O in zip(layers, amax_O_per_layer.split(2)):
        m.update_delayed_scales(amax_O)
