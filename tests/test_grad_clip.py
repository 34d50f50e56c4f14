"""Gradient clipping in the trainer (trainer/loop.py, trainer/parallel.py): the norm logged is
the global gradient norm; the gradients the optimizer steps on are torch's clip_grad_norm_ of
them; and the scaling pass runs only on steps whose norm exceeds optim.grad_clip."""

import math

import pytest
import torch
from trainer_helpers import cpu_trainer, tiny_train_config, token_batches

import trainer.loop

STEPS = 3


def _cfg(grad_clip: float):
    c = tiny_train_config(STEPS, grad_accum=2)
    c.optim.grad_clip = grad_clip
    c.validate()
    return c


def _run(grad_clip: float, run_dir, monkeypatch):
    """(grad_norm logged, raw gradients, gradients at the optimizer step, scaling passes) a step."""
    passes = []
    scale = trainer.loop.scale_grads_
    monkeypatch.setattr(trainer.loop, "scale_grads_", lambda model, coef: passes.append(coef.item()) or scale(model, coef))
    t = cpu_trainer(_cfg(grad_clip), run_dir, monkeypatch)
    raw, stepped, step = [], [], t.optimizer.step
    norm_of = trainer.loop.global_grad_norm

    def grads():
        return [p.grad.clone() for p in t.model.parameters() if p.grad is not None]

    def record_norm(model, env):  # the gradients before any clipping
        raw.append(grads())
        return norm_of(model, env)

    monkeypatch.setattr(trainer.loop, "global_grad_norm", record_norm)

    def capture(*args, **kwargs):
        stepped.append(grads())
        return step(*args, **kwargs)

    t.optimizer.step = capture
    it, norms = token_batches(5), []
    for _ in range(STEPS):
        norms.append(t.train_step(it)["grad_norm"])
    return norms, raw, stepped, passes


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("grad_clip", [0.0, 1e6, 0.05], ids=["off", "never_reached", "every_step"])
def test_clipping_is_torch_s_and_scales_only_when_needed(tmp_path, monkeypatch, grad_clip):
    norms, raw, stepped, passes = _run(grad_clip, tmp_path, monkeypatch)
    assert len(norms) == len(raw) == len(stepped) == STEPS
    for norm, g_raw, g_stepped in zip(norms, raw, stepped):
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in g_raw]
        for p, g in zip(ref, g_raw):
            p.grad = g.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, grad_clip if grad_clip > 0 else math.inf)
        assert norm == pytest.approx(ref_norm.item(), rel=1e-5)
        for got, p in zip(g_stepped, ref):
            torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=0)
    if grad_clip == 0.05:
        assert min(norms) > grad_clip and len(passes) == STEPS and all(0 < c < 1 for c in passes)
    else:
        assert passes == []  # the norm never exceeds max_norm: no pass over the gradients
