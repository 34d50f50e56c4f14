"""Gradient clipping in the trainer (trainer/loop.py, trainer/parallel.py, trainer/optim.py): the
norm logged and the coefficient are torch's clip_grad_norm_'s; the optimizer steps on the clipped
gradients; and no pass of its own scales them where the optimizer takes a gradient scale (torch's
fused AdamW, FusedAdamW), or where the norm stays under optim.grad_clip."""

import copy
import math

import pytest
import torch
from trainer_helpers import cpu_trainer, tiny_train_config, token_batches

import trainer.loop
import trainer.optim
from trainer.optim import build_optimizer, takes_grad_scale

STEPS = 3
OPTIMIZERS = {  # label -> (optim.fused, optim.state_dtype)
    "fused": (True, "float32"),
    "foreach": (False, "float32"),
    "bf16_moments": (True, "bfloat16"),
}


def _cfg(grad_clip: float, optimizer: str):
    c = tiny_train_config(STEPS, grad_accum=2)
    c.optim.grad_clip = grad_clip
    c.optim.fused, c.optim.state_dtype = OPTIMIZERS[optimizer]
    c.validate()
    return c


def _run(cfg, run_dir, monkeypatch):
    """The trainer's model as built, then per step: the norm logged, the raw gradients, the
    coefficient handed to the optimizer step (None: unclipped), the groups' lr and the parameters
    after the step; and the passes `scale_grads_` made."""
    passes, coefs, raw, lrs, after = [], [], [], [], []
    scale = trainer.optim.scale_grads_
    monkeypatch.setattr(trainer.optim, "scale_grads_",
                        lambda model, coef: passes.append(coef.item()) or scale(model, coef))  # fmt: skip
    step = trainer.loop.clipped_step

    def record_step(opt, model, coef):
        coefs.append(coef)
        lrs.append([group["lr"] for group in opt.param_groups])
        step(opt, model, coef)
        after.append([p.detach().clone() for p in model.parameters()])

    monkeypatch.setattr(trainer.loop, "clipped_step", record_step)
    t = cpu_trainer(cfg, run_dir, monkeypatch)
    initial = copy.deepcopy(t.model)
    norm_of = trainer.loop.global_grad_norm

    def record_norm(model, env):  # the gradients before any clipping
        raw.append([p.grad.clone() for p in model.parameters()])
        return norm_of(model, env)

    monkeypatch.setattr(trainer.loop, "global_grad_norm", record_norm)
    it = token_batches(5)
    norms = [t.train_step(it)["grad_norm"] for _ in range(STEPS)]
    return initial, norms, raw, coefs, lrs, after, passes


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("grad_clip", [0.0, 1e6, 0.05], ids=["off", "never_reached", "every_step"])
def test_clipping_is_torch_s_and_folds_into_the_optimizer(tmp_path, monkeypatch, grad_clip, optimizer):
    cfg = _cfg(grad_clip, optimizer)
    initial, norms, raw, coefs, lrs, after, passes = _run(cfg, tmp_path, monkeypatch)
    assert len(norms) == len(raw) == len(coefs) == len(after) == STEPS

    # The replay: the same optimizer over the initial parameters, stepped on the gradients the
    # trainer's step is meant to use: g / (1 / coef) where the optimizer folds the coefficient in,
    # g * coef where a pass scales them, g where nothing clips.
    ref_opt = build_optimizer(initial, cfg.optim)
    params = list(initial.parameters())
    folds = takes_grad_scale(ref_opt)
    assert folds == (optimizer != "foreach")
    for norm, g_raw, coef, lr, got in zip(norms, raw, coefs, lrs, after):
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in g_raw]
        for p, g in zip(ref, g_raw):
            p.grad = g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, grad_clip if grad_clip > 0 else math.inf)
        assert norm == pytest.approx(ref_norm.item(), rel=1e-5)
        if coef is None:
            assert grad_clip == 0 or ref_norm.item() + 1e-6 <= grad_clip  # torch's clip_grad_norm_ keeps them
            grads = g_raw
        else:
            torch_coef = grad_clip / (ref_norm + 1e-6)
            assert coef.item() == pytest.approx(torch_coef.item(), rel=1e-5) and coef.item() < 1
            grads = [g / coef.reciprocal() if folds else g * coef for g in g_raw]
            # torch's clipped gradients, up to the two norms' rounding (the 1e-5 above) and one more
            # rounding where the step divides by 1 / coef.
            for g, p in zip(grads, ref):
                torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=0)
        for p, g in zip(params, grads):
            p.grad = g
        for group, group_lr in zip(ref_opt.param_groups, lr):
            group["lr"] = group_lr
        ref_opt.step()
        for want, have in zip(params, got):
            torch.testing.assert_close(have, want.detach(), rtol=0, atol=0)

    clipped = [c for c in coefs if c is not None]
    if grad_clip == 0.05:
        assert min(norms) > grad_clip and len(clipped) == STEPS
        # The fused and bf16-moment steps scale inside their own pass; foreach needs one.
        assert passes == ([] if folds else [c.item() for c in clipped])
    else:
        assert clipped == [] and passes == []  # the norm never exceeds max_norm: no scaling at all


def test_the_step_leaves_no_grad_scale_behind(tmp_path, monkeypatch):
    """torch's fused AdamW would divide every later step by a stale grad_scale (GradScaler's
    attribute): the clipped step removes it, also when the step raises."""
    t = cpu_trainer(_cfg(0.05, "fused"), tmp_path, monkeypatch)
    t.train_step(token_batches(5))
    assert not hasattr(t.optimizer, "grad_scale")

    def boom(*args, **kwargs):
        raise RuntimeError("step failed")

    monkeypatch.setattr(t.optimizer, "step", boom)
    with pytest.raises(RuntimeError, match="step failed"):
        trainer.optim.clipped_step(t.optimizer, t.model, torch.tensor(0.5))
    assert not hasattr(t.optimizer, "grad_scale")
