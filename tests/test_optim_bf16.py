"""optim.state_dtype=bfloat16: AdamW with bf16 moments (trainer/fused_adamw.py, kernels/adamw.py).

Twice, as every FP8 path is tested: the kernel against its torch reference, bit for bit (the same
fp32 operations in the same order, IEEE square root and quotient, no FMA contraction: there is
nothing for a tolerance to absorb), on odd sizes, fp32 and bf16 gradients; and the recipe against
AdamW in fp64 within the bound that storing the moments in bf16 allows:
    each store rounds a moment to half a bf16 ulp, 2**-9 of it; the error decays by beta per step,
    so it stays under 2**-9 / (1 - beta) of the moment's magnitude (rel_m, rel_v); the update
    m_hat / (sqrt(v_hat) + eps) is then off by at most (rel_m + rel_v / 2) (first order) of its
    size, below 6 (Adam's bound for beta1**2 < beta2), times lr; over `steps` steps the weights
    differ by at most steps * lr * 6 * (rel_m + rel_v / 2) * 1.1 (the 1.1 for second-order
    terms and the fp32 weight's own roundings, below 1e-6 of the bound here).
Plus checkpoints: a state saved by any optimizer (this one with bf16 or fp32 moments, torch's fused
or foreach AdamW) loads into the other through the trainer's DCP checkpoints.
"""

import copy

import pytest
import torch
from optim_helpers import take_steps, tiny_model

from kernels.adamw import triton_adamw_step_
from kernels.reference_adamw import AdamWScalars, torch_adamw_step_
from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from trainer.checkpoint import CheckpointConfig, CheckpointManager
from trainer.config import OptimConfig, TrainConfig
from trainer.memory_plan import plan_memory
from trainer.optim import build_optimizer, param_groups
from trainer.fused_adamw import FusedAdamW

LR, BETAS, WD = 1e-2, (0.9, 0.95), 0.1


def _tensors(n: int, grad_dtype: torch.dtype, seed: int, moments: torch.dtype = torch.bfloat16):
    """p, g, m, v with magnitudes over many binades, zero gradients and moments among them."""
    gen = torch.Generator().manual_seed(seed)
    mag = lambda: torch.exp(torch.randn(n, generator=gen) * 4.0)  # noqa: E731
    p = torch.randn(n, generator=gen) * mag()
    g = (torch.randn(n, generator=gen) * mag() * (torch.rand(n, generator=gen) > 0.1)).to(grad_dtype)
    m = (torch.randn(n, generator=gen) * mag() * (torch.rand(n, generator=gen) > 0.1)).to(moments)
    v = (torch.rand(n, generator=gen) * mag() ** 2).to(moments)
    return p, g, m, v


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32], ids=["m_bf16", "m_fp32"])
@pytest.mark.parametrize("clip", [None, 0.37], ids=["unscaled", "grad_scale"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["g_fp32", "g_bf16"])
@pytest.mark.parametrize("n", [0, 1, 37, 2048 * 2 + 5])
def test_kernel_is_its_reference_bit_for_bit(n, grad_dtype, clip, moments):
    """Also with a gradient scale (clipping by 0.37 folded into the step: g / (1 / 0.37)), and with
    fp32 moments (the same step, stored unrounded)."""
    scale = None if clip is None else torch.tensor(clip).reciprocal()
    for step in (1, 2, 50):
        s = AdamWScalars.at(step, LR, BETAS, 1e-8, WD)
        want = _tensors(n, grad_dtype, seed=n + step, moments=moments)
        got = [t.clone() for t in want]
        g_before = want[1].clone()
        torch_adamw_step_(*want, s, grad_scale=scale)
        triton_adamw_step_(*got, s, grad_scale=scale)
        for name, a, b in zip("pgmv", got, want):
            assert torch.equal(a, b), (name, step)
        assert torch.equal(got[1], g_before)  # the gradient is read, not written
    if clip is not None and n:  # the scale is applied: unscaled, the step differs
        p, g, m, v = _tensors(n, grad_dtype, seed=n)
        scaled, plain = [p.clone(), g, m.clone(), v.clone()], [p.clone(), g, m.clone(), v.clone()]
        triton_adamw_step_(*scaled, AdamWScalars.at(2, LR, BETAS, 1e-8, WD), grad_scale=scale)
        triton_adamw_step_(*plain, AdamWScalars.at(2, LR, BETAS, 1e-8, WD))
        assert not torch.equal(scaled[2], plain[2])


def test_bad_arguments_name_what_is_wrong():
    p, g, m, v = _tensors(8, torch.float32, 0)
    s = AdamWScalars.at(1, LR, BETAS, 1e-8, WD)
    with pytest.raises(ValueError, match="fp32 master weights"):
        triton_adamw_step_(p.bfloat16(), g, m, v, s)
    with pytest.raises(ValueError, match="exp_avg_sq must be bfloat16 or float32"):
        triton_adamw_step_(p, g, m, v.half(), s)
    with pytest.raises(ValueError, match="must share a dtype"):
        triton_adamw_step_(p, g, m, v.float(), s)
    with pytest.raises(ValueError, match="contiguous"):
        triton_adamw_step_(p.view(2, 4).t(), g.view(2, 4).t(), m.view(2, 4).t(), v.view(2, 4).t(), s)
    with pytest.raises(ValueError, match="shape"):
        triton_adamw_step_(p, g[:4], m, v, s)
    with pytest.raises(ValueError, match="grad_scale must be one float32 element"):
        triton_adamw_step_(p, g, m, v, s, grad_scale=torch.ones(2))
    cfg = TrainConfig()
    cfg.optim.state_dtype = "float16"
    with pytest.raises(ValueError, match="optim.state_dtype must be one of"):
        cfg.validate()


def _bf16_optimizer(model):
    return build_optimizer(model, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], state_dtype="bfloat16"))


