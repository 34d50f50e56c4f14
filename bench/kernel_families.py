"""GPU time of a profiled training step by kernel family, from a torch.profiler Chrome trace.

    python -m bench.kernel_families TRACE.json[.gz] [--steps N]

`classify` maps a kernel's name to one of FAMILIES:
  gemm_bf16            BF16 (and fp32) GEMMs: cuBLAS (nvjet_*, sm90_xmma_gemm_*), CUTLASS (torch._grouped_mm)
  gemm_fp8             FP8 GEMMs: CUTLASS with float_e4m3_t (torch._scaled_grouped_mm / _scaled_mm),
                       our Triton grouped GEMMs (kernels/grouped_gemm*.py)
  attention            flash / cuDNN / memory-efficient attention, forward and backward
  quantize_activation  our quantizing and fused-activation Triton kernels (kernels/quantize*.py,
                       act_quant*.py, transpose_bytes.py), the BF16 SwiGLU (kernels/swiglu.py) and
                       torch's SiLU / GELU kernels
  permute_combine      routing and token movement: top-k, sort, scatter, index_select, gather,
                       the router's softmax, our combine kernels (kernels/combine.py)
  norm_elementwise     our RMSNorm, RoPE and gradient-cast kernels (kernels/rmsnorm.py, rope.py,
                       grad_cast.py), torch's elementwise and reduction kernels (norms, RoPE,
                       residual adds, casts, copies), the embedding's backward
  loss                 the cross-entropy's log-softmax and NLL
  optimizer            fused AdamW and everything through multi_tensor_apply (foreach AdamW,
                       gradient clipping's norms and scaling), the bf16-moment AdamW (kernels/adamw.py)
  other                the rest: memcpy / memset, NCCL, unknown names
By name only: a generic torch kernel counts where its name puts it whichever layer launched it
(the embedding's index_select and sort count as permute_combine). `summarize` keeps each
family's largest kernels by name, so that a misplaced one shows.

`summarize` sums kernel durations per family and measures the GPU's busy time as the union of
all kernel, memcpy and memset intervals; idle = wall - busy. Families overlap in time only where
kernels run concurrently (other streams), so their sum may exceed busy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("gemm_bf16", "gemm_fp8", "attention", "quantize_activation", "permute_combine",
            "norm_elementwise", "loss", "optimizer", "other")  # fmt: skip
TOP_KERNELS = 5  # the largest kernels listed per family
NAME_CHARS = 160  # kernel names (C++ templates) are cut to this in results

# Our Triton kernels by function name (what the trace shows); tests check that every
# @triton.jit `*_kernel` in kernels/ is here.
OWN_KERNELS = {
    "_fp8_grouped_mm_kernel": "gemm_fp8",
    "_fp8_grouped_mm_wgrad_kernel": "gemm_fp8",
    "_combine_fwd_kernel": "permute_combine",
    "_combine_bwd_kernel": "permute_combine",
    "_fwd_kernel": "norm_elementwise",  # kernels/rmsnorm.py: the residual add and RMSNorm
    "_bwd_kernel": "norm_elementwise",
    "_rope_kernel": "norm_elementwise",  # kernels/rope.py
    "_grad_to_fp32_kernel": "norm_elementwise",  # kernels/grad_cast.py: BF16 weight gradients to fp32
    "_cross_entropy_kernel": "loss",  # kernels/cross_entropy.py: a chunk's loss and gradient
    "_adamw_kernel": "optimizer",  # kernels/adamw.py (trainer/fused_adamw.py, the default AdamW)
    "_adamw_amax_kernel": "optimizer",  # the same, taking rowwise FP8 weights' amaxes (moe/fp8/step_amax.py)
    **dict.fromkeys((
        "_act_fwd_kernel", "_act_bwd_amax_kernel", "_act_bwd_quant_kernel", "_amax_to_scale_kernel",
        "_bwd_prep_kernel", "_token_map_kernel", "_quantize_rows_kernel", "_amax_pass_kernel",
        "_cols_quant_kernel", "_group_strip_kernel", "_quantize_tensor_kernel", "_weight_amax_kernel",
        "_weight_quant_kernel", "_transpose_bytes_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
    ), "quantize_activation"),  # fmt: skip
}
# (family, substrings of the lower-cased name), first match wins after OWN_KERNELS.
RULES = (
    ("other", ("nccl", "memcpy", "memset")),  # before "gather" and "copy" match their names
    ("optimizer", ("fusedadam", "fused_adam", "multi_tensor_apply", "lpnorm_cleanup")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "scaled_mm", "grouped_mm", "cublas", "splitkreduce")),
    ("loss", ("cunn_softmax", "logsoftmax", "log_softmax", "nll_loss", "cross_entropy")),
    ("quantize_activation", ("silu", "gelu", "swiglu", "quant", "float8", "e4m3")),
    ("permute_combine", ("topk", "sort", "scatter", "gather", "index_select", "indexselect", "indexfunc",
                         "index_put", "index_elementwise", "histogram", "softmax_warp")),
    ("norm_elementwise", ("elementwise", "reduce_kernel", "catarray", "fill", "copy", "triton_", "norm",
                          "embedding", "compute_grad_weight", "sum_and_scatter", "krn_partial")),
)  # fmt: skip
FP8_MARKS = ("e4m3", "e5m2", "float8", "fp8", "f8f8", "_f8_")


def _is_fp8_gemm(lower: str) -> bool:
    if any(m in lower for m in FP8_MARKS):
        return True
    # cuBLASLt's Hopper kernels spell the operand types in their first word: nvjet_tst_* is BF16
    # in, fp32 accumulate, BF16 out; a "q" there is an FP8 operand.
    match = re.match(r"nvjet_(?:sm\d+_)?([a-z]+)_", lower)
    return bool(match) and "q" in match.group(1)


def classify(name: str) -> str:
    """The family (one of FAMILIES) of a kernel, by its name."""
    if name in OWN_KERNELS:
        return OWN_KERNELS[name]
    lower = name.lower()
    for family, marks in RULES:
        if any(m in lower for m in marks):
            if family == "gemm":
                return "gemm_fp8" if _is_fp8_gemm(lower) else "gemm_bf16"
            return family
    return "other"


@dataclass(frozen=True)
class GpuEvent:
    name: str
    start_us: float
    dur_us: float


def load_trace(path: str | Path) -> dict:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def gpu_events(trace: dict) -> list[GpuEvent]:
    """The kernels, memcpys and memsets of a Chrome trace (torch.profiler with CUDA activity)."""
    cats = {"kernel", "gpu_memcpy", "gpu_memset"}
    return [GpuEvent(e["name"], float(e["ts"]), float(e.get("dur", 0.0)))
            for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in cats]  # fmt: skip


def trace_span_us(trace: dict) -> float:
    """From the first event's start to the last one's end, CPU and GPU: a whole-trace wall time."""
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
             for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]  # fmt: skip
    return max(end for _, end in spans) - min(start for start, _ in spans) if spans else 0.0


def busy_us(events: list[GpuEvent]) -> float:
    """The length of the union of the events' intervals."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_us):
        stop = e.start_us + e.dur_us
        if stop <= end:
            continue
        total += stop - max(e.start_us, end)
        end = stop
    return total


