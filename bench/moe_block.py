"""The experts block, forward + backward, BF16 vs torchao FP8 vs ours, on one Hopper GPU.

    python -m bench.moe_block [--shapes seed,mixtral_8x7b,...] [--impls bf16,rowwise,...] [--out PATH]

Routing is excluded: the block gets rows already grouped by expert and the counts.
  skewed    per-expert weights uniform in [0.5, 1.5) (seeded), normalised; counts multinomial
            over the M rows, so they are not multiples of 16
  balanced  M / E rows per expert
Weights (--weights): fp32 (default) fp32 master weights under bf16 autocast, as train.py runs the
                   experts: BF16 casts them to bf16 in every forward (and keeps those copies for
                   backward), the FP8 impls quantize them; bf16: bf16 parameters, no cast at all
                   (Megatron-style bf16 params with the fp32 copy in the optimizer)
Impls (same weights and inputs):
  bf16             moe.experts.GroupedMLP: torch._grouped_mm twice, SwiGLU/GELU in between
  torchao_rowwise  torchao's _to_fp8_rowwise_then_scaled_grouped_mm for both GEMMs, the
                   activation in torch between them; it needs group sizes that are multiples of
                   16, so its input is given pre-padded per group (the padding is not timed)
  rowwise, blockwise  moe.fp8.Fp8GroupedMLP; weights are re-quantized every iteration (the cost
                   of one micro-batch per optimizer step, the worst case)
  rowwise_compiled, blockwise_compiled  the same module under torch.compile (issue 5: eager
                   within 5% of compiled); not in the default list, ask for them by name
ms: the median of --repeats (3) measurements, each the median of CUDA-event timings over
_TIMING's 500 ms after warm-up (bench.common.time_ms), listed in ms_repeats: one H200 run at
12665eb timed Mixtral rowwise at 29.3 ms where the same row took 26.0 a minute later (a slow
spell of the machine; single measurements of that row spread 25.9-29.3 over four runs), and at
a0beeba, with 100 ms per measurement (3 steps of ~28 ms), its three measurements were 28.7 /
26.3 / 28.2; tflops: 3 x forward
GEMM FLOPs / time; peak_gib: peak allocated memory during one fwd+bwd, everything alive counted;
ms_weights_cached (FP8 eager rows): the same step reusing the FP8 weights, as every micro-batch of
a step after the first does (with n micro-batches: ms + (n - 1) * ms_weights_cached per step).
Writes bench/results/moe_block.json and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from bench.common import SHAPES, GIB, REPO, print_table, require_gpu, run_info, time_ms, write_results
from moe.dispatch import ExpertInput
from moe.experts import GroupedMLP, activation_fn
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe

IMPLS = ("bf16", "torchao_rowwise", "rowwise", "blockwise")
COMPILED = ("rowwise_compiled", "blockwise_compiled")
WEIGHTS = ("fp32", "bf16")
ROUTINGS = ("skewed", "balanced")


def routed_counts(M: int, E: int, routing: str, seed: int = 0) -> torch.Tensor:
    if routing == "balanced":
        assert M % E == 0
        return torch.full((E,), M // E, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(E, generator=g) + 0.5
    picks = torch.multinomial(weights / weights.sum(), M, replacement=True, generator=g)
    return torch.bincount(picks, minlength=E)


def _torchao_block(x_pad, w1, w2, offs_pad, activation):
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm

    mm = lambda a, w: _to_fp8_rowwise_then_scaled_grouped_mm(  # noqa: E731
        a, w.transpose(-2, -1), offs_pad, out_dtype=torch.bfloat16, pad_token_groups_for_grouped_mm=False
    )
    return mm(activation_fn(mm(x_pad, w1), activation), w2)


def _padded_for_torchao(x_MH: torch.Tensor, counts: torch.Tensor, align: int = 16):
    padded = (counts + align - 1) // align * align
    out = x_MH.new_zeros(int(padded.sum()), x_MH.shape[1])
    src = dst = 0
    for n, p in zip(counts.tolist(), padded.tolist()):
        out[dst : dst + n] = x_MH[src : src + n]
        src, dst = src + n, dst + p
    return out, torch.cumsum(padded, 0).to(torch.int32).cuda()


# ~18 steps at Mixtral's 28 ms (the default 100 ms gave 3), ~75 at Qwen3's 6.7: a slow spell of a
# second or two moves one measurement's median less, and the median of three moves it little.
_TIMING = dict(warmup_ms=100, rep_ms=500)


def bench_one(shape: str, impl: str, routing: str, weights: str = "fp32", profile: bool = False,
              repeats: int = 3) -> dict:
    M, H, F, E, act = SHAPES[shape]
    counts = routed_counts(M, E, routing)
    torch.manual_seed(0)
    recipe = impl.removesuffix("_compiled")
    with torch.device("cuda"):  # built on the GPU: a CPU init of 1.4G parameters takes seconds
        if recipe in ("rowwise", "blockwise"):
            mod = Fp8GroupedMLP(H, F, E, act, recipe=Fp8Recipe(recipe))
        else:
            mod = GroupedMLP(H, F, E, act)
    mod = mod.to(torch.float32 if weights == "fp32" else torch.bfloat16)
    mod.reset_parameters(0.02)
    run = torch.compile(mod) if impl in COMPILED else mod
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    counts_E = counts.cuda()
    params = [x, *mod.parameters()]

    if impl == "torchao_rowwise":
        x_pad, offs_pad = _padded_for_torchao(x.detach(), counts)
        x_pad.requires_grad_()
        params.append(x_pad)
        dy_pad = torch.randn_like(x_pad)

        def step():
            for p in params:
                p.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                y = _torchao_block(x_pad, mod.w1, mod.w2, offs_pad, act)
            y.backward(dy_pad)
    else:

        def step():
            # As a training step with one micro-batch: gradients start from None (the optimizer's
            # zero_grad), so they are assigned, not accumulated; the FP8 impls quantize the
            # weights in every forward (Fp8GroupedMLP.cache_weights=False, the default).
            for p in params:
                p.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                y = run(ExpertInput(x, counts_E))
            y.backward(dy)

    step()  # compile / autotune outside the timing
    # Micro-batches after the first of an optimizer step reuse the FP8 weights: with gradient
    # accumulation over n micro-batches a step costs ms + (n - 1) * ms_weights_cached.
    cached = recipe in ("rowwise", "blockwise") and impl == recipe
    times, times_cached = [], []
    for _ in range(repeats):  # the two timings interleaved, so a slow spell meets both
        times.append(time_ms(step, **_TIMING))
        if cached:
            mod.cache_weights = True
            times_cached.append(time_ms(step, **_TIMING))
            mod.cache_weights = False
            mod.invalidate_weight_cache()
    ms = statistics.median(times)
    ms_cached = statistics.median(times_cached) if cached else None
    if profile:
        _print_kernel_breakdown(f"{shape} {routing} {impl} weights={weights}", step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    X = 2 * F if act == "swiglu" else F
    flops = 3 * (2 * M * H * X + 2 * M * F * H)
    row = {"shape": shape, "dims": {"M": M, "H": H, "F": F, "E": E, "act": act}, "impl": impl, "routing": routing,
           "weights": weights, "ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak,
           "ms_weights_cached": ms_cached, "ms_repeats": times}
    del mod, x, dy
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _print_kernel_breakdown(title: str, step, top: int = 14) -> None:
    """GPU time per kernel over 3 steps (torch.profiler), the largest first: where the ms go."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total_us = sum(e.device_time_total for e in events) / 3
    print(f"== kernels: {title}: {total_us / 1e3:.2f} ms of GPU time per step", flush=True)
    for e in events[:top]:
        print(f"  {e.device_time_total / 3e3:8.3f} ms  x{e.count // 3:<3d} {e.key[:100]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--weights", default="fp32", choices=WEIGHTS)
    ap.add_argument("--profile", action="store_true", help="print each row's GPU time per kernel")
    ap.add_argument("--repeats", type=int, default=3, help="timings per row (their median is ms)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "moe_block.json"))
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    require_gpu("bench.moe_block")
    rows = []
    for shape in args.shapes.split(","):
        for routing in args.routings.split(","):
            base = None
            for impl in args.impls.split(","):
                try:
                    row = bench_one(shape, impl, routing, args.weights, args.profile, args.repeats)
                except Exception as err:  # one impl failing must not hide the others' numbers
                    row = {"shape": shape, "impl": impl, "routing": routing, "weights": args.weights,
                           "ms": None, "tflops": None, "peak_gib": None,
                           "error": f"{type(err).__name__}: {err}"[:300]}
                    torch.cuda.empty_cache()
                if impl == "bf16":
                    base = row["ms"]
                row["speedup_vs_bf16"] = base / row["ms"] if base and row["ms"] else None
                rows.append(row)
                print(row, flush=True)
    if write_results(args.out, {**run_info(), "rows": rows}) is None:
        raise SystemExit(f"every row failed: {args.out} left as it was")
    print_table(rows, ["shape", "routing", "impl", "ms", "ms_weights_cached", "tflops", "peak_gib", "speedup_vs_bf16"])


if __name__ == "__main__":
    main()
