"""Gradient accumulation inside the FP8 weight-gradient GEMM (kernels/grouped_gemm_wgrad.py
`fp8_grouped_mm_wgrad_accumulate_`, moe/fp8/grouped_mlp.py) and inside the BF16 experts' weight
cast (moe/step_casts.py `CastWeight`, kernels/grad_cast.py `add_grad_`): moe/grad_accumulation.py
`accumulate_grads`, the trainer's run.fuse_grad_accumulation.

The kernel adds its product into `into` as AccumulateGrad would add the product it writes: old +
new in fp32. Under the interpreter (no FMA contraction) that is the same bits; on the GPU the
rowwise epilogue's scale multiply may contract with the add (one rounding fewer), so there the
bound is one fp32 rounding of the sum. The module and the trainer give the same gradients with
the fusion as without, bit for bit on the CPU, with the fusion having run.
"""

import contextlib

import pytest
import torch
from test_kernels_gemm import PADDED, WK, WN, wgrad_inputs
from trainer_helpers import cpu_trainer, steps_and_weights, tiny_train_config, token_batches

import moe.fp8.grouped_mlp as grouped_mlp
import moe.step_casts as step_casts
from kernels.grouped_gemm_wgrad import (
    fp8_grouped_mm_wgrad_accumulate_,
    triton_fp8_grouped_mm_wgrad,
    triton_fp8_grouped_mm_wgrad_rowwise,
)
from moe.dispatch import ExpertInput
from moe.experts import GroupedMLP
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe

RECIPES = ["rowwise", "blockwise"]


def _product(w, rowwise: bool) -> torch.Tensor:
    launch = triton_fp8_grouped_mm_wgrad_rowwise if rowwise else triton_fp8_grouped_mm_wgrad
    return launch(*w, torch.float32)


@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
@pytest.mark.parametrize("sizes", [PADDED, [128, 0, 256], [0, 0]], ids=["odd", "three", "no_tokens"])
def test_accumulating_launch_adds_the_written_product(sizes, rowwise):
    """into + the product the plain launch writes, bit for bit, with empty experts' blocks kept."""
    w = wgrad_inputs(WN, WK, sizes, seed=11, rowwise=rowwise)
    old = torch.randn(len(sizes), WN, WK, generator=torch.Generator().manual_seed(3))
    into = old.clone()
    fp8_grouped_mm_wgrad_accumulate_(into, *w, rowwise=rowwise)
    assert torch.equal(into, old + _product(w, rowwise))
    for e in (e for e, s in enumerate(sizes) if s == 0):
        assert torch.equal(into[e], old[e]), f"expert {e} has no tokens: its gradient must stay"


def test_accumulating_launch_refuses_what_it_cannot_add_into():
    w = wgrad_inputs(WN, WK, [128, 0, 256])
    for bad, what in [(torch.zeros(3, WN, WK, dtype=torch.bfloat16), "bfloat16"),
                      (torch.zeros(3, WK, WN).transpose(1, 2), "contiguous=False"),
                      (torch.zeros(2, WN, WK), "(2, 256, 384)")]:  # fmt: skip
        with pytest.raises(ValueError, match="into must be a contiguous float32") as err:
            fp8_grouped_mm_wgrad_accumulate_(bad, *w, rowwise=False)
        assert what in str(err.value)


def _experts_and_input(recipe: str, seed: int):
    """Fp8GroupedMLP (GroupedMLP for bf16) (E=4, H=128, F=96, or 128 for blockwise's 128x128 weight
    blocks) and 3 micro-batches of routed bf16 rows, each with an expert left empty."""
    torch.manual_seed(seed)
    ffn = 128 if recipe == "blockwise" else 96
    m = GroupedMLP(128, ffn, 4) if recipe == "bf16" else Fp8GroupedMLP(128, ffn, 4, recipe=Fp8Recipe(recipe))
    m.reset_parameters(0.05)
    batches = []
    for sizes in ([5, 0, 17, 40], [0, 0, 3, 30], [29, 1, 0, 17]):
        counts = torch.tensor(sizes)
        x = torch.randn(int(counts.sum()), 128, dtype=torch.bfloat16)
        batches.append(ExpertInput(x=x, tokens_per_expert_E=counts))
    return m, batches


