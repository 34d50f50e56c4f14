"""FP8 all-gather of the expert weights (moe/fp8/fsdp_all_gather.py): one rank's quantization work.

    python -m bench.fp8_all_gather [--shapes mixtral_8x7b,qwen3_30b_a3b] [--recipes rowwise,blockwise]
        [--ranks 8] [--repeats 5] [--out PATH]

With parallel.fp8_all_gather each rank quantizes only its FSDP shard of every expert weight
(E / ranks experts) and the all-gather carries E4M3; without it every rank quantizes the whole
gathered weight. On one GPU the shard is a slice of the weight (its first E / ranks experts), so
this measures the compute side only; the bytes on the wire are counted, not sent.

Per shape (bench.common.SHAPES: Mixtral-8x7B E=8 H=4096 F=14336, Qwen3-30B-A3B E=128 H=2048
F=768, SwiGLU), recipe and weight (w1 (E, 2F, H), w2 (E, H, F)), from fp32 masters as in training
(quantize_expert_weight: both orientations, the bf16 rounding taken in the kernel):
  ms_whole          quantizing the whole weight: the bf16 path, once per micro-batch's forward
  ms_shard          quantizing one rank's shard: the FP8 path, once per optimizer step
  ms_shard_inputs   the shard quantized and packed into all-gather inputs (padding, the scales
                    in one fp32 tensor): what the FP8 path's pre-all-gather runs on a cache miss
  ms_assemble       the gathered weight unpacked (rowwise: the scales copied out; blockwise: the
                    scales and the bytes transposed for dgrad): once per gather, i.e. in forward
                    and again in backward's re-gather
  shard_speedup     ms_whole / ms_shard
  bytes_*_per_rank  what one rank puts on one all-gather of this weight: E4M3 bytes + fp32 scales,
                    against 2 bytes an element in BF16
  peak_gib_whole    peak allocated memory while the whole weight is quantized, above what was
                    allocated before (outputs and temporaries; the fp32 weight is not counted)
  peak_gib_shard    the same for the shard's all-gather inputs (ms_shard_inputs' call)
Timing: bench.common.time_ms (CUDA events, L2 flushed, median); the whole and shard timings are
interleaved over --repeats rounds, so a slow spell meets both, and each ms_* is the median of its
rounds (ms_*_repeats lists them). Writes bench/results/fp8_all_gather.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from bench.common import GIB, REPO, SHAPES, print_table, require_gpu, run_info, time_ms, write_results
from moe.fp8.fsdp_all_gather import assemble, shard_inputs
from moe.fp8.grouped_mlp import quantize_expert_weight
from moe.fp8.recipe import RECIPES, Fp8Recipe

DEFAULT_SHAPES = ("mixtral_8x7b", "qwen3_30b_a3b")
COLUMNS = ["shape", "recipe", "weight", "experts_per_rank", "ms_whole", "ms_shard", "shard_speedup",
           "ms_shard_inputs", "ms_assemble", "bytes_vs_bf16", "peak_gib_whole", "peak_gib_shard"]  # fmt: skip


def _peak_extra_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / GIB


def bench_one(w_ENK: torch.Tensor, recipe: Fp8Recipe, ranks: int, repeats: int) -> dict:
    E, N, K = w_ENK.shape
    rows = -(-E // ranks)  # FSDP's dim-0 chunk
    shard = w_ENK[:rows]

    def whole():
        return quantize_expert_weight(w_ENK, recipe)

    def one_shard():
        return quantize_expert_weight(shard, recipe)

    def inputs():
        return shard_inputs(quantize_expert_weight(shard, recipe), rows, recipe)

    # What every rank's inputs gathered together look like (the same shard repeated: timing only).
    fp8, scales = inputs()
    gathered = [t.repeat(ranks, 1, 1) for t in fp8], scales.repeat(ranks, 1)

    def unpack():
        return assemble(*gathered, E, recipe)

    t_whole, t_shard = [], []
    for _ in range(repeats):
        t_whole.append(time_ms(whole))
        t_shard.append(time_ms(one_shard))
    ms_whole, ms_shard = statistics.median(t_whole), statistics.median(t_shard)
    scale_elems = scales.shape[1]
    fp8_bytes = rows * (len(fp8) * N * K + 4 * scale_elems)
    bf16_bytes = rows * N * K * 2
    row = {
        "dims": {"E": E, "N": N, "K": K}, "ranks": ranks, "experts_per_rank": rows,
        "ms_whole": ms_whole, "ms_shard": ms_shard, "shard_speedup": ms_whole / ms_shard,
        "ms_shard_inputs": time_ms(inputs), "ms_assemble": time_ms(unpack),
        "bytes_fp8_per_rank": fp8_bytes, "bytes_bf16_per_rank": bf16_bytes, "bytes_vs_bf16": fp8_bytes / bf16_bytes,
        "peak_gib_whole": _peak_extra_gib(whole), "peak_gib_shard": _peak_extra_gib(inputs),
        "ms_whole_repeats": t_whole, "ms_shard_repeats": t_shard,
    }  # fmt: skip
    del gathered, fp8, scales
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--ranks", type=int, default=8, help="FSDP ranks the experts are sharded over")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (their median is ms_*)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "fp8_all_gather.json"))
    args = ap.parse_args(argv)
    shapes, recipes = args.shapes.split(","), args.recipes.split(",")
    for name in shapes:
        if name not in SHAPES:
            ap.error(f"--shapes: unknown shape {name!r}; allowed: {', '.join(SHAPES)}")
    for name in recipes:
        if name not in RECIPES:
            ap.error(f"--recipes: unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    if args.ranks < 1 or args.repeats < 1:
        ap.error(f"--ranks and --repeats must be >= 1, got {args.ranks} and {args.repeats}")
    require_gpu("bench.fp8_all_gather")
    rows = []
    for shape in shapes:
        _, H, F, E, act = SHAPES[shape]
        X = 2 * F if act == "swiglu" else F
        for weight, (N, K) in (("w1", (X, H)), ("w2", (H, F))):
            torch.manual_seed(0)
            w_ENK = torch.randn(E, N, K, device="cuda") * 0.02  # fp32 masters
            for recipe in recipes:
                head = {"shape": shape, "recipe": recipe, "weight": weight}
                try:
                    rows.append({**head, **bench_one(w_ENK, Fp8Recipe(recipe), args.ranks, args.repeats)})
                except Exception as err:  # one row failing must not hide the others' numbers
                    rows.append({**head, "error": f"{type(err).__name__}: {err}"})
                print(rows[-1], flush=True)
            del w_ENK
            gc.collect()
            torch.cuda.empty_cache()
    path = write_results(args.out, {**run_info(), "rows": rows})
    print_table(rows, COLUMNS)
    print(f"wrote {path}" if path else "every row failed: nothing written")


if __name__ == "__main__":
    main()
