"""run.compile_mode=reduce-overhead: each compiled block's forward and backward replayed as CUDA
graphs (trainer/loop.py). Replaying changes no arithmetic, so the steps must match the same blocks
compiled without graphs; what it can break is an input or output the replay does not refresh, which
shows as a different loss from the second step on. On the CPU, the plumbing; config refusals:
tests/test_input_errors.py."""

import pytest
import torch
from trainer_helpers import cpu_trainer, tiny_train_config, token_batches


def _steps(mode: str, experts: str, tmp_path, monkeypatch) -> tuple[list[tuple[float, float]], int]:
    """3 steps of 2 micro-batches on the GPU, blocks compiled in `mode`: (loss, grad norm) per
    step, and the CUDA graph launches the profiler saw in the last step."""
    cfg = tiny_train_config(3, grad_accum=2)
    cfg.run.device, cfg.run.compile, cfg.run.compile_mode = "cuda", True, mode
    cfg.fp8.experts = experts
    cfg.model.dim = cfg.model.moe.ffn_dim = 128  # the blockwise recipe's 128x128 weight blocks
    cfg.validate()
    t = cpu_trainer(cfg, tmp_path / mode, monkeypatch, device="cuda")
    it = token_batches(3)
    stats = [t.train_step(it) for _ in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stats.append(t.train_step(it))
    launches = sum(e.count for e in prof.key_averages() if e.key == "cudaGraphLaunch")
    return [(s["loss"], s["grad_norm"]) for s in stats], launches


@pytest.mark.gpu
@pytest.mark.parametrize("experts", ["bf16", "blockwise"])
def test_cuda_graph_steps_match_compiled_steps(experts, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs, launches = _steps("reduce-overhead", experts, tmp_path, monkeypatch)
    assert counters["inductor"]["cudagraph_skips"] == 0  # no block fell back to launching kernels
    # 2 blocks x (forward + backward) x 2 micro-batches, at least
    assert launches >= 8, launches
    torch._dynamo.reset()
    plain, none = _steps("default", experts, tmp_path, monkeypatch)
    assert none == 0
    # The same kernels in the same order; scatter-adds with atomics make GPU runs differ in the last
    # bits (~1e-6 after 3 steps), a stale replay input by orders of magnitude more.
    torch.testing.assert_close(graphs, plain, rtol=1e-4, atol=0)


def test_blocks_compile_in_the_mode_and_each_forward_starts_a_round(tmp_path, monkeypatch):
    """The plumbing, on the CPU: every block compiled in run.compile_mode, one
    `cudagraph_mark_step_begin` per forward (2 micro-batches: 2) and gradients kept, zeroed, after
    the step; neither in the default mode."""
    for mode, rounds in (("reduce-overhead", 2), ("default", 0)):
        modes, marks = [], []
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw["mode"]))
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        cfg = tiny_train_config(1, grad_accum=2)
        cfg.run.compile, cfg.run.compile_mode = True, mode
        cfg.validate()
        t = cpu_trainer(cfg, tmp_path / mode, monkeypatch)
        t.train_step(token_batches(1))
        assert modes == [mode] * cfg.model.n_layers
        assert len(marks) == rounds
        # With graphs the gradients outlive the step, zeroed: backward adds each replay into them.
        grads = [p.grad for p in t.model.parameters()]
        if mode == "reduce-overhead":
            assert all(g is not None and not g.any() for g in grads)
        else:
            assert all(g is None for g in grads)