@pytest.mark.parametrize("recipe", RECIPES)
def test_module_accumulates_in_place_with_the_same_gradients(recipe, monkeypatch):
    """Blockwise runs the interpreted kernels end to end; rowwise their references (the rowwise
    epilogue's bytes: test_accumulating_launch_adds_the_written_product), which keeps what this
    tests, the Function's choice of what to add into, at a third of the CPU time."""
    if recipe == "rowwise":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    grads = {}
    added = []
    add = grouped_mlp.grouped_mm_wgrad_accumulate_
    monkeypatch.setattr(grouped_mlp, "grouped_mm_wgrad_accumulate_",
                        lambda into, *args: added.append(into) or add(into, *args))  # fmt: skip
    for fused in (False, True):
        m, batches = _experts_and_input(recipe, seed=5)
        m.accumulate_grads = fused
        for inp in batches:
            m(inp).float().square().mean().backward()
        grads[fused] = (m.w1.grad, m.w2.grad)
    # The first micro-batch returns its gradients (no .grad yet); the two later ones add into them.
    assert len(added) == 4 and all(t.data_ptr() in {g.data_ptr() for g in grads[True]} for t in added)
    for want, got in zip(grads[False], grads[True]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("weight_cast", ["forward", "step"])
def test_bf16_experts_add_in_place_with_the_same_gradients(weight_cast, monkeypatch):
    """The BF16 experts' cast backward adds the bf16 gradient into .grad (kernels/grad_cast.py)
    from the second micro-batch on, with a cast in every forward or the step's one copy."""
    grads, added = {}, []
    add = step_casts.add_grad_
    monkeypatch.setattr(step_casts, "add_grad_", lambda into, g: added.append(into) or add(into, g))
    for fused in (False, True):
        m, batches = _experts_and_input("bf16", seed=5)
        m.accumulate_grads = fused
        with step_casts.weights_cast_once(m) if weight_cast == "step" else contextlib.nullcontext():
            for inp in batches:
                m(inp).float().square().mean().backward()
        grads[fused] = (m.w1.grad, m.w2.grad)
    assert len(added) == 4 and all(t.data_ptr() in {g.data_ptr() for g in grads[True]} for t in added)
    for want, got in zip(grads[False], grads[True]):
        assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("recipe", ["bf16", *RECIPES])
def test_trainer_steps_equal_with_and_without_the_fusion(recipe, tmp_path, monkeypatch):
    """2 steps of 3 micro-batches: the same losses, gradient norms and weights, bit for bit. The
    kernels' references run (the interpreted kernels' epilogues: the module test above); what is
    tested here is which micro-batches add in place, through the trainer."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    add = grouped_mlp.grouped_mm_wgrad_accumulate_
    monkeypatch.setattr(grouped_mlp, "grouped_mm_wgrad_accumulate_",
                        lambda *args: calls.append(1) or add(*args))  # fmt: skip
    add_bf16 = step_casts.add_grad_
    monkeypatch.setattr(step_casts, "add_grad_", lambda *args: calls.append(1) or add_bf16(*args))
    runs = {}
    for fused in (False, True):
        cfg = tiny_train_config(2, grad_accum=3)
        cfg.fp8.experts, cfg.run.fuse_grad_accumulation = recipe, fused
        cfg.run.defer_expert_wgrad = False  # the per-micro-batch path (deferral: tests/test_deferred_wgrad.py)
        if recipe == "blockwise":  # 128x128 weight blocks
            cfg.model.dim = cfg.model.moe.ffn_dim = 128
        cfg.validate()
        t = cpu_trainer(cfg, tmp_path / str(fused), monkeypatch)
        runs[fused] = steps_and_weights(t, 2, token_batches(7))
        assert not any(m.accumulate_grads for m in t.model.modules() if isinstance(m, GroupedMLP))
    assert len(calls) == 2 * 2 * 2  # per step: 2 later micro-batches x w1 and w2, one MoE layer
    assert runs[True][0] == runs[False][0]
    for got, want in zip(runs[True][1], runs[False][1]):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("rowwise", [False, True], ids=["blockwise", "rowwise"])
def test_accumulating_launch_on_the_gpu(rowwise):
    """Mixtral's wgrad1 at 1024 tokens an expert, 8 experts (one empty): the sum within one rounding
    of each term. The rowwise epilogue scales, then adds, and the compiler may contract the two into
    one FMA (`old + acc * s` rounded once, where the written product was rounded before its add):
    where old and the product nearly cancel, that differs from the sum by the product's rounding."""
    sizes = [1024, 1024, 0, 1024, 2048, 1024, 1024, 1024]
    w = wgrad_inputs(2 * 1536, 1024, sizes, device="cuda", seed=2, rowwise=rowwise)
    old = torch.randn(len(sizes), 2 * 1536, 1024, device="cuda")
    into = old.clone()
    fp8_grouped_mm_wgrad_accumulate_(into, *w, rowwise=rowwise)
    product = _product(w, rowwise)
    want = old + product
    assert torch.equal(into[2], old[2])
    bound = torch.finfo(torch.float32).eps * (want.abs() + product.abs())
    assert ((into - want).abs() <= bound).all(), float(((into - want).abs() - bound).max())
