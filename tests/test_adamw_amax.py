"""AdamW's step that also takes the rowwise amaxes of the new expert weight (kernels/adamw.py,
amax), and the rowwise weight quantizer that takes them instead of its own amax pass
(kernels/quantize_weight.py, amax).

The kernel against its torch reference bit for bit (weights, moments and amaxes), on tiles that do
and do not divide the shape: N odd (one-row tiles), N a multiple of 8 but not 16, K not a power of
two, an expert whose weights are all zero, empty experts; and the quantizer given those amaxes
against the quantizer taking its own, byte for byte: the two ways to a step's FP8 weight agree.
"""

import pytest
import torch
from fp8_inputs import assert_same
from optim_helpers import take_steps, tiny_model

import moe.fp8.grouped_mlp as grouped_mlp
from kernels.adamw import triton_adamw_step_
from kernels.quantize_weight import quantize_weight
from kernels.reference_adamw import AdamWScalars, torch_adamw_step_
from moe.fp8.grouped_mlp import Fp8GroupedMLP, quantize_expert_weight
from moe.fp8.recipe import FP8Config
from moe.fp8.step_amax import fresh_amax
from moe.fp8.training import Fp8Training
from trainer.config import OptimConfig
from trainer.optim import param_groups
from trainer.fused_adamw import FusedAdamW

LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1
SHAPES = [(3, 24, 40), (2, 7, 130), (2, 32, 2048 + 5), (4, 48, 96)]


def _expert_tensors(shape, moments: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 2.0)
    p[0, 1] = 0.0  # a row of zeros (its amax 0; the quantizer's scale rule takes it)
    if shape[0] > 2:
        p[2] = 0.0  # an expert of zeros: a zero step keeps it there
    g = torch.randn(shape, generator=gen) * 1e-2
    if shape[0] > 2:
        g[2] = 0.0
    m = (torch.randn(shape, generator=gen) * 1e-3).to(moments)
    v = (torch.rand(shape, generator=gen) * 1e-5).to(moments)
    if shape[0] > 2:
        m[2], v[2] = 0.0, 0.0
    return p, g, m, v


