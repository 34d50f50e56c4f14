"""This project's FP8 experts inside transformers MoE models: "fp8_rowwise" and "fp8_blockwise",
two implementations of transformers' `ExpertsInterface`.

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), H hidden, F expert
FFN, X = 2F, E experts, M = T*A routed rows.

    from interop.hf_experts import use_fp8_experts
    use_fp8_experts(model, "blockwise")   # or an Fp8Recipe; returns the number of experts modules
    ... train in eager mode; model.set_experts_implementation("grouped_mm") switches back ...

After `register_fp8_experts()` the names are also what transformers itself accepts:
`model.set_experts_implementation("fp8_rowwise")`, or `experts_implementation="fp8_rowwise"` in
`from_pretrained` or a config. transformers' table of implementations is process-wide, so
registering adds the two names for every model of the process; it is idempotent.

What replaces an experts module's forward(hidden_states_TH, top_k_index_TA, top_k_weights_TA): the
router's choice stays transformers'; then `moe.permute.plan_permute` (a sort of the ids, no
activation moved), `moe.fp8.grouped_mlp.fp8_grouped_mlp` on the tokens (the gather fused into the
quantization: only FP8 rows are written), and `moe.permute.unpermute` (the weighted combine in one
fused pass, fp32 sums), exactly as this project's own MoE layer runs them.

The weights are the module's own parameters, read in place: gate_up_proj (E, 2F, H), gate rows
first, and down_proj (E, H, F) are moe/experts.py's w1_EXH and w2_EHF layout. Nothing is copied
or re-registered, so an optimizer built before the switch keeps training the same tensors and
checkpoints do not change. They are quantized in every forward, or with `cache_weights=True` once
per optimizer step (gradient accumulation: the cache is keyed by each tensor's version counter,
which the optimizer's in-place update bumps; moe/fp8/weight_cache.py).

Supported experts modules: transformers' `@use_experts_implementation` layout with a concatenated
[gate; up] projection, SiLU gate (SwiGLU), no biases, no transposed weights, no post-expert norm,
no expert parallelism of transformers' own (Qwen3-MoE, Qwen2-MoE, Mixtral, DeepSeek-V3 and the
like). Anything else is refused with the attribute that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate

from moe.config import require
from moe.dispatch import ExpertInput
from moe.fp8.grouped_mlp import fp8_grouped_mlp, quantize_expert_weight
from moe.fp8.recipe import RECIPES, Fp8Recipe
from moe.fp8.weight_cache import WeightCache
from moe.permute import plan_permute, unpermute
from moe.router import count_tokens_per_expert

IMPLEMENTATIONS = {f"fp8_{name}": name for name in RECIPES}  # experts_implementation -> recipe name


@dataclass
class Fp8ExpertsOptions:
    """What `use_fp8_experts` attaches to each experts module (as `fp8_experts_options`): the recipe
    that module's FP8 forward uses, and its weight caches when `cache_weights` is on."""

    recipe: Fp8Recipe
    caches: Optional[tuple[WeightCache, WeightCache]] = None  # (gate_up_proj's, down_proj's)


