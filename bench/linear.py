"""Dense FP8 linear layers against BF16 and torchao, LLaMa-2-70B shapes (Hopper GPU).

    python -m bench.linear [--shapes attn_qkv,ffn_w13,...] [--scalings tensorwise,rowwise,...]
                           [--impls bf16,ours_eager,...] [--out PATH]

Shapes (M tokens, K in_features, N out_features), hidden 8192, FFN 28672, 16384 tokens:
  attn_qkv (16384, 8192, 10240)   wq + wk + wv fused (8 KV heads of 128)
  attn_o   (16384, 8192, 8192)
  ffn_w13  (16384, 8192, 57344)   gate and up fused
  ffn_w2   (16384, 28672, 8192)
Implementations, each fwd+bwd of one layer (y = layer(x); y.backward(dy)) under bf16 autocast
with fp32 master weights (the trainer's setting):
  bf16            nn.Linear
  ours_eager      Float8Linear (moe/fp8/float8_linear.py), eager
  ours_compiled   the same under torch.compile
  torchao_eager / torchao_compiled   torchao.float8.convert_to_float8_training (skipped when
                  torchao is missing; its recipes: tensorwise, rowwise; no delayed scaling)
Timing: bench.common.time_ms (CUDA events, L2 flushed, median); peak_gib: bench.common.peak_gib.
For delayed scaling one timed call includes no amax sync (once per optimizer step, not per layer).
Writes bench/results/linear.json and prints a table last. Issue 8's bar: ours_eager >= 1.3x bf16
at the largest shape and within 5% of ours_compiled; ours_eager faster than torchao_eager.
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch import nn

from bench.common import REPO, peak_gib, print_table, run_info, time_ms, write_json

SHAPES = {
    "attn_qkv": (16384, 8192, 10240),
    "attn_o": (16384, 8192, 8192),
    "ffn_w13": (16384, 8192, 57344),
    "ffn_w2": (16384, 28672, 8192),
}
SCALINGS = ("tensorwise", "rowwise", "tensorwise_delayed")
IMPLS = ("bf16", "ours_eager", "ours_compiled", "torchao_eager", "torchao_compiled")


def build_layer(impl: str, scaling: str, K: int, N: int) -> nn.Module | None:
    """The layer for one implementation (fp32 master weights on CUDA), or None if unavailable."""
    base = nn.Linear(K, N, bias=False, device="cuda")
    if impl == "bf16":
        return base
    if impl.startswith("ours"):
        from moe.fp8.linear_convert import convert_to_float8_training

        layer = convert_to_float8_training(base, scaling, lambda m, fqn: True)
    else:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training as ao_convert
        except ImportError:
            return None
        if scaling == "tensorwise_delayed":
            return None  # torchao dropped delayed scaling
        layer = ao_convert(nn.Sequential(base), config=Float8LinearConfig.from_recipe_name(scaling))
    return torch.compile(layer) if impl.endswith("compiled") else layer


def fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


def bench_one(impl: str, scaling: str, shape: str) -> dict:
    M, K, N = SHAPES[shape]
    row = {"shape": shape, "M": M, "K": K, "N": N, "impl": impl, "scaling": "-" if impl == "bf16" else scaling}
    layer = build_layer(impl, scaling, K, N)
    if layer is None:
        return {**row, "ms": None, "peak_gib": None, "note": "unavailable"}
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    step = fwd_bwd(layer, x, dy)
    step()  # compile / autotune, and for delayed scaling fills the amax history
    if impl.startswith("ours") and scaling == "tensorwise_delayed":
        from moe.fp8.linear_convert import sync_float8_amax_and_scale_history

        sync_float8_amax_and_scale_history(layer)
    ms = time_ms(step)
    peak = peak_gib(step)
    flops = 3 * 2 * M * K * N  # forward, dgrad, wgrad
    del layer, x, dy
    gc.collect()
    torch.cuda.empty_cache()
    return {**row, "ms": ms, "tflops": flops / ms / 1e9, "peak_gib": peak}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--scalings", default="tensorwise,rowwise", help=f"comma list of {SCALINGS}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "linear.json"))
    args = ap.parse_args(argv)
    shapes, scalings, impls = (a.split(",") for a in (args.shapes, args.scalings, args.impls))
    for name, values, allowed in (("--shapes", shapes, SHAPES), ("--scalings", scalings, SCALINGS), ("--impls", impls, IMPLS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; allowed: {list(allowed)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench.linear needs a CUDA GPU (Hopper: FP8 GEMMs)")
    rows = []
    for shape in shapes:
        if "bf16" in impls:
            rows.append(bench_one("bf16", "-", shape))
        for scaling in scalings:
            for impl in impls:
                if impl != "bf16":
                    rows.append(bench_one(impl, scaling, shape))
        base = next((r["ms"] for r in rows if r["shape"] == shape and r["impl"] == "bf16"), None)
        for r in rows:
            if r["shape"] == shape and base and r.get("ms"):
                r["speedup_vs_bf16"] = base / r["ms"]
    write_json(args.out, {**run_info(), "results": rows})
    print_table(rows, ["shape", "impl", "scaling", "ms", "tflops", "speedup_vs_bf16", "peak_gib"])


if __name__ == "__main__":
    main()