def _amax_buffer(shape) -> torch.Tensor:
    E, N, K = shape
    return torch.full((E * N + E * K,), -1, dtype=torch.int32)  # overwritten, not added to


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32], ids=["m_bf16", "m_fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_amax_step_is_its_reference_bit_for_bit(shape, moments):
    scale = torch.tensor(0.37).reciprocal()
    for step, grad_scale in ((1, None), (7, scale)):
        s = AdamWScalars.at(step, LR, BETAS, 1e-8, WD)
        want = _expert_tensors(shape, moments, seed=step)
        got = [t.clone() for t in want]
        plain = [t.clone() for t in want]
        want_amax, got_amax = _amax_buffer(shape), _amax_buffer(shape)
        torch_adamw_step_(*want, s, grad_scale, want_amax)
        triton_adamw_step_(*got, s, grad_scale, got_amax)
        triton_adamw_step_(*plain, s, grad_scale)
        for name, a, b, c in zip("pgmv", got, want, plain):
            assert torch.equal(a, b), (name, step)
            assert torch.equal(a, c), (name, step)  # the tiled step is the flat one
        assert torch.equal(got_amax, want_amax), step
        E, N, K = shape
        w = got[0].to(torch.bfloat16).float().abs()  # an independent statement of what amax holds
        assert torch.equal(got_amax[: E * N].view(torch.float32), w.amax(dim=2).flatten())
        assert torch.equal(got_amax[E * N :].view(torch.float32), w.amax(dim=1).flatten())


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantizer_given_the_steps_amax_writes_the_same_bytes(shape, pow2):
    p, g, m, v = _expert_tensors(shape, torch.float32, seed=3)
    amax = _amax_buffer(shape)
    triton_adamw_step_(p, g, m, v, AdamWScalars.at(3, LR, BETAS, 1e-8, WD), None, amax)
    assert_same(quantize_weight(p, "rowwise", pow2, round_bf16=True, amax=amax),
                quantize_weight(p, "rowwise", pow2, round_bf16=True))


def test_bad_amax_arguments_name_what_is_wrong():
    p, g, m, v = _expert_tensors((2, 8, 16), torch.float32, seed=0)
    s = AdamWScalars.at(1, LR, BETAS, 1e-8, WD)
    with pytest.raises(ValueError, match="amax is for an \\(E, N, K\\) parameter"):
        triton_adamw_step_(p.view(16, 16), g.view(16, 16), m.view(16, 16), v.view(16, 16), s, None,
                           torch.zeros(48, dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="48 elements"):
        triton_adamw_step_(p, g, m, v, s, None, torch.zeros(47, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        triton_adamw_step_(p, g, m, v, s, None, torch.zeros(48))
    amax = torch.zeros(48, dtype=torch.int32)
    with pytest.raises(ValueError, match="takes scaling 'rowwise' and round_bf16"):
        quantize_weight(p, "tensorwise", False, round_bf16=True, amax=amax)
    with pytest.raises(ValueError, match="takes scaling 'rowwise' and round_bf16"):
        quantize_weight(p, "rowwise", False, round_bf16=False, amax=amax)
    with pytest.raises(ValueError, match="amax must be int32 of shape \\(48,\\)"):
        quantize_weight(p, "rowwise", False, round_bf16=True, amax=amax[:40])


@pytest.mark.gpu
def test_gpu_amax_step_at_expert_width():
    """One Mixtral-like expert weight slice on the GPU (rows of 4096, N a multiple of 16): the tiled
    step with amaxes is the reference's and the flat step's, and the quantizer given them agrees."""
    shape = (4, 1024, 4096)
    want = [t.cuda() for t in _expert_tensors(shape, torch.float32, seed=5)]
    got, plain = [t.clone() for t in want], [t.clone() for t in want]
    want_amax, got_amax = _amax_buffer(shape).cuda(), _amax_buffer(shape).cuda()
    s = AdamWScalars.at(4, LR, BETAS, 1e-8, WD)
    torch_adamw_step_(*want, s, None, want_amax)
    triton_adamw_step_(*got, s, None, got_amax)
    triton_adamw_step_(*plain, s)
    for a, b, c in zip(got, want, plain):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(got_amax, want_amax)
    assert_same(quantize_weight(got[0], "rowwise", False, round_bf16=True, amax=got_amax),
                quantize_weight(got[0], "rowwise", False, round_bf16=True))


def _rowwise_model(recipe: str = "rowwise"):
    model = tiny_model()
    Fp8Training(FP8Config(experts=recipe)).convert(model)
    return model, next(m for m in model.modules() if isinstance(m, Fp8GroupedMLP))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["m_bf16", "m_fp32"])
def test_the_optimizer_hands_the_quantizer_its_amaxes_while_nothing_else_wrote_the_weight(state_dtype):
    model, mlp = _rowwise_model()
    opt = FusedAdamW(param_groups(model, OptimConfig()), lr=LR, betas=BETAS, state_dtype=state_dtype)
    assert fresh_amax(mlp.w1) is None  # no step has taken them yet
    take_steps(model, opt, 0, 2)
    for w in (mlp.w1, mlp.w2):
        amax = fresh_amax(w)
        a = w.detach().to(torch.bfloat16).float().abs()
        assert torch.equal(amax.view(torch.float32), torch.cat([a.amax(dim=2).flatten(), a.amax(dim=1).flatten()]))
        assert_same(quantize_expert_weight(w.detach(), mlp.recipe, amax=amax),
                    quantize_expert_weight(w.detach(), mlp.recipe))
    with torch.no_grad():
        mlp.w1.mul_(2.0)  # any write after the step: its amaxes no longer hold
    assert fresh_amax(mlp.w1) is None and fresh_amax(mlp.w2) is not None
    take_steps(model, opt, 2, 3)
    assert fresh_amax(mlp.w1) is not None
    torch.optim.AdamW(param_groups(model, OptimConfig()), lr=LR, foreach=True).step()  # no amaxes taken
    assert fresh_amax(mlp.w1) is None and fresh_amax(mlp.w2) is None


def test_only_rowwise_expert_weights_are_marked_and_the_forward_takes_the_amaxes(monkeypatch):
    model, mlp = _rowwise_model("blockwise")
    take_steps(model, FusedAdamW(param_groups(model, OptimConfig()), lr=LR), 0, 1)
    assert fresh_amax(mlp.w1) is None and fresh_amax(mlp.w2) is None
    model, mlp = _rowwise_model()
    take_steps(model, FusedAdamW(param_groups(model, OptimConfig()), lr=LR), 0, 1)
    seen = []
    quantize = grouped_mlp.quantize_weight
    monkeypatch.setattr(grouped_mlp, "quantize_weight",
                        lambda *a, **kw: seen.append(kw["amax"]) or quantize(*a, **kw))  # fmt: skip
    model(torch.randint(0, 61, (2, 16)))
    assert len(seen) == 2 and seen[0] is fresh_amax(mlp.w1) and seen[1] is fresh_amax(mlp.w2)
