"""The experts block, forward + backward, BF16 vs torchao FP8 vs ours, on one Hopper GPU.

    python -m bench.moe_block [--shapes seed,mixtral_8x7b,...] [--impls bf16,rowwise,...] [--out PATH]

Routing is excluded: the block gets rows already grouped by expert and the counts.
  skewed    per-expert weights uniform in [0.5, 1.5) (seeded), normalised; counts multinomial
            over the M rows, so they are not multiples of 16
  balanced  M / E rows per expert
Impls (same bf16 weights and inputs):
  bf16             moe.experts.GroupedMLP: torch._grouped_mm twice, SwiGLU/GELU in between
  torchao_rowwise  torchao's _to_fp8_rowwise_then_scaled_grouped_mm for both GEMMs, the
                   activation in torch between them; it needs group sizes that are multiples of
                   16, so its input is given pre-padded per group (the padding is not timed)
  rowwise, blockwise  moe.fp8.Fp8GroupedMLP; weights are re-quantized every iteration (the cost
                   of one micro-batch per optimizer step, the worst case)
ms: median of CUDA-event timings after warm-up (bench.common.time_ms); tflops: 3 x forward
GEMM FLOPs / time; peak_gib: peak allocated memory during one fwd+bwd, everything alive counted.
Writes bench/results/moe_block.json and prints a table last.
"""

from __future__ import annotations

import argparse
import gc

import torch

from bench.common import SHAPES, GIB, REPO, print_table, run_info, time_ms, write_json
from moe.experts import GroupedMLP, activation_fn
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe

IMPLS = ("bf16", "torchao_rowwise", "rowwise", "blockwise")
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


def bench_one(shape: str, impl: str, routing: str) -> dict:
    M, H, F, E, act = SHAPES[shape]
    counts = routed_counts(M, E, routing)
    torch.manual_seed(0)
    if impl in ("rowwise", "blockwise"):
        mod = Fp8GroupedMLP(H, F, E, act, recipe=Fp8Recipe(impl))
    else:
        mod = GroupedMLP(H, F, E, act)
    mod = mod.cuda().to(torch.bfloat16)
    mod.reset_parameters(0.02)
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    counts_E = counts.cuda()

    if impl == "torchao_rowwise":
        x_pad, offs_pad = _padded_for_torchao(x.detach(), counts)
        x_pad.requires_grad_()
        dy_pad = torch.randn_like(x_pad)

        def step():
            _torchao_block(x_pad, mod.w1, mod.w2, offs_pad, act).backward(dy_pad)
    else:

        def step():
            if impl in ("rowwise", "blockwise"):  # as after an optimizer step
                mod.invalidate_weight_cache()
            mod(x, counts_E).backward(dy)

    step()  # compile / autotune outside the timing
    ms = time_ms(step)
    for p in (x, *mod.parameters()):
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    X = 2 * F if act == "swiglu" else F
    flops = 3 * (2 * M * H * X + 2 * M * F * H)
    row = {"shape": shape, "dims": {"M": M, "H": H, "F": F, "E": E, "act": act}, "impl": impl, "routing": routing,
           "ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak}
    del mod, x, dy
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--routings", default=",".join(ROUTINGS))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "moe_block.json"))
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        for routing in args.routings.split(","):
            base = None
            for impl in args.impls.split(","):
                try:
                    row = bench_one(shape, impl, routing)
                except Exception as err:  # one impl failing must not hide the others' numbers
                    row = {"shape": shape, "impl": impl, "routing": routing, "ms": None, "tflops": None,
                           "peak_gib": None, "error": f"{type(err).__name__}: {err}"[:300]}
                    torch.cuda.empty_cache()
                if impl == "bf16":
                    base = row["ms"]
                row["speedup_vs_bf16"] = base / row["ms"] if base and row["ms"] else None
                rows.append(row)
                print(row, flush=True)
    write_json(args.out, {**run_info(), "rows": rows})
    print_table(rows, ["shape", "routing", "impl", "ms", "tflops", "peak_gib", "speedup_vs_bf16"])


if __name__ == "__main__":
    main()
