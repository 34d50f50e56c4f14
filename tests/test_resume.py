"""trainer/resume.py and the resume half of trainer/optim.py: what a resume does with a changed
config (printed, free, refused or applied on request), and an optimizer whose groups and
schedule load at every layout."""

import copy

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from trainer.config import OptimConfig, TrainConfig
from trainer.optim import PARAM_GROUPS, build_optimizer, build_scheduler, param_groups, resume_scheduler
from trainer.resume import flatten, plan_resume


def _cfg() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(TrainConfig()), resolve=True)


def test_no_difference_is_a_plain_resume():
    plan = plan_resume(_cfg(), _cfg(), 8, 8, apply_changes=False)
    assert plan.changes == () and plan.applied == () and plan.schedule_steps == 200


def test_free_keys_change_freely_and_are_listed():
    new = _cfg()
    new["run"]["steps"], new["logging"]["interval"], new["parallel"]["ep"] = 500, 1, 2
    new["run"]["micro_batch_size"], new["run"]["grad_accum"] = 4, 2  # the same global batch
    plan = plan_resume(_cfg(), new, 8, 8, apply_changes=False)
    assert {c.key for c in plan.changes} == {"run.steps", "logging.interval", "parallel.ep",
                                            "run.micro_batch_size", "run.grad_accum"}
    # A longer run keeps the schedule of the run that started it: no cosine re-stretched.
    assert plan.schedule_steps == 200 and plan.applied == ()


@pytest.mark.parametrize("key, value", [("optim.lr", 1e6), ("optim.beta2", 0.99), ("optim.warmup_steps", 5),
                                        ("data.seed", 7), ("run.seed", 1), ("fp8.experts", "rowwise")])
def test_trajectory_changes_are_refused_unless_applied(key, value):
    new = _cfg()
    group, name = key.split(".")
    new[group][name] = value
    with pytest.raises(ValueError, match=rf"(?s){key}: .* -> {value!r}.*checkpoint.apply_changes=true"):
        plan_resume(_cfg(), new, 8, 8, apply_changes=False)
    plan = plan_resume(_cfg(), new, 8, 8, apply_changes=True)
    assert [c.key for c in plan.applied] == [key]


def test_a_key_added_to_the_schema_after_the_checkpoint_is_no_change_at_its_default():
    saved = _cfg()
    del saved["fp8"]["intermediate"]  # a checkpoint older than the key
    assert plan_resume(saved, _cfg(), 8, 8, apply_changes=False).changes == ()
    new = _cfg()
    new["fp8"]["intermediate"] = "bf16"  # not the default: the old run did not do this
    with pytest.raises(ValueError, match="fp8.intermediate: None -> 'bf16'"):
        plan_resume(saved, new, 8, 8, apply_changes=False)


def test_a_changed_global_batch_changes_the_data_order_and_is_refused():
    with pytest.raises(ValueError, match=r"global batch .*: 8 -> 16"):
        plan_resume(_cfg(), _cfg(), 8, 16, apply_changes=False)


def test_architecture_changes_are_refused_even_when_applying():
    new = _cfg()
    new["model"]["moe"]["num_experts"] = 16
    with pytest.raises(ValueError, match=r"(?s)another model.*model.moe.num_experts: 8 -> 16"):
        plan_resume(_cfg(), new, 8, 8, apply_changes=True)


def test_an_explicit_schedule_length_is_a_deliberate_change():
    new = _cfg()
    new["run"]["steps"], new["optim"]["schedule_steps"] = 400, 400
    with pytest.raises(ValueError, match="optim.schedule_steps"):
        plan_resume(_cfg(), new, 8, 8, apply_changes=False)
    assert plan_resume(_cfg(), new, 8, 8, apply_changes=True).schedule_steps == 400
    # The checkpoint's recorded length carries over to the next resume.
    saved = copy.deepcopy(new)
    again = copy.deepcopy(new)
    again["optim"]["schedule_steps"], again["run"]["steps"] = 0, 900
    assert plan_resume(saved, again, 8, 8, apply_changes=False).schedule_steps == 400


def test_flatten_uses_dotted_paths():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}


# ---- the optimizer at every layout -------------------------------------------------------------


def _model(first_k_dense=0):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                      first_k_dense=first_k_dense, moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16))  # fmt: skip
    return build_model(cfg)


@pytest.mark.parametrize("first_k_dense", [0, 2])
def test_the_same_groups_whatever_the_model(first_k_dense):
    model = _model(first_k_dense)
    groups = param_groups(model, OptimConfig(weight_decay=0.1))
    assert len(groups) == len(PARAM_GROUPS) == 3
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    assert {id(p) for p in groups[2]["params"]} == experts  # empty without MoE layers
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1]
    n_params = len(list(model.parameters()))
    assert sum(len(g["params"]) for g in groups) == n_params


def test_resume_scheduler_keeps_the_step_and_sets_the_lr_of_that_step():
    model = _model()
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(6):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    same = resume_scheduler(opt, saved, cfg, 10, reset_lr=False)
    assert same.last_epoch == 6 and same.get_last_lr() == pytest.approx(sched.get_last_lr())
    # A schedule of 20 steps from the same step; with reset_lr the config's lr is the new base.
    longer = resume_scheduler(opt, saved, OptimConfig(lr=2.0, warmup_steps=2, min_lr_ratio=0.1), 20, reset_lr=True)
    factor = 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 18)).item())
    assert longer.get_last_lr() == pytest.approx([2.0 * factor] * 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0 * factor] * 3)