def test_the_recipe_follows_fp64_adamw_within_the_bf16_moments_bound():
    steps = 30
    ours = tiny_model()
    exact = copy.deepcopy(ours).double()
    opt = _bf16_optimizer(ours)
    assert isinstance(opt, FusedAdamW)
    ref = build_optimizer(exact, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], fused=False))  # fp64 foreach
    take_steps(ours, opt, 0, steps)
    take_steps(exact, ref, 0, steps)
    rel = 2.0**-9 / (1 - BETAS[0]) + 0.5 * 2.0**-9 / (1 - BETAS[1])
    bound = steps * LR * 6 * rel * 1.1
    worst = max(float((a.detach().double() - b.detach()).abs().max()) for a, b in zip(ours.parameters(), exact.parameters()))
    assert worst <= bound, f"{worst:.3g} > {bound:.3g}"
    assert worst > 1e-7, "the bf16 moments changed nothing: are they bf16?"
    for state in opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert state["step"].device.type == "cpu" and float(state["step"]) == steps


@pytest.mark.parametrize("saved", ["bf16", "fused", "foreach", "torch_fused"])
def test_checkpoints_cross_between_the_state_dtypes(tmp_path, saved):
    """Through the trainer's checkpoints: 3 steps, saved, loaded into a fresh model with the other
    optimizer, 3 more. Into the bf16 one: the moments arrive rounded to bf16 and the steps go on
    as they would from those moments; out of it: fp32 widening, exact."""
    make = {"bf16": _bf16_optimizer,
            "fused": lambda m: build_optimizer(m, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], fused=True)),
            "foreach": lambda m: build_optimizer(m, OptimConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], fused=False)),
            "torch_fused": lambda m: torch.optim.AdamW(param_groups(m, OptimConfig()), lr=LR, betas=BETAS, fused=True)}
    other = "fused" if saved == "bf16" else "bf16"
    whole = tiny_model()
    opt_whole = make[saved](whole)
    take_steps(whole, opt_whole, 0, 3)
    CheckpointManager(CheckpointConfig(), tmp_path).save(3, {"model": whole, "optim": opt_whole})
    saved_state = copy.deepcopy(opt_whole.state_dict()["state"])

    resumed = tiny_model()
    opt = make[other](resumed)
    assert CheckpointManager(CheckpointConfig(), tmp_path).load({"model": resumed, "optim": opt}) == 3
    state = opt.state_dict()["state"]
    want_dtype = torch.bfloat16 if other == "bf16" else torch.float32
    for pid, entry in saved_state.items():
        assert float(state[pid]["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[pid][key].dtype == want_dtype
            assert torch.equal(state[pid][key], entry[key].to(want_dtype)), (pid, key)
    if other == "bf16":
        assert all(s["step"].device.type == "cpu" for s in opt.state.values())
        assert all(g["fused"] is None and g["foreach"] is None for g in opt.param_groups)
    # The continuation equals a run of `other` from the loaded state: same weights, same moments.
    twin = copy.deepcopy(resumed)
    opt_twin = make[other](twin)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    take_steps(resumed, opt, 3, 5)
    take_steps(twin, opt_twin, 3, 5)
    for a, b in zip(resumed.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), tiny_model().parameters()))


def test_the_memory_plan_counts_two_bytes_a_moment():
    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))  # fmt: skip
    cfg.run.seq_len, cfg.run.micro_batch_size = 64, 2
    n = sum(p.numel() for p in build_model(cfg.model).parameters())
    fp32 = plan_memory(cfg, 1)
    cfg.optim.state_dtype = "bfloat16"
    bf16 = plan_memory(cfg, 1)
    assert (fp32.bytes_of("optimizer state"), bf16.bytes_of("optimizer state")) == (8 * n, 4 * n)
    assert fp32.total_bytes - bf16.total_bytes == 4 * n


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["g_fp32", "g_bf16"])
def test_kernel_is_its_reference_bit_for_bit_on_the_gpu(grad_dtype):
    """The compiled kernel (no FMA contraction, IEEE sqrt and quotient) against the reference's
    CUDA ops, over 2**20 + 3 elements: equal."""
    for step, scale in ((1, None), (7, None), (7, torch.tensor(0.37, device="cuda").reciprocal())):
        s = AdamWScalars.at(step, LR, BETAS, 1e-8, WD)
        want = [t.cuda() for t in _tensors(2**20 + 3, grad_dtype, seed=step)]
        got = [t.clone() for t in want]
        torch_adamw_step_(*want, s, grad_scale=scale)
        triton_adamw_step_(*got, s, grad_scale=scale)
        for name, a, b in zip("pgmv", got, want):
            assert torch.equal(a, b), (name, step, int((a != b).sum()))


def test_optimizer_benchmark_builds_its_models_and_refuses_without_a_gpu(monkeypatch, tmp_path):
    from bench import optim_step

    n = sum(s.numel() for s in optim_step.shapes("parity_300m"))
    assert n == 310965248  # the parity model's parameters (its results files name the same count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "optim_step.json"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        optim_step.main(["--out", str(out)])
    assert not out.exists()