def is_hf_experts(module: nn.Module) -> bool:
    """Whether `module` is an experts module transformers dispatches through its ExpertsInterface
    (a class decorated with `@use_experts_implementation`)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "config")


def check_supported(module: nn.Module) -> None:
    """Refuse, naming the attribute, an experts module whose computation is not the SwiGLU grouped
    MLP that this project's FP8 experts run."""
    name = type(module).__name__
    require(is_hf_experts(module), f"{name} is not a transformers experts module (@use_experts_implementation)")
    require(module.has_gate, f"{name}.has_gate=False: FP8 experts need a gated (SwiGLU) projection, gate_up_proj")
    require(getattr(module, "is_concatenated", True),
            f"{name}.is_concatenated=False: FP8 experts need gate_up_proj as [gate; up], not interleaved")  # fmt: skip
    require(not module.is_transposed, f"{name}.is_transposed=True: FP8 experts need (E, out, in) weights")
    require(not module.has_bias, f"{name}.has_bias=True: FP8 experts have no bias")
    # Flags newer transformers releases added (absent: the feature does not exist there, off).
    require(not getattr(module, "has_post_expert_norm", False),
            f"{name}.has_post_expert_norm=True: FP8 experts have no post-expert norm")  # fmt: skip
    require(not getattr(module, "_is_expert_parallel", False),
            f"{name}._is_expert_parallel=True: FP8 experts run without transformers' expert parallelism")  # fmt: skip
    require(getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate,
            f"{name}._apply_gate is its own: FP8 experts compute act_fn(gate) * up only")  # fmt: skip
    act = getattr(module, "act_fn", None)
    require(isinstance(act, (SiLUActivation, nn.SiLU)),
            f"{name}.act_fn is {type(act).__name__}: FP8 experts take SiLU (SwiGLU) only")  # fmt: skip
    E, X, H = module.gate_up_proj.shape
    require(X % 2 == 0 and tuple(module.down_proj.shape) == (E, H, X // 2),
            f"{name}.down_proj must be (E, H, F) = {(E, H, X // 2)} for gate_up_proj {(E, X, H)}, "
            f"got {tuple(module.down_proj.shape)}")  # fmt: skip


def _module_recipe(module: nn.Module, recipe_name: str) -> tuple[Fp8Recipe, Optional[tuple]]:
    """The module's own options when they are for this recipe (use_fp8_experts), else the recipe's
    defaults and no cache (the implementation chosen by name)."""
    options: Optional[Fp8ExpertsOptions] = getattr(module, "fp8_experts_options", None)
    if options is not None and options.recipe.name == recipe_name:
        return options.recipe, options.caches
    return Fp8Recipe(recipe_name), None


def fp8_experts_forward(
    module: nn.Module,
    hidden_states_TH: torch.Tensor,
    top_k_index_TA: torch.Tensor,
    top_k_weights_TA: torch.Tensor,
    recipe_name: str,
) -> torch.Tensor:
    """out_TH[t] = sum_a w[t, a] * expert_{ids[t, a]}(x[t]) on the module's gate_up_proj and
    down_proj, in the recipe's FP8, returned in hidden_states' dtype."""
    check_supported(module)
    E, _, H = module.gate_up_proj.shape
    require(hidden_states_TH.dim() == 2 and hidden_states_TH.shape[1] == H,
            f"hidden_states must be (tokens, {H}), got {tuple(hidden_states_TH.shape)}")  # fmt: skip
    require(top_k_index_TA.shape == top_k_weights_TA.shape and top_k_index_TA.shape[:1] == hidden_states_TH.shape[:1],
            f"top_k_index {tuple(top_k_index_TA.shape)} and top_k_weights {tuple(top_k_weights_TA.shape)} must "
            f"both be (tokens, top_k) for {hidden_states_TH.shape[0]} tokens")  # fmt: skip
    recipe, caches = _module_recipe(module, recipe_name)
    ids_TA = top_k_index_TA.long()
    perm = plan_permute(ids_TA, E)
    inp = ExpertInput(hidden_states_TH, count_tokens_per_expert(ids_TA, E), perm=perm)
    wq1 = wq2 = None
    if caches is not None:
        wq1, wq2 = caches[0].get(module.gate_up_proj, recipe), caches[1].get(module.down_proj, recipe)
    y_MH = fp8_grouped_mlp(inp, module.gate_up_proj, module.down_proj, "swiglu", recipe, wq1, wq2)
    return unpermute(y_MH, perm, top_k_weights_TA).to(hidden_states_TH.dtype)


def _implementation(recipe_name: str) -> Callable[..., torch.Tensor]:
    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        return fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights, recipe_name)

    experts_forward.__name__ = experts_forward.__qualname__ = f"fp8_{recipe_name}_experts_forward"
    return experts_forward


def register_fp8_experts() -> tuple[str, ...]:
    """Make "fp8_rowwise" and "fp8_blockwise" valid transformers experts implementations; returns
    the names. Idempotent."""
    for impl, recipe_name in IMPLEMENTATIONS.items():
        if impl not in ALL_EXPERTS_FUNCTIONS:
            ALL_EXPERTS_FUNCTIONS.register(impl, _implementation(recipe_name))
    return tuple(IMPLEMENTATIONS)


def use_fp8_experts(model: nn.Module, recipe: Fp8Recipe | str = "rowwise", cache_weights: bool = False) -> int:
    """Switch every experts module of `model` (a transformers model, or any module holding
    transformers experts modules) to this project's FP8 experts; returns how many there are.

    recipe: an Fp8Recipe or its name (moe/fp8/recipe.py). cache_weights: quantize the weights once
    per optimizer step rather than every forward (gradient accumulation; without it nothing FP8
    outlives a step, which keeps peak memory lowest: moe/fp8/grouped_mlp.py)."""
    require(isinstance(recipe, Fp8Recipe) or recipe in RECIPES,
            f"recipe must be an Fp8Recipe or one of {RECIPES}, got {recipe!r}")  # fmt: skip
    recipe = recipe if isinstance(recipe, Fp8Recipe) else Fp8Recipe(recipe)
    experts = [m for m in model.modules() if is_hf_experts(m)]
    require(bool(experts), f"{type(model).__name__} holds no transformers experts module (@use_experts_implementation)")
    for m in experts:
        check_supported(m)
    impl = f"fp8_{recipe.name}"
    register_fp8_experts()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    for m in experts:
        caches = (WeightCache(quantize_expert_weight), WeightCache(quantize_expert_weight)) if cache_weights else None
        m.fp8_experts_options = Fp8ExpertsOptions(recipe, caches)
        if not hasattr(model, "set_experts_implementation"):
            m.config._experts_implementation = impl  # a bare block: its experts read their config
        require(m.config._experts_implementation == impl,
                f"{type(m).__name__}'s config kept experts implementation {m.config._experts_implementation!r} "
                f"after set_experts_implementation({impl!r})")  # fmt: skip
    return len(experts)