def summarize(events: list[GpuEvent], wall_us: float, steps: int = 1) -> dict:
    """Per step: wall and busy milliseconds, milliseconds and share of the wall time by family
    (`ms_<family>`, `share_<family>`, idle among them), and each family's largest kernels."""
    if steps < 1 or wall_us <= 0:
        raise ValueError(f"steps must be >= 1 and the wall time > 0, got steps={steps}, wall_us={wall_us}")
    by_family = dict.fromkeys(FAMILIES, 0.0)
    by_name: dict[str, float] = {}
    for e in events:
        by_family[classify(e.name)] += e.dur_us
        by_name[e.name] = by_name.get(e.name, 0.0) + e.dur_us
    busy = busy_us(events)
    ms = {**by_family, "idle": max(wall_us - busy, 0.0)}
    per_step = 1e3 * steps  # microseconds over the steps -> milliseconds a step
    top: dict[str, list] = {f: [] for f in FAMILIES}
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1]):
        family = top[classify(name)]
        if len(family) < TOP_KERNELS:
            family.append([name[:NAME_CHARS], us / per_step])
    return {
        "wall_ms": wall_us / per_step,
        "busy_ms": busy / per_step,
        "kernels_per_step": len(events) / steps,
        **{f"ms_{k}": v / per_step for k, v in ms.items()},
        **{f"share_{k}": v / wall_us for k, v in ms.items()},
        "top_kernels": top,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a Chrome trace: run.profile's profile/step<N>.rank<R>.json.gz")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps the trace holds")
    args = parser.parse_args(argv)
    trace = load_trace(args.trace)
    events = gpu_events(trace)
    if not events:
        raise SystemExit(f"{args.trace}: no GPU kernels in this trace (profiled on a CPU?)")
    summary = summarize(events, trace_span_us(trace), args.steps)
    print(f"{args.trace}: {summary['wall_ms']:.2f} ms a step (the trace's span), GPU busy "
          f"{summary['busy_ms']:.2f} ms, {summary['kernels_per_step']:.0f} kernels")  # fmt: skip
    for family in (*FAMILIES, "idle"):
        print(f"  {family:<20} {summary[f'ms_{family}']:9.3f} ms  {100 * summary[f'share_{family}']:5.1f}%")
        for name, ms in summary["top_kernels"].get(family, [])[:3]:
            print(f"      {ms:9.3f} ms  {name[:100]}")


if __name__ == "__main__":
    main()
