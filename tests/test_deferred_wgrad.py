"""The FP8 experts' weight gradients deferred to a step's last micro-batch (moe/fp8/deferred_wgrad.py,
run.defer_expert_wgrad) against making them in every micro-batch's backward.

The deferred GEMM sums each micro-batch's segment with that segment's scales, like the per
micro-batch GEMMs whose products autograd adds; rowwise it rescales its accumulator at segment
boundaries (two fp32 roundings a segment for scales that are not powers of two) and the fp32 sums
run in another order, so gradients agree to fp32 rounding (relative 1e-5), not bit for bit.
CPU: the module over three micro-batches of the same shape (one GEMM over all three; rowwise
through the kernels in Triton's interpreter) and of different shapes (the stash makes the earlier
ones' gradient when the shape changes), experts empty in some micro-batches; the trainer over two
steps of three micro-batches; a step whose last backward does not reach the experts is an error,
not lost gradients; DDP over 4 gloo ranks (the all-reduce on the micro-batch whose backward makes
the deferred gradients) against one process over the same tokens.
"""

import pytest
import torch
from test_kernels_gemm import rel_l2
from trainer_helpers import cpu_trainer, steps_and_weights, tiny_train_config, token_batches

from moe.dispatch import ExpertInput
from moe.fp8.deferred_wgrad import WgradStash, deferring_expert_wgrad
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe

RECIPES = ["rowwise", "blockwise"]
SAME_SHAPE = ([5, 0, 17, 40], [0, 0, 32, 30], [29, 1, 0, 32])  # 62 rows each: one GEMM over all three
SHAPES_CHANGE = ([5, 0, 17, 40], [60, 40, 50, 50], [29, 1, 0, 17])  # 62, 200, 47 rows: P 640, 768, 640


def _experts(recipe: str, seed: int = 5) -> Fp8GroupedMLP:
    torch.manual_seed(seed)
    ffn = 128 if recipe == "blockwise" else 96  # blockwise: 128x128 weight blocks
    m = Fp8GroupedMLP(128, ffn, 4, recipe=Fp8Recipe(recipe))
    m.reset_parameters(0.05)
    return m


def _batches(sizes, seed: int = 6) -> list[ExpertInput]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        counts = torch.tensor(s)
        x = torch.randn(int(counts.sum()), 128, generator=gen).to(torch.bfloat16)
        out.append(ExpertInput(x=x, tokens_per_expert_E=counts))
    return out


