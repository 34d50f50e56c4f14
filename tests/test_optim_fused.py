"""optim.fused: our fused AdamW (trainer/fused_adamw.py, fp32 moments) against torch's foreach and
fused AdamW (trainer/optim.py), and checkpoints that resume with any of them.

Tolerance: all compute the same update in fp32 in another order. Given the same gradients (fixed
here, so no difference feeds back through a loss), each step each implementation rounds the new
weight to half an ulp of it, twice with the weight decay's product, and its update
lr * m_hat / (sqrt(v_hat) + eps) to a few fp32 roundings of a quantity below ~6 lr (Adam's bound
on |m_hat| / sqrt(v_hat) for beta1^2 < beta2, 5.8 at the defaults), and differences add up over
the steps without growing (the decay factor is below 1):
    |fused - foreach| <= steps * eps32 * (2 * |w| + 4 * 6 * lr)
with |w| the weight's magnitude over the run (its final value plus steps * (lr + lr * wd * |w|)).
"""

import copy

import pytest
import torch
from optim_helpers import take_steps, tiny_model

from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from trainer.checkpoint import CheckpointConfig, CheckpointManager
from trainer.config import OptimConfig
from trainer.fused_adamw import FusedAdamW
from trainer.optim import IMPLEMENTATION_KEYS, PARAM_GROUPS, build_optimizer, param_groups

LR = 1e-2
EPS32 = torch.finfo(torch.float32).eps


def _optimizer(model, impl: str):
    """ours | foreach: build_optimizer's two; torch_fused: torch's fused AdamW."""
    cfg = OptimConfig(lr=LR, fused=impl == "ours")
    if impl == "torch_fused":  # what the trainer built before ours: its checkpoints must resume
        return torch.optim.AdamW(param_groups(model, cfg), lr=LR, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    return build_optimizer(model, cfg)


def _assert_within_rounding(got, want, steps: int) -> None:
    wd = OptimConfig().weight_decay
    for (name, g), w in zip(got.named_parameters(), want.parameters()):
        size = w.detach().abs() + steps * LR * (1 + wd * w.detach().abs())
        bound = steps * EPS32 * (2 * size + 4 * 6 * LR)
        err = (g - w).abs()
        assert bool((err <= bound).all()), f"{name}: {float((err / bound).max()):.3g} x the rounding bound"


def test_ours_is_the_default_with_fp32_moments_and_false_is_foreach():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, FusedAdamW) and opt.state_dtype == torch.float32
    assert len(opt.param_groups) == len(PARAM_GROUPS)
    opt = _optimizer(model, "foreach")
    assert type(opt) is torch.optim.AdamW
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, True)] * len(PARAM_GROUPS)
    bf16 = build_optimizer(model, OptimConfig(fused=False, state_dtype="bfloat16"))  # no foreach for bf16 moments
    assert isinstance(bf16, FusedAdamW) and bf16.state_dtype == torch.bfloat16


@pytest.mark.parametrize("other", ["foreach", "torch_fused"])
def test_ours_takes_torch_s_steps_within_rounding(other):
    start = tiny_model()
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    opt_ours, opt_theirs = _optimizer(ours, "ours"), _optimizer(theirs, other)
    take_steps(ours, opt_ours, 0, 6)
    take_steps(theirs, opt_theirs, 0, 6)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt_ours.state.values())
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), start.parameters()))
    _assert_within_rounding(ours, theirs, steps=6)


@pytest.mark.parametrize("saved, loaded", [("ours", "foreach"), ("foreach", "ours"), ("torch_fused", "ours")])
def test_a_checkpoint_of_one_resumes_with_the_other(tmp_path, saved, loaded):
    """Through the trainer's checkpoints (DCP): 3 steps with one implementation, saved, loaded
    into a fresh model and optimizer of the other, 3 more; the loaded groups keep their own
    implementation, the state arrives exact, and the run stays within rounding of never stopping."""
    whole = tiny_model()
    opt_whole = _optimizer(whole, saved)
    take_steps(whole, opt_whole, 0, 3)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(3, {"model": whole, "optim": opt_whole})
    saved_state = copy.deepcopy(opt_whole.state_dict()["state"])

    resumed = tiny_model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.mul_(0.5)  # the load must replace the weights too
    opt = _optimizer(resumed, loaded)
    assert CheckpointManager(CheckpointConfig(), tmp_path).load({"model": resumed, "optim": opt}) == 3
    for group in opt.param_groups:
        assert {k: group[k] for k in IMPLEMENTATION_KEYS} == (
            {"fused": None, "foreach": True} if loaded == "foreach" else {"fused": None, "foreach": None}
        )
    if loaded == "ours":  # the counter where ours keeps it: host arithmetic, no device read
        assert all(s["step"].device.type == "cpu" for s in opt.state.values())
    state = opt.state_dict()["state"]
    assert state.keys() == saved_state.keys()
    for pid, entry in saved_state.items():
        assert state[pid].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(state[pid][key].to(value.dtype), value), (pid, key)

    take_steps(whole, opt_whole, 3, 6)
    take_steps(resumed, opt, 3, 6)
    _assert_within_rounding(resumed, whole, steps=6)


def test_the_memory_plan_counts_foreach_temporaries_only():
    from trainer.config import TrainConfig
    from trainer.memory_plan import plan_memory

    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                            moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32))  # fmt: skip
    cfg.run.seq_len, cfg.run.micro_batch_size = 64, 2
    temps = {}
    for fused, state_dtype in ((True, "float32"), (False, "float32"), (False, "bfloat16")):
        cfg.optim.fused, cfg.optim.state_dtype = fused, state_dtype
        temps[fused, state_dtype] = plan_memory(cfg, 1).bytes_of("optimizer step temporaries")
    largest_group = max(sum(p.numel() for p in g["params"]) for g in param_groups(build_model(cfg.model), cfg.optim))
    # bf16 moments take the fused AdamW whatever optim.fused says
    assert temps == {(True, "float32"): 0, (False, "float32"): 4 * largest_group, (False, "bfloat16"): 0}
