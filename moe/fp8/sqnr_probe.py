"""Per-layer SQNR of the FP8 experts against BF16 on one micro-batch (logging.sqnr_interval).

    metrics = probe(model, run_forward)   # {"sqnr/L1/y": 26.3, "sqnr/L1/dx": 24.9, ...}

`run_forward()` runs the model's forward on one micro-batch (the trainer passes its own, under its
autocast). While it runs, a forward pre-hook on every FP8 experts module (Fp8GroupedMLP) takes
the rows the module receives and, with the module's weights as they are at that moment (the
local experts under expert parallelism, the unsharded ones under FSDP), computes

    y              the experts' output by the module's own FP8 path (its recipe, ablation knobs
                   included) and by the BF16 experts' path (moe/experts.py), from the same rows
                   and weights;
    dx, dw1, dw2   the gradients of both for one fixed random output gradient (drawn from a
                   private generator seeded by `seed`: the same dy at every probe)

and the SQNR of each, 10 log10(|ref|^2 / |ref - fp8|^2) in dB with ref the BF16 result, under
the key sqnr/L{i}/{y,dx,dw1,dw2}, i the block's index in model.layers. y and dx are compared
over the rows that belong to an expert (rows a capacity limit dropped are unspecified). A layer
that got FP8 rows from an FP8 dispatch is probed on their values (requantized by its recipe).
SQNR is capped at about 3000 dB where FP8 and BF16 agree exactly (a BF16 GEMM of an ablation).

The probe leaves training as it found it: the model forward runs under no_grad (the router
counts no load, no graph is kept), the per-layer gradients are torch.autograd.grad of leaf
copies that share the weights' storage (no parameter's .grad moves), every buffer (delayed-
scaling amax histories, router state) is restored from a copy, the RNG is forked and restored,
the FP8 weight caches are cleared (the next forward quantizes again, as after an optimizer
step), and compiled blocks run eager (torch.compiler.set_stance), so nothing recompiles. Each
rank probes its own micro-batch and experts; under expert parallelism every rank must call it
together (the forward runs all-to-alls). Cost: one forward, and two forward + backward passes
of the experts of each MoE layer.

Shape letters (README.md): M routed rows, H hidden, E experts.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch
from torch import nn

from moe.dispatch import ExpertInput, compute_dtype
from moe.experts import GroupedMLP
from moe.fp8.grouped_mlp import Fp8GroupedMLP

QUANTITIES = ("y", "dx", "dw1", "dw2")


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float | None:
    """10 log10(|ref|^2 / |ref - test|^2) in fp64; None where ref is all zeros (no signal)."""
    ref64, test64 = ref.detach().double(), test.detach().double()
    signal = ref64.square().sum().item()
    if signal == 0.0:
        return None
    noise = (ref64 - test64).square().sum().item()
    return 10.0 * math.log10(signal / max(noise, sys.float_info.min))


def _twin(experts: GroupedMLP, cls: type, w1_EXH: torch.Tensor, w2_EHF: torch.Tensor) -> GroupedMLP:
    """A `cls` experts module like `experts` (and its recipe, for FP8) whose parameters are new
    leaves sharing the storage of w1, w2."""
    kwargs = {"recipe": experts.recipe} if issubclass(cls, Fp8GroupedMLP) else {}
    with torch.device("meta"):
        twin = cls(experts.dim, experts.ffn_dim, experts.num_experts, experts.activation, experts.impl, **kwargs)
    twin.w1, twin.w2 = nn.Parameter(w1_EXH), nn.Parameter(w2_EHF)
    return twin


def layer_sqnr(experts: Fp8GroupedMLP, inp: ExpertInput, seed: int = 0) -> dict[str, float]:
    """{quantity: SQNR in dB} of one FP8 experts module on its input (module docstring)."""
    dtype = compute_dtype(inp.x)
    x_MH = inp.rows(dtype).detach()
    counts_E = inp.tokens_per_expert_E
    n = int(counts_E.sum())  # rows past n belong to no expert (a host sync: fine for a probe)
    if n == 0:
        return {}
    gen = torch.Generator(device=x_MH.device).manual_seed(seed)
    dy_MH = torch.randn(x_MH.shape[0], experts.dim, generator=gen, device=x_MH.device).to(dtype)
    w1, w2 = experts.w1.detach(), experts.w2.detach()
    results = []
    for cls in (type(experts), GroupedMLP):
        twin = _twin(experts, cls, w1, w2)
        x = x_MH.clone().requires_grad_()
        with torch.enable_grad():
            y_MH = twin(ExpertInput(x, counts_E))
            dx_MH, dw1, dw2 = torch.autograd.grad(y_MH, (x, twin.w1, twin.w2), dy_MH)
        results.append((y_MH[:n], dx_MH[:n], dw1, dw2))
    fp8, ref = results
    out = {}
    for name, f, r in zip(QUANTITIES, fp8, ref):
        value = sqnr_db(r, f)
        if value is not None:
            out[name] = value
    return out


def _layer_index(model: nn.Module) -> dict[nn.Module, int]:
    """Each FP8 experts module's block index in model.layers (else its order in the model)."""
    blocks = getattr(model, "layers", None)
    if blocks is None:
        return {m: i for i, m in enumerate(m for m in model.modules() if isinstance(m, Fp8GroupedMLP))}
    return {m: i for i, block in enumerate(blocks) for m in block.modules() if isinstance(m, Fp8GroupedMLP)}


@torch.no_grad()
def probe(model: nn.Module, run_forward: Callable[[], object], seed: int = 0) -> dict[str, float]:
    """SQNR of every FP8 experts module of `model` during `run_forward()`: {"sqnr/L{i}/{q}": dB}
    (module docstring); {} when the model has no FP8 experts."""
    index = _layer_index(model)
    if not index:
        return {}
    metrics: dict[str, float] = {}

    def hook(module: Fp8GroupedMLP, args: tuple) -> None:
        for name, value in layer_sqnr(module, args[0], seed).items():
            metrics[f"sqnr/L{index[module]}/{name}"] = value

    buffers = [(b, b.clone()) for b in model.buffers()]
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook) for m in index]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.compiler.set_stance("force_eager"):
                run_forward()
    finally:
        for h in handles:
            h.remove()
        for b, saved in buffers:
            b.copy_(saved)
        for m in model.modules():
            if hasattr(m, "invalidate_weight_cache"):
                m.invalidate_weight_cache()
    return metrics