def _grads(recipe: str, sizes, defer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m = _experts(recipe)
    with deferring_expert_wgrad(m, len(sizes), defer) as mark_last:
        for i, inp in enumerate(_batches(sizes)):
            mark_last(i == len(sizes) - 1)
            m(inp).float().square().mean().backward()
            if defer and i < len(sizes) - 1 and sizes is SAME_SHAPE:
                assert m.w1.grad is None and m.w2.grad is None, "no gradient before the last micro-batch"
                assert m.wgrad_stash.pending() == ["w2", "w1"]
    assert m.wgrad_stash is None
    return m.w1.grad, m.w2.grad


@pytest.mark.parametrize("sizes", [SAME_SHAPE, SHAPES_CHANGE], ids=["same_shape", "shapes_change"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_module_defers_with_the_same_gradients(recipe, sizes, monkeypatch):
    """Same shapes: one segmented GEMM a weight over all three micro-batches, at the last. Shapes
    that change (P 640, 768, 640): each micro-batch's gradient made when the next one's differs.
    Rowwise at the same shapes through the kernels (the interpreter), the rest through their
    references (the stash's logic is the same on both; the kernels' own tests are
    tests/test_wgrad_segments.py)."""
    import moe.fp8.deferred_wgrad as deferred

    if recipe != "rowwise" or sizes is not SAME_SHAPE:
        monkeypatch.setenv("TRITON_INTERPRET", "0")

    calls = []
    real = deferred.fp8_grouped_mm_wgrad_segments
    monkeypatch.setattr(deferred, "fp8_grouped_mm_wgrad_segments",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))  # fmt: skip
    want, got = _grads(recipe, sizes, defer=False), _grads(recipe, sizes, defer=True)
    assert calls == ([3, 3] if sizes is SAME_SHAPE else [1] * 6)  # w2 then w1 at each flush
    for w, g in zip(want, got):
        assert g.dtype == torch.float32 and rel_l2(g, w) < 1e-5


def test_a_step_whose_last_backward_misses_the_experts_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the references: only the stash's bookkeeping is tested
    m = _experts("rowwise")
    with pytest.raises(RuntimeError, match="stashed for .*Fp8GroupedMLP.w2"):
        with deferring_expert_wgrad(m, 2, True) as mark_last:
            mark_last(False)
            m(_batches(SAME_SHAPE[:1])[0]).float().square().mean().backward()
    assert m.wgrad_stash is None
    with pytest.raises(ValueError, match="micro_batches >= 2"):
        WgradStash(1)


@pytest.mark.parametrize("recipe", RECIPES)
def test_trainer_steps_match_with_and_without_deferral(recipe, tmp_path, monkeypatch):
    """2 steps of 3 micro-batches: losses, gradient norms and weights within fp32 rounding (the
    kernels' references: the interpreter would take minutes, and the module test above runs it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    runs = {}
    for defer in (False, True):
        cfg = tiny_train_config(2, grad_accum=3)
        cfg.fp8.experts, cfg.run.defer_expert_wgrad = recipe, defer
        if recipe == "blockwise":
            cfg.model.dim = cfg.model.moe.ffn_dim = 128
        cfg.validate()
        t = cpu_trainer(cfg, tmp_path / str(defer), monkeypatch)
        runs[defer] = steps_and_weights(t, 2, token_batches(7))
        assert all(getattr(m, "wgrad_stash", None) is None for m in t.model.modules())
    for (loss, norm), (loss_d, norm_d) in zip(*(runs[d][0] for d in (False, True))):
        assert loss_d == pytest.approx(loss, rel=1e-6) and norm_d == pytest.approx(norm, rel=1e-5)
    for want, got in zip(runs[False][1], runs[True][1]):
        assert rel_l2(got, want) < 1e-5


# ---- DDP over gloo ------------------------------------------------------------------------------


def _per_step_batches(seeds: list[int], accum: int, steps: int) -> list[list[dict]]:
    """Each seed's micro-batches, `accum` a step: [step][seed * accum + micro]."""
    its = [token_batches(s) for s in seeds]
    return [[next(it) for it in its for _ in range(accum)] for _ in range(steps)]


def _run(cfg, run_dir, env, batches) -> tuple[list, list[torch.Tensor]]:
    import types

    import trainer.loop

    trainer.loop.build_train_valid = lambda *a, **k: types.SimpleNamespace(check_model_vocab=lambda v: None,
                                                                           valid=None)  # fmt: skip
    flat = iter([micro for step in batches for micro in step])  # each step takes its accum micro-batches in order
    return steps_and_weights(trainer.loop.Trainer(cfg, str(run_dir), env), len(batches), flat)


def _ddp_rank(rank, world, run_dir):
    from ep_helpers import _close, _env

    from trainer.parallel import DistEnv

    def cfg(accum, defer):
        c = tiny_train_config(2, grad_accum=accum)
        c.fp8.experts, c.run.defer_expert_wgrad = "rowwise", defer
        c.validate()
        return c

    mine = [step[rank * 2:(rank + 1) * 2] for step in _per_step_batches(list(range(world)), 2, 2)]
    one = _run(cfg(2 * world, False), f"{run_dir}/one{rank}", DistEnv(0, 1, 0, torch.device("cpu")),
               _per_step_batches(list(range(world)), 2, 2))  # fmt: skip
    for defer in (True, False):
        got = _run(cfg(2, defer), f"{run_dir}/ddp{defer}{rank}", _env(world, 1), mine)
        for (loss, norm), (loss_g, norm_g) in zip(one[0], got[0]):
            assert loss_g == pytest.approx(loss, rel=1e-5) and norm_g == pytest.approx(norm, rel=1e-4), (defer, rank)
        for i, (want, have) in enumerate(zip(one[1], got[1])):
            _close(have, want, f"defer={defer} parameter {i}")


@pytest.mark.slow
def test_ddp_four_ranks_with_deferred_wgrad_matches_one_process(tmp_path):
    """4 ranks x 2 micro-batches (the all-reduce on the last, whose backward makes the deferred
    gradients) against one process of 8 micro-batches over the same tokens, with and without
    deferral: 2 steps' losses, gradient norms and weights within fp32 summation order."""
    from ep_helpers import _spawn

    _spawn(_ddp_rank, 4, str(tmp_path))
