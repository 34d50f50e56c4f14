"""Where a training step's GPU time goes, by kernel family, per bench model and recipe, on one GPU.

    python -m bench.step_profile [--models mixtral_2layer,parity_300m,qwen3_slice]
        [--impls bf16,rowwise,blockwise,bf16_forward_cast] [--warmup 2] [--steps 2] [--timed 3]
        [--out PATH] [--scratch DIR]

Models and impls are bench/train_step.py's (MODELS, IMPLS: the same configs and Trainer, synthetic
tokens); bf16_forward_cast is the BF16 step as it was before run.weight_cast and optim.fused, so
its rows against bf16's show what those changed. Per row: `--warmup` untimed steps (autotuning),
`--timed` steps timed with CUDA events and no profiler (step_ms, their median), then
torch.profiler (CPU + CUDA) over one discarded step and `--steps` recorded ones, a device
synchronisation closing them (profiled_step_ms: their wall time, the profiler's overhead in it).
Their kernels are summed by family (bench/kernel_families.py: the families, how names map to
them): ms_<family> per step and share_<family> of profiled_step_ms, idle = profiled step wall
time - the union of every kernel's interval (the GPU waiting for the host: launches, the step's
one host synchronisation). top_kernels lists each family's largest kernels by name.
The Chrome traces stay in --scratch (<model>-<impl>.json.gz) for a look in https://ui.perfetto.dev.
Writes bench/results/step_profile.json after every row ("complete": false until the last) and
prints the table last; refuses without a CUDA GPU before writing anything. The default rows take
~3-4 min on an H100 (building each model and its FP8 autotuning dominate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch

from bench import train_step
from bench.common import GIB, REPO, failed_row, print_table, require_gpu, run_info, write_results
from bench.kernel_families import FAMILIES, gpu_events, load_trace, summarize

DEFAULT_MODELS = ("mixtral_2layer", "parity_300m", "qwen3_slice")
COLUMNS = ["model", "impl", "step_ms", "profiled_step_ms", "busy_ms"]


def profile_steps(trainer, train_iter, steps: int, trace_path: str, cuda: bool = True) -> float:
    """Profile `steps` training steps after one discarded one (the profiler's own start-up);
    write their Chrome trace to trace_path; return their wall-clock microseconds. cuda=False:
    CPU activity only (tests)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    wall_us = 0.0
    with torch.profiler.profile(activities=activities, schedule=schedule,
                                on_trace_ready=lambda p: p.export_chrome_trace(trace_path)) as prof:  # fmt: skip
        trainer.train_step(train_iter)
        sync()
        prof.step()  # recording from here
        t0 = time.perf_counter()
        for i in range(steps):
            trainer.train_step(train_iter)
            if i == steps - 1:  # before the last prof.step(), which stops recording
                sync()
                wall_us = (time.perf_counter() - t0) * 1e6
            prof.step()
    return wall_us


def profile_row(model: str, impl: str, warmup: int, steps: int, timed: int, extra: list[str],
                scratch: str) -> dict:
    with train_step.warm_trainer(model, impl, warmup, timed + 1 + steps, extra, scratch,
                                 "bench/step_profile.py") as (cfg, trainer, train_iter):  # fmt: skip
        step_ms = statistics.median(train_step.timed_steps_ms(trainer, train_iter, timed))
        trace_path = os.path.join(scratch, f"{model}-{impl}.json.gz")
        wall_us = profile_steps(trainer, train_iter, steps, trace_path)
        summary = summarize(gpu_events(load_trace(trace_path)), wall_us, steps)
        return {
            "model": model,
            "impl": impl,
            "step_ms": step_ms,
            "profiled_step_ms": summary.pop("wall_ms"),
            **summary,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "tokens_per_step": trainer.global_batch * cfg.run.seq_len,
            "trace": os.path.basename(trace_path),  # in --scratch
        }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    models_all, impls_all = list(train_step.MODELS), list(train_step.IMPLS)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {models_all}")
    parser.add_argument("--impls", default=",".join(impls_all), help=f"comma-separated, of {impls_all}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, autotune)")
    parser.add_argument("--timed", type=int, default=3, help="steps timed without the profiler (step_ms)")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every row")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "step_profile.json"))
    parser.add_argument("--scratch", default="/tmp/fp8moe_bench_step_profile",
                        help="the traces, and the run directory the trainer is given")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    for name, picked, allowed in (("--models", models, models_all), ("--impls", impls, impls_all)):
        bad = [v for v in picked if v not in allowed]
        if bad or not picked:
            parser.error(f"{name}: unknown {bad or picked}; allowed {allowed}")
    if min(args.warmup, args.timed, args.steps) < 1:
        parser.error("--warmup, --timed and --steps must be >= 1")
    require_gpu("bench.step_profile")
    os.makedirs(args.scratch, exist_ok=True)

    info = {**run_info(), "warmup": args.warmup, "timed": args.timed, "steps": args.steps,
            "overrides": list(args.override), "families": [*FAMILIES, "idle"]}  # fmt: skip
    rows = []
    for model in models:
        for impl in impls:
            try:
                row = profile_row(model, impl, args.warmup, args.steps, args.timed, list(args.override), args.scratch)
            except Exception as err:  # one broken recipe must not lose the other rows
                traceback.print_exc()
                row = failed_row({**dict.fromkeys(COLUMNS), "model": model, "impl": impl}, err)
            rows.append(row)
            print({k: row.get(k) for k in COLUMNS}, flush=True)
            write_results(args.out, {**info, "complete": False, "rows": rows})
    path = write_results(args.out, {**info, "complete": True, "rows": rows})
    print(f"wrote {path}" if path else f"every row failed: {args.out} left as it was")
    print("milliseconds a step by kernel family (idle: the GPU waiting, within the profiled step)")
    print_table(rows, [*COLUMNS, *(f"ms_{f}" for f in (*FAMILIES, "idle"))])
    print("share of the profiled step")
    print_table(rows, ["model", "impl", *(f"share_{f}" for f in (*FAMILIES, "idle"))])
    failed = [f"{r['model']}/{r['impl']}" for r in rows if r.get("error")]
    if failed:
        sys.exit(f"rows that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
