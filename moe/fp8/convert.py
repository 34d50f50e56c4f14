"""Swap the experts of a built model between BF16 and FP8, by recipe.

The FP8 module has the BF16 module's constructor arguments and parameters, so the swap moves the
same Parameter objects over (optimizer state and checkpoints keep working) and changes only how
the grouped computation runs. The model code never branches on FP8.
"""

from __future__ import annotations

from torch import nn

from moe.experts import GroupedMLP
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe


def _swap(old: GroupedMLP, new_cls, **kwargs) -> GroupedMLP:
    new = new_cls(old.dim, old.ffn_dim, old.num_experts, old.activation, old.impl, **kwargs)
    new.w1, new.w2 = old.w1, old.w2  # the same Parameters, not copies
    return new


def convert_experts_to_fp8(
    model: nn.Module, recipe: Fp8Recipe | str, pow2_scales: bool = False, cache_weights: bool = False
) -> int:
    """Replace every GroupedMLP in `model` with an Fp8GroupedMLP; returns how many were swapped.
    recipe: an Fp8Recipe, or its name (with `pow2_scales`). cache_weights: keep the FP8 weights
    across the micro-batches of an optimizer step (gradient accumulation; moe/fp8/grouped_mlp.py
    says what it costs in memory)."""
    fp8_recipe = recipe if isinstance(recipe, Fp8Recipe) else Fp8Recipe(recipe, pow2_scales)
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is GroupedMLP:
                if child.impl != "grouped_mm":
                    raise ValueError(
                        f"FP8 experts need model.moe.expert_impl=grouped_mm, got {child.impl!r}"
                    )
                new = _swap(child, Fp8GroupedMLP, recipe=fp8_recipe)
                new.cache_weights = cache_weights
                setattr(parent, name, new)
                swapped += 1
    if swapped == 0:
        raise ValueError("convert_experts_to_fp8 found no GroupedMLP to convert in the model")
    return swapped


def convert_experts_to_bf16(model: nn.Module) -> int:
    """The reverse swap: every Fp8GroupedMLP back to a GroupedMLP."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp8GroupedMLP):
                setattr(parent, name, _swap(child, GroupedMLP))
                swapped += 1
    return swapped
