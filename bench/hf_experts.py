"""A transformers Qwen3-MoE block at Qwen3-30B-A3B width, forward + backward in eager mode, its experts
run by transformers (eager, grouped_mm) and by this project's FP8 experts (interop/hf_experts.py).

    python -m bench.hf_experts [--impls grouped_mm,eager,fp8_rowwise,fp8_blockwise] [--tokens 8192]
                               [--weights bf16|fp32] [--repeats 3] [--out PATH]

The block is transformers' own Qwen3MoeSparseMoeBlock, router included (softmax top-8 of 128 experts,
renormalised; dim 2048, moe ffn 768), built on the GPU with random weights (std 0.02); x is --tokens
tokens of randn, the output gradient randn. One block serves every row (the same weights, switched
with its config's experts implementation), so the rows differ only in how the experts run.
Weights (--weights):
  bf16 (default)  bf16 parameters, no autocast: grouped_mm computes in the weights' dtype, so this
                  is its bf16 path
  fp32            fp32 parameters under bf16 autocast (the Trainer's bf16=True); grouped_mm then
                  runs its GEMMs in fp32
Each row: ms (the median of --repeats measurements, each bench.common.time_ms over 500 ms after
warm-up), tflops (3 x the experts' forward GEMM FLOPs / ms), peak_gib (peak allocated memory during
one step, everything alive counted), speedup_vs_grouped_mm and speedup_vs_eager (their ms / this
row's), and err_out, err_dx, err_dgate_up, err_ddown, err_drouter: the relative L2 distance of the
output and of each gradient (input, gate_up_proj, down_proj, router weight) from grouped_mm's;
within_tolerance: every err below TOLERANCE (tests/test_hf_experts.py says where it comes from).
Writes bench/results/hf_experts.json and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import torch

from bench.common import GIB, REPO, print_table, require_gpu, run_info, time_ms, write_results

IMPLS = ("grouped_mm", "eager", "fp8_rowwise", "fp8_blockwise")
WEIGHTS = ("bf16", "fp32")
DIMS = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)  # Qwen3-30B-A3B
TOLERANCE = 0.08  # FP8 (E4M3) against an unquantized computation of the same block
GRADS = ("dx", "dgate_up", "ddown", "drouter")
_TIMING = dict(warmup_ms=100, rep_ms=500)


def build_block(weights: str, device: str = "cuda"):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**DIMS, norm_topk_prob=True)
    with torch.device(device):  # built on the GPU: a CPU init of 600M parameters takes seconds
        block = Qwen3MoeSparseMoeBlock(cfg)
    block = block.to(torch.bfloat16 if weights == "bf16" else torch.float32)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block


def set_impl(block, impl: str) -> None:
    from interop.hf_experts import use_fp8_experts

    if impl.startswith("fp8_"):
        use_fp8_experts(block, impl.removeprefix("fp8_"))
    else:
        block.experts.config._experts_implementation = impl


def _rel(a: torch.Tensor, b_cpu: torch.Tensor) -> float:
    b = b_cpu.to(a.device, torch.float32)
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_impl(block, impl: str, x, dout, weights: str, repeats: int) -> tuple[dict, dict]:
    """The row, and this row's output and gradients (host copies) for the comparison."""
    set_impl(block, impl)
    params = [x, *block.parameters()]
    autocast = weights == "fp32"

    def step():
        # A training step with one micro-batch: gradients start from None (the optimizer's
        # zero_grad); the FP8 rows quantize the weights in every forward.
        for p in params:
            p.grad = None
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out = block(x)
        out.backward(dout)
        return out

    step()  # Triton autotuning and compilation outside the timing
    times = [time_ms(step, **_TIMING) for _ in range(repeats)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    e = block.experts
    result = {"out": out.detach(), "dx": x.grad, "dgate_up": e.gate_up_proj.grad, "ddown": e.down_proj.grad,
              "drouter": block.gate.weight.grad}  # fmt: skip
    T, H = x.shape[0] * x.shape[1], DIMS["hidden_size"]
    M, F = T * DIMS["num_experts_per_tok"], DIMS["moe_intermediate_size"]
    flops = 3 * (2 * M * H * 2 * F + 2 * M * F * H)
    ms = statistics.median(times)
    row = {"impl": impl, "weights": weights, "tokens": T, "ms": ms, "ms_repeats": times, "tflops": flops / ms / 1e9,
           "peak_gib": peak}  # fmt: skip
    return row, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--weights", default="bf16", choices=WEIGHTS)
    ap.add_argument("--repeats", type=int, default=3, help="timings per row (their median is ms)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hf_experts.json"))
    args = ap.parse_args()
    impls = args.impls.split(",")
    bad = [i for i in impls if i not in IMPLS]
    if bad or args.repeats < 1 or args.tokens < 1:
        ap.error(f"--impls from {IMPLS} (got {bad}), --repeats >= 1 and --tokens >= 1")
    require_gpu("bench.hf_experts")
    block = build_block(args.weights)
    g = torch.Generator(device="cuda").manual_seed(1)
    # The residual stream: bf16 in a bf16 model, fp32 in an fp32 one under autocast.
    dtype = torch.bfloat16 if args.weights == "bf16" else torch.float32
    x = torch.randn(1, args.tokens, DIMS["hidden_size"], device="cuda", dtype=dtype, generator=g).requires_grad_()
    dout = torch.randn(1, args.tokens, DIMS["hidden_size"], device="cuda", dtype=dtype, generator=g)
    with torch.no_grad():
        _, _, ids_TA = block.gate(x.detach().view(-1, DIMS["hidden_size"]))
    load_E = torch.bincount(ids_TA.reshape(-1), minlength=DIMS["num_experts"]).float()
    routing = {"max_over_mean": (load_E.max() / load_E.mean()).item(), "idle_experts": int((load_E == 0).sum())}
    ordered = sorted(impls, key=lambda i: i != "grouped_mm")  # grouped_mm first: the reference
    rows, ref = [], None
    for impl in ordered:
        try:
            row, result = bench_impl(block, impl, x, dout, args.weights, args.repeats)
            if impl == "grouped_mm":
                ref = {k: v.cpu() for k, v in result.items()}
            elif ref is not None:
                errs = {f"err_{k}": _rel(v, ref[k]) for k, v in result.items()}
                row.update(errs, within_tolerance=all(e < TOLERANCE for e in errs.values()))
            del result
        except Exception as err:  # one impl failing must not hide the others' numbers
            row = {"impl": impl, "weights": args.weights, "ms": None, "peak_gib": None,
                   "error": f"{type(err).__name__}: {err}"[:300]}  # fmt: skip
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)
    base = {r["impl"]: r["ms"] for r in rows}
    for row in rows:
        for name in ("grouped_mm", "eager"):
            row[f"speedup_vs_{name}"] = base[name] / row["ms"] if base.get(name) and row["ms"] else None
    payload = {**run_info(), "dims": {**DIMS, "tokens": args.tokens}, "routing": routing,
               "tolerance": TOLERANCE, "rows": rows}  # fmt: skip
    if write_results(args.out, payload) is None:
        raise SystemExit(f"every row failed: {args.out} left as it was")
    print_table(rows, ["impl", "ms", "tflops", "peak_gib", "speedup_vs_grouped_mm", "speedup_vs_eager",
                       "err_out", "err_dgate_up", "err_ddown", "within_tolerance"])  # fmt: skip


if __name__ == "__main__":
    main()
