"""One AdamW step over a model's parameters on one GPU: torch's fused AdamW with fp32 moments (the
baseline) against our kernel's (trainer/fused_adamw.py, kernels/adamw.py) with fp32 moments
(ours_fp32: the trainer's default) or bf16 ones (optim.state_dtype=bfloat16).

    python -m bench.optim_step [--models mixtral_2layer,parity_300m] [--impls fused_fp32,ours_fp32]
                               [--out PATH]

Models (their parameters' shapes, from a meta-device build of the trainer's own model):
  mixtral_2layer  configs/experiment/mixtral_2layer_bench.yaml (Mixtral-8x7B width, 2 layers)
  parity_300m     configs/experiment/parity_300m.yaml
Impls, over fp32 parameters and fp32 gradients (random, made once):
  fused_fp32      torch.optim.AdamW(fused=True): 28 bytes moved a parameter, 8 bytes of state
  foreach_fp32    torch.optim.AdamW(foreach=True), the trainer's optim.fused=false
  ours_fp32       FusedAdamW(state_dtype=torch.float32): 28 bytes moved a parameter, 8 of state
  bf16_moments    FusedAdamW: 20 bytes moved a parameter, 4 bytes of state
Timing: bench.common.time_ms (CUDA events, L2 flushed, warm-up, median) of optimizer.step(), the
impls (each its own optimizer and state over one set of parameters and gradients) interleaved
over ROUNDS rounds, the median of those medians. gbps: the bytes each impl must move (above) over
its time, beside the device's copy bandwidth (bench.common.copy_gbps). state_gib: the optimizer's
tensors; held_gib: the parameters, gradients and that state (what training holds for them);
step_extra_gib: the peak allocated during a step above what was allocated before it (temporaries).
ratio: the first impl's ms (fused_fp32 by default) over the impl's.
Writes bench/results/optim_step.json and prints a table last; refuses without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from bench.common import (GIB, REPO, comma_choices, copy_gbps, failed_row, print_table, require_gpu, run_info, time_ms,
                          write_results)

MODELS = ("mixtral_2layer", "parity_300m")  # bench/train_step.py's models of those names
# name -> bytes moved a parameter
IMPLS = {"fused_fp32": 28, "foreach_fp32": 28, "ours_fp32": 28, "bf16_moments": 20}
ROUNDS = 3


def shapes(model: str) -> list[torch.Size]:
    """The trainer's parameters of `model`, from a meta-device build (nothing allocated)."""
    from bench.train_step import compose_config
    from trainer.memory_plan import meta_model

    return [p.shape for p in meta_model(compose_config(model, "bf16", steps=1, extra=[])).parameters()]


def _optimizer(impl: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    from trainer.fused_adamw import FusedAdamW

    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if impl in ("ours_fp32", "bf16_moments"):
        return FusedAdamW(params, **kw, state_dtype=torch.float32 if impl == "ours_fp32" else torch.bfloat16)
    return torch.optim.AdamW(params, **kw, **({"fused": True} if impl == "fused_fp32" else {"foreach": True}))


def _state_gib(opt: torch.optim.Optimizer) -> float:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.is_cuda) / GIB  # fmt: skip


def bench_model(model: str, impls: list[str]) -> list[dict]:
    """Every impl's optimizer over the same parameters and gradients (each keeps its own state),
    stepped in turn: the weights drift, which changes no timing."""
    param_shapes = shapes(model)
    n = sum(s.numel() for s in param_shapes)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen).requires_grad_() for s in param_shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    opts = {impl: _optimizer(impl, params) for impl in impls}
    extra = {}
    for impl, opt in opts.items():
        opt.step()  # the state exists from here
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        extra[impl] = (torch.cuda.max_memory_allocated() - before) / GIB
    times = {impl: [] for impl in impls}
    for _ in range(ROUNDS):
        for impl, opt in opts.items():
            times[impl].append(time_ms(opt.step))
    base = statistics.median(times[impls[0]])
    weights = 2 * 4 * n / GIB  # fp32 parameters and gradients
    rows = []
    for impl, opt in opts.items():
        ms = statistics.median(times[impl])
        rows.append({"model": model, "impl": impl, "params": n, "ms": ms, "gbps": IMPLS[impl] * n / ms / 1e6,
                     "ratio": base / ms, "state_gib": _state_gib(opt), "held_gib": weights + _state_gib(opt),
                     "step_extra_gib": extra[impl]})  # fmt: skip
    del opts, params
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    # At Mixtral width two impls at a time fit 80 GB (each holds its own state beside the shared
    # parameters and gradients): --impls fused_fp32,bf16_moments for the bf16 moments.
    ap.add_argument("--impls", default="fused_fp32,ours_fp32",
                    help=f"comma list of {list(IMPLS)}, the first the reference of `ratio`")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "optim_step.json"))
    args = ap.parse_args(argv)
    models, impls = comma_choices("--models", args.models, MODELS), comma_choices("--impls", args.impls, IMPLS)
    require_gpu("bench.optim_step")
    rows = []
    for model in models:
        try:
            rows += bench_model(model, impls)
        except Exception as err:  # one failing model keeps the others' rows
            rows.append(failed_row({"model": model}, err))
    write_results(args.out, {**run_info(), "copy_gbps": copy_gbps(), "rounds": ROUNDS, "rows": rows})
    print_table(rows, ["model", "impl", "params", "ms", "gbps", "ratio", "state_gib", "held_gib", "step_extra_gib",
                       "error"])  # fmt: skip


if __name__ == "__main__":
    main()
