"""optim.fused: AdamW's fused implementation against its foreach one (trainer/optim.py), and
checkpoints that resume with either.

Tolerance: both compute the same update in fp32 in another order. Given the same gradients (fixed
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
from trainer.optim import IMPLEMENTATION_KEYS, PARAM_GROUPS, build_optimizer, param_groups

LR = 1e-2
EPS32 = torch.finfo(torch.float32).eps


def _optimizer(model, fused: bool):
    return build_optimizer(model, OptimConfig(lr=LR, fused=fused))


def _assert_within_rounding(got, want, steps: int) -> None:
    wd = OptimConfig().weight_decay
    for (name, g), w in zip(got.named_parameters(), want.parameters()):
        size = w.detach().abs() + steps * LR * (1 + wd * w.detach().abs())
        bound = steps * EPS32 * (2 * size + 4 * 6 * LR)
        err = (g - w).abs()
        assert bool((err <= bound).all()), f"{name}: {float((err / bound).max()):.3g} x the rounding bound"


def test_fused_is_the_default_and_every_group_is_fused():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    assert [g["fused"] for g in opt.param_groups] == [True] * len(PARAM_GROUPS)
    opt = _optimizer(model, fused=False)
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, True)] * len(PARAM_GROUPS)


def test_fused_and_foreach_take_the_sametake_steps():
    start = tiny_model()
    fused, foreach = copy.deepcopy(start), copy.deepcopy(start)
    opt_fused, opt_foreach = _optimizer(fused, True), _optimizer(foreach, False)
    take_steps(fused, opt_fused, 0, 6)
    take_steps(foreach, opt_foreach, 0, 6)
    assert any(not torch.equal(p, q) for p, q in zip(fused.parameters(), foreach.parameters()))
    _assert_within_rounding(fused, foreach, steps=6)


@pytest.mark.parametrize("saved_fused", [True, False], ids=["fused_to_foreach", "foreach_to_fused"])
def test_a_checkpoint_of_one_resumes_with_the_other(tmp_path, saved_fused):
    """Through the trainer's checkpoints (DCP): 3 steps with one implementation, saved, loaded
    into a fresh model and optimizer of the other, 3 more; the loaded groups keep their own
    implementation, the state arrives exact, and the run stays within rounding of never stopping."""
    whole = tiny_model()
    opt_whole = _optimizer(whole, saved_fused)
    take_steps(whole, opt_whole, 0, 3)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(3, {"model": whole, "optim": opt_whole})
    saved_state = copy.deepcopy(opt_whole.state_dict()["state"])

    resumed = tiny_model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.mul_(0.5)  # the load must replace the weights too
    opt = _optimizer(resumed, not saved_fused)
    assert CheckpointManager(CheckpointConfig(), tmp_path).load({"model": resumed, "optim": opt}) == 3
    for group in opt.param_groups:
        assert {k: group[k] for k in IMPLEMENTATION_KEYS} == (
            {"fused": None, "foreach": True} if saved_fused else {"fused": True, "foreach": None}
        )
    state = opt.state_dict()["state"]
    assert state.keys() == saved_state.keys()
    for pid, saved in saved_state.items():
        assert state[pid].keys() == saved.keys()
        for key, value in saved.items():
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
    for fused in (True, False):
        cfg.optim.fused = fused
        temps[fused] = plan_memory(cfg, 1).bytes_of("optimizer step temporaries")
    largest_group = max(sum(p.numel() for p in g["params"]) for g in param_groups(build_model(cfg.model), cfg.optim))
    assert temps == {True: 0, False: 4 * largest_group}
