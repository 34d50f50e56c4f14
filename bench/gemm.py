"""FP8 blockwise grouped GEMMs against bf16 and FP8-rowwise grouped GEMMs (Hopper GPU).

    python -m bench.gemm [--shapes mixtral_8x7b,...] [--gemms fwd1,fwd2,wgrad1,wgrad2]
                         [--paths tma,pointer] [--sweep] [--rows M] [--out PATH]

For the four experts-block shapes of bench/common.py (SHAPES), times in one run and on the same
operands (README.md's shape letters; X = 2F for SwiGLU, F for GELU):
  fwd1   (2d x 3d)  x (M, H)  @ w1 (E, X, H)^T per expert
  fwd2   (2d x 3d)  a (M, F)  @ w2 (E, H, F)^T                  (dgrads are the same kernel)
  wgrad1 (2d x 2d)  dh^T (X, M) x x^T (H, M) -> (E, X, H)
  wgrad2 (2d x 2d)  dy^T (H, M) x a^T (F, M) -> (E, H, F)
  ours      fp8_grouped_mm(_wgrad): DeepSeek blockwise scales, fp32 promotion per 128 K
  bf16      torch._grouped_mm
  rowwise   torch._scaled_grouped_mm, fp8 with scale_a (M,), scale_b (E, N); for 2d x 2d
            flat (E*N,) and (E*K,) group-major scales
  wgrad only, fp32 out (the gradient of fp32 master weights):
  ours_rowwise      fp8_grouped_mm_wgrad_rowwise, per-group scales in the epilogue
  rowwise_fp32      torch._scaled_grouped_mm (bf16 out only) then `.to(torch.float32)`: the
                    rowwise weight gradient before ours replaced it
Groups are uniform (M / E rows, multiples of 128); --rows replaces every shape's M (a training
step's routed rows: Mixtral-width bench.train_step routes 8192, 1024 an expert). Timing:
bench.common.time_ms (CUDA events, warm-up, L2 flushed, median) after a first call that
autotunes. extra_gib: peak memory above what was allocated before the call (output and
workspace). --sweep also times every config of our kernels' autotune lists, for tuning.
Writes bench/results/gemm.json and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from bench.common import SHAPES, GIB, REPO, print_table, require_gpu, run_info, time_ms, write_json
from kernels.common import FP8_DTYPE
from kernels.grouped_gemm import fp8_grouped_mm, launch_grouped_mm, tuned_grouped_mm
from kernels.grouped_gemm_wgrad import (
    fp8_grouped_mm_wgrad,
    fp8_grouped_mm_wgrad_rowwise,
    launch_grouped_mm_wgrad,
    tuned_grouped_mm_wgrad,
)

GEMMS = ("fwd1", "fwd2", "wgrad1", "wgrad2")


def problem(shape: str, gemm: str) -> tuple[int, int, int, int]:
    """(rows or tokens, N, K, E) with out (rows, N) for fwd and (E, N, K) for wgrad."""
    M, H, F, E, act = SHAPES[shape]
    X = 2 * F if act == "swiglu" else F
    return {"fwd1": (M, X, H, E), "fwd2": (M, H, F, E), "wgrad1": (M, X, H, E), "wgrad2": (M, H, F, E)}[gemm]


def fp8(*shape) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * 64).clamp(-448, 448).to(FP8_DTYPE)


def scales(*shape) -> torch.Tensor:
    return torch.rand(*shape, device="cuda") * 1e-2 + 1e-3


def extra_gib(fn) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - before) / GIB


def make_cases(gemm: str, M: int, N: int, K: int, E: int) -> dict:
    """Callables for ours / bf16 / rowwise on shared operands, plus a per-config launcher."""
    offs = torch.full((E,), M // E, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
    if gemm.startswith("fwd"):
        a_q, b_q = fp8(M, K), fp8(E, N, K)
        a_s, b_s = scales(M, K // 128), scales(E, N // 128, K // 128)
        a_bf, b_bf = a_q.to(torch.bfloat16), b_q.to(torch.bfloat16)
        ra, rb = scales(M), scales(E, N)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        return dict(
            ours=lambda: fp8_grouped_mm(a_q, a_s, b_q, b_s, offs),
            bf16=lambda: torch._grouped_mm(a_bf, b_bf.transpose(1, 2), offs=offs),
            rowwise=lambda: torch._scaled_grouped_mm(
                a_q, b_q.transpose(1, 2), ra, rb, offs=offs, out_dtype=torch.bfloat16),
            config=lambda cfg, tma: launch_grouped_mm(a_q, a_s, b_q, b_s, offs, out, tma, cfg),
            configs=tuned_grouped_mm.configs,
        )
    P = M  # tokens; uniform groups are multiples of 128 already
    a_q, b_q = fp8(N, P), fp8(K, P)
    a_s, b_s = scales(N, P // 128), scales(K, P // 128)
    a_bf, b_bf = a_q.to(torch.bfloat16), b_q.to(torch.bfloat16)
    ra, rb = scales(E * N), scales(E * K)
    out = torch.empty(E, N, K, device="cuda", dtype=torch.bfloat16)
    cutlass = lambda: torch._scaled_grouped_mm(  # noqa: E731
        a_q, b_q.t(), ra, rb, offs=offs, out_dtype=torch.bfloat16)
    return dict(
        ours=lambda: fp8_grouped_mm_wgrad(a_q, a_s, b_q, b_s, offs),
        bf16=lambda: torch._grouped_mm(a_bf, b_bf.t(), offs=offs),
        rowwise=cutlass,
        ours_rowwise=lambda: fp8_grouped_mm_wgrad_rowwise(
            a_q, ra.view(E, N).t(), b_q, rb.view(E, K).t(), offs, torch.float32),
        rowwise_fp32=lambda: cutlass().to(torch.float32),
        config=lambda cfg, tma: launch_grouped_mm_wgrad(a_q, a_s, b_q, b_s, offs, out, tma, cfg),
        configs=tuned_grouped_mm_wgrad.configs,
    )


def measure(fn, flops: int) -> tuple[float | None, float | None, float | None, str | None]:
    """(ms, TFLOP/s, extra GiB, error) of fn; a failing baseline is recorded, not fatal."""
    try:
        fn()  # compile / autotune
        ms = time_ms(fn)
        return ms, flops / ms / 1e9, extra_gib(fn), None
    except Exception as err:  # e.g. an op missing from this torch build
        return None, None, None, f"{type(err).__name__}: {str(err)[:200]}"


def config_str(cfg) -> str:
    """BLOCK_M x SPLIT_N, p<programs per SM> where persistent, tma-store, warps, stages."""
    kw = cfg.kwargs
    persistent = f" p{kw['PROGRAMS_PER_SM']}" if kw.get("PROGRAMS_PER_SM") else ""
    store = " tma-store" if kw.get("STORE_TMA") else ""
    return f"{kw['BLOCK_M']}x{kw['SPLIT_N']}{persistent}{store} w{cfg.num_warps} s{cfg.num_stages}"


def run_case(shape: str, gemm: str, paths: list[str], sweep: bool, rows: int | None = None) -> list[dict]:
    M, N, K, E = problem(shape, gemm)
    M = rows or M
    flops = 2 * M * N * K
    cases = make_cases(gemm, M, N, K, E)
    row = dict(shape=shape, gemm=gemm, M=M, N=N, K=K, E=E)
    for name in ("bf16", "rowwise", "ours_rowwise", "rowwise_fp32"):
        if name not in cases:
            continue
        ms, tf, gib, err = measure(cases[name], flops)
        row.update({f"{name}_ms": ms, f"{name}_tflops": tf, f"{name}_extra_gib": gib})
        if err:
            row[f"{name}_error"] = err
    rows = []
    for path in paths:
        os.environ["FP8MOE_GEMM_PATH"] = path
        ms, tf, gib, err = measure(cases["ours"], flops)
        tuned = tuned_grouped_mm if gemm.startswith("fwd") else tuned_grouped_mm_wgrad
        best = getattr(tuned, "best_config", None)
        r = dict(row, path=path, ours_ms=ms, ours_tflops=tf, ours_extra_gib=gib,
                 config=config_str(best) if best is not None and err is None else None)
        if err:
            r["ours_error"] = err
        if ms and row.get("bf16_ms"):
            r["vs_bf16"] = row["bf16_ms"] / ms
        if ms and row.get("rowwise_ms"):
            r["vs_rowwise"] = row["rowwise_ms"] / ms
        if sweep:
            r["sweep"] = {}
            for cfg in cases["configs"]:
                meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                c_ms, c_tf, _, c_err = measure(lambda: cases["config"](meta, path == "tma"), flops)
                r["sweep"][config_str(cfg)] = c_tf if c_err is None else c_err
                print(f"  sweep {shape} {gemm} {path} {config_str(cfg)}: "
                      + (f"{c_ms:.3f} ms {c_tf:.0f} TFLOP/s" if c_err is None else c_err))
        rows.append(r)
        print(f"{shape} {gemm} {path}: ours {ms} ms, bf16 {row['bf16_ms']}, "
              f"rowwise {row['rowwise_ms']}", flush=True)
    os.environ.pop("FP8MOE_GEMM_PATH", None)
    cases.clear()  # the callables hold the operands
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--gemms", default=",".join(GEMMS))
    parser.add_argument("--paths", default="tma", help="tma,pointer: memory paths to time")
    parser.add_argument("--sweep", action="store_true", help="time every autotune config too")
    parser.add_argument("--rows", type=int, default=None, help="routed rows M for every shape (a multiple of 128 E)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gemm.json"))
    args = parser.parse_args(argv)
    chosen = {"shapes": args.shapes.split(","), "gemms": args.gemms.split(","),
              "paths": args.paths.split(",")}
    for name, allowed in (("shapes", SHAPES), ("gemms", GEMMS), ("paths", ("tma", "pointer"))):
        bad = [v for v in chosen[name] if v not in allowed]
        if bad:
            parser.error(f"--{name}: unknown {bad}; allowed: {list(allowed)}")
    shapes, gemms, paths = chosen["shapes"], chosen["gemms"], chosen["paths"]
    uneven = [s for s in shapes if args.rows is not None and (args.rows <= 0 or args.rows % (128 * SHAPES[s][3]))]
    if uneven:
        parser.error(f"--rows {args.rows}: must be a positive multiple of 128 x the experts of {uneven}")
    require_gpu("bench.gemm")

    rows = []
    for shape in shapes:
        for gemm in gemms:
            rows += run_case(shape, gemm, paths, args.sweep, args.rows)
    path = write_json(args.out, {**run_info(), "rows": rows})
    print(f"\nwrote {path}\n")
    print_table(rows, ["shape", "gemm", "N", "K", "path", "config", "ours_ms", "ours_tflops",
                       "bf16_tflops", "rowwise_tflops", "vs_bf16", "vs_rowwise", "ours_extra_gib",
                       "ours_rowwise_ms", "rowwise_fp32_ms", "ours_rowwise_extra_gib",
                       "rowwise_fp32_extra_gib"])


if __name__ == "__main__":
    main()
