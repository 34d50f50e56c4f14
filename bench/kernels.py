"""Memory-bound kernel benchmarks against the device-to-device copy ceiling (Hopper GPU).

    python -m bench.kernels [--only quantize_rows,quantize_weight] [--shapes seed,...] [--out PATH]
    python -m bench.kernels --merge PART.json [PART.json ...] [--out PATH]

On a fresh machine the full set takes ~10 minutes, mostly compiling (each new specialisation of
ours and torchao's autotuned kernels); several GPUs can each run some families (--only, --out
PART.json) side by side, and --merge joins the parts: rows concatenated, each row's frac_of_copy
against the copy measured on its own GPU (kept per part in "parts"), copy_gbps their mean.

Writes bench/results/kernels.json: {"commit", "gpu", "torch", "triton", "copy_gbps", "rows": [
{"kernel", "shape", "experts", "ms", "gbps", "frac_of_copy", "torchao_ms", "peak_gib"}]} and prints
a table last. gbps counts each input byte read once and each output byte written once, so a
kernel that must read its input twice (rowwise amax pass) cannot reach 1.0 of copy.
torchao_ms: torchao's counterpart (torchao.prototype kernels) where one exists and is installed.

To add kernels: write `bench_<name>(ctx) -> list[dict]` (rows via `ctx.measure`) and list it in
BENCHES.

Shape letters (README.md): M routed rows, H hidden size, F expert FFN hidden size, X GEMM1's
output width, E experts, P padded rows, T tokens, A experts a token is routed to, N and K a
weight's output and reduction dims.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from bench.common import SHAPES as BLOCK_SHAPES, REPO, copy_gbps, peak_gib, print_table, run_info, time_ms, write_json
from moe.fp8.recipe import RECIPES, Fp8Recipe

# Token-group alignment of the weight-gradient copies, as the experts run them per recipe.
ALIGN = {name: Fp8Recipe(name).align for name in RECIPES}


@dataclass(frozen=True)
class Shape:
    """An experts block (README.md's shape letters): M routed rows, H hidden size, F expert FFN
    hidden size, E experts, activation."""

    M: int
    H: int
    F: int
    E: int
    act: str

    @property
    def X(self) -> int:
        """Rows of w1 per expert (GEMM1's output width): 2F, gate and up, for SwiGLU; F for GELU."""
        return 2 * self.F if self.act == "swiglu" else self.F

    def grouped_layouts(self) -> list[tuple[int, int, str, int]]:
        """(block, align, recipe, P) of the expert recipes' token-grouped copies: rowwise (block 0)
        and blockwise (128), P their padded rows."""
        recipes = ((0, "rowwise"), (128, "blockwise"))
        return [(block, ALIGN[name], name, self.M + self.E * ALIGN[name]) for block, name in recipes]


SHAPES = {name: Shape(*dims) for name, dims in BLOCK_SHAPES.items()}  # bench/common.py's four shapes
WEIGHT_SWEEP_E = (1, 4, 16, 64, 128)
WEIGHT_MODES = ("rowwise", "blockwise", "tensorwise")
RECIPE_MODES = ("rowwise", "blockwise")  # the expert recipes' weight modes
# Kernels of 0.05-3 ms: 40 ms of repetitions give a stable median, and ~150 rows fit in ~4 minutes.
_TIMING = dict(warmup_ms=10, rep_ms=40)
WEIGHT_SWEEP_SHAPES = ("qwen3_30b_a3b", "deepseek_v3_ep8")  # per-expert w1 sizes for the E sweep


@dataclass
class Context:
    copy_gbps: float
    shapes: dict[str, Shape]
    torchao: bool
    rows: list[dict] = field(default_factory=list)

    def measure(
        self,
        kernel: str,
        shape: str,
        experts: int,
        fn: Callable[[], object],
        nbytes: int,
        torchao_fn: Callable[[], object] | None = None,
    ) -> dict:
        ms = time_ms(fn, **_TIMING)
        gbps = nbytes / ms / 1e6
        row = {
            "kernel": kernel,
            "shape": shape,
            "experts": experts,
            "ms": ms,
            "gbps": gbps,
            "frac_of_copy": gbps / self.copy_gbps,
            "torchao_ms": self._torchao_ms(kernel, torchao_fn),
            "peak_gib": peak_gib(fn),
        }
        self.rows.append(row)
        print(f"  {kernel:44s} {shape:24s} E={experts:<4d} {ms:8.3f} ms {gbps:7.0f} GB/s", flush=True)
        return row

    def _torchao_ms(self, kernel, torchao_fn):
        if not (self.torchao and torchao_fn):
            return None
        try:
            return time_ms(torchao_fn, **_TIMING)
        except Exception as exc:  # a counterpart with other layout rules: report, keep going
            print(f"  torchao counterpart of {kernel} failed: {type(exc).__name__}: {str(exc)[:200]}")
            return None


def _group_ends(M: int, E: int, seed: int = 0) -> torch.Tensor:
    """Cumulative group ends of M tokens routed uniformly at random to E experts (int32, cuda)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    counts = torch.bincount(torch.randint(0, E, (M,), device="cuda", generator=g), minlength=E)
    return counts.cumsum(0).int()


def _x(*shape) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _torchao():
    """torchao's moe/blockwise kernels as a namespace, or None."""
    try:
        from torchao.prototype.blockwise_fp8_training import grouped_kernels, kernels as blockwise
        from torchao.prototype.moe_training import kernels as moe
    except Exception:
        return None
    return {"moe": moe, "blockwise": blockwise, "grouped": grouped_kernels}


def _scale_bytes(n: int) -> int:
    return 4 * n


# ---- quantization kernels (kernels/quantize*.py) -----------------------------------------------


def bench_quantize_rows(ctx: Context) -> list[dict]:
    from kernels.quantize import quantize_rows

    ao = _torchao()
    f8 = torch.float8_e4m3fn
    for name, s in ctx.shapes.items():
        x = _x(s.M, s.H)
        perm = torch.randperm(s.M, device="cuda")
        base = s.M * s.H * 3
        ctx.measure(
            "quantize_rows[rowwise]", name, s.E, lambda: quantize_rows(x, 0), base + _scale_bytes(s.M),
            ao and (lambda: ao["moe"].triton_fp8_rowwise_2d_scale_and_cast(x, f8, False)),
        )  # fmt: skip
        ctx.measure(
            "quantize_rows[rowwise,gather]", name, s.E, lambda: quantize_rows(x, 0, False, perm),
            base + _scale_bytes(s.M) + 8 * s.M,
        )  # fmt: skip
        ctx.measure(
            "quantize_rows[1x128]", name, s.E, lambda: quantize_rows(x, 128), base + _scale_bytes(s.M * s.H // 128),
            ao and (lambda: ao["blockwise"].triton_fp8_blockwise_act_quant_lhs(x, 128)),
        )  # fmt: skip
    return ctx.rows


def _torchao_grouped(x: torch.Tensor, ends: torch.Tensor, block: int, rows: bool) -> Callable[[], object] | None:
    """torchao's counterpart of the grouped quantizers for x: its per-group column (rowwise) or
    1x128-tile transposed (blockwise) quantizer, with rows its row quantizer first; None without
    torchao."""
    ao = _torchao()
    if ao is None:
        return None
    f8 = torch.float8_e4m3fn
    if block:
        bw = ao["blockwise"]
        cols, row = bw.triton_fp8_blockwise_act_quant_transposed_lhs, bw.triton_fp8_blockwise_act_quant_lhs
        return (lambda: (row(x, 128), cols(x, 128))) if rows else (lambda: cols(x, 128))
    cols, row = ao["moe"].triton_fp8_per_group_colwise_scales, ao["moe"].triton_fp8_rowwise_2d_scale_and_cast
    return (lambda: (row(x, f8, False), cols(x, ends, f8, False))) if rows else (lambda: cols(x, ends, f8, False))


def bench_quantize_cols_grouped(ctx: Context) -> list[dict]:
    from kernels.quantize_grouped import quantize_cols_grouped

    for name, s in ctx.shapes.items():
        ends = _group_ends(s.M, s.E)
        for K in (s.H, s.X):  # x (M, H) for the w1 gradient, the w1 output grad (M, X) likewise
            x = _x(s.M, K)
            for block, align, recipe, P in s.grouped_layouts():
                nbytes = s.M * K * 2 + K * P + _scale_bytes(K * (P // 128 if block else s.E))
                ctx.measure(
                    f"quantize_cols_grouped[{'128x1' if block else recipe},K={K}]", name, s.E,
                    lambda: quantize_cols_grouped(x, ends, align, block), nbytes,
                    _torchao_grouped(x, ends, block, rows=False),
                )  # fmt: skip
            del x
    return ctx.rows


def bench_quantize_rows_and_cols_grouped(ctx: Context) -> list[dict]:
    from kernels.quantize_grouped import quantize_rows_and_cols_grouped

    for name, s in ctx.shapes.items():
        ends = _group_ends(s.M, s.E)
        x = _x(s.M, s.H)
        for block, align, label, P in s.grouped_layouts():
            n_scales = s.M * s.H // 128 + s.H * P // 128 if block else s.M + s.H * s.E
            nbytes = s.M * s.H * 3 + s.H * P + _scale_bytes(n_scales)
            ao_fn = _torchao_grouped(x, ends, block, rows=True)
            ctx.measure(
                f"quantize_rows_and_cols_grouped[{label}]", name, s.E,
                lambda: quantize_rows_and_cols_grouped(x, ends, align, block), nbytes, ao_fn,
            )  # fmt: skip
    return ctx.rows


def _weight_rows(ctx: Context, kernel: str, shape: str, w_ENK: torch.Tensor, modes=WEIGHT_MODES) -> None:
    """One row per mode. An fp32 w_ENK is an fp32 master, quantized as the layer does it (rounded to
    bf16 in registers, round_bf16=True): its bytes count 4 per element read, and torchao's
    counterpart is timed with the fp32 -> bf16 copy its users pay first."""
    from kernels.quantize_weight import quantize_weight

    ao = _torchao()
    f8 = torch.float8_e4m3fn
    E, N, K = w_ENK.shape
    master = w_ENK.dtype == torch.float32
    to_bf16 = (lambda w: w.to(torch.bfloat16)) if master else (lambda w: w)  # noqa: E731
    w_EKN = w_ENK.transpose(-2, -1)  # torchao's B_t layout: (E, K, N), column-major per expert
    for mode in modes:
        n_scales = {"rowwise": E * (N + K), "blockwise": 2 * E * (N // 128) * (K // 128), "tensorwise": 2 * E}[mode]
        ao_fn = None
        if ao and mode == "rowwise":
            ao_fn = lambda: (  # noqa: E731
                ao["moe"].triton_fp8_colwise_3d_scale_and_cast(w := to_bf16(w_EKN), f8, False),
                ao["moe"].triton_fp8_rowwise_3d_transpose_rhs(w, f8, False),
            )
        elif ao and mode == "blockwise":
            ao_fn = lambda: (  # noqa: E731
                ao["grouped"].triton_fp8_blockwise_weight_quant_grouped_transposed_rhs(w := to_bf16(w_EKN), 128),
                ao["grouped"].triton_fp8_blockwise_weight_quant_grouped_rhs(w, 128),
            )
        ctx.measure(
            f"{kernel}[{mode}{',fp32 master' if master else ''}]", shape, E,
            lambda: quantize_weight(w_ENK, mode, round_bf16=master),
            E * N * K * (w_ENK.element_size() + 2) + _scale_bytes(n_scales), ao_fn,
        )  # fmt: skip


def bench_quantize_weight(ctx: Context) -> list[dict]:
    """Both expert weights of every shape: bf16 in every mode, then as fp32 masters in the recipes'."""
    for name, s in ctx.shapes.items():
        for label, dims in ((f"w1[N={s.X},K={s.H}]", (s.E, s.X, s.H)), (f"w2[N={s.H},K={s.F}]", (s.E, s.H, s.F))):
            _weight_rows(ctx, f"quantize_weight_{label}", name, _x(*dims))
            _weight_rows(ctx, f"quantize_weight_{label}", name, _x(*dims).float(), RECIPE_MODES)
        gc.collect()
        torch.cuda.empty_cache()
    return ctx.rows


def bench_quantize_weight_experts(ctx: Context) -> list[dict]:
    """Time against E at a fixed per-expert size: should grow linearly (no per-expert loop)."""
    for name in WEIGHT_SWEEP_SHAPES:
        s = SHAPES[name]
        for E in WEIGHT_SWEEP_E:
            _weight_rows(ctx, f"quantize_weight_w1[N={s.X},K={s.H}]", f"{name}:E_sweep", _x(E, s.X, s.H))
            gc.collect()
            torch.cuda.empty_cache()
    return ctx.rows


# ---- activation kernels (kernels/act_quant.py) -------------------------------------------------


def bench_act_rows(ctx: Context) -> list[dict]:
    """act_quant_fwd (h -> FP8 a and FP8 h) and act_quant_bwd (da, FP8 h -> dh rows, dh^T, a^T)."""
    from kernels.act_quant import act_quant_fwd
    from kernels.act_quant_bwd import act_quant_bwd

    for name, s in ctx.shapes.items():
        h, da, ends = _x(s.M, s.X), _x(s.M, s.F), _group_ends(s.M, s.E)
        for block, align, recipe, P in s.grouped_layouts():
            label = "1x128" if block else recipe
            n_row_scales = s.M * (s.F + s.X) // 128 if block else 2 * s.M
            ctx.measure(
                f"act_quant_fwd[{label}]", name, s.E, lambda: act_quant_fwd(h, s.act, block),
                s.M * s.X * 3 + s.M * s.F + _scale_bytes(n_row_scales),
            )  # fmt: skip
            _, _, h_q, h_scale = act_quant_fwd(h, s.act, block)
            n_scales = (s.M * s.X // 128 + (s.X + s.F) * P // 128) if block else (s.M + (s.X + s.F) * s.E)
            ctx.measure(
                f"act_quant_bwd[{label}]", name, s.E,
                lambda: act_quant_bwd(da, h_q, h_scale, s.act, ends, align, block),
                s.M * s.F * 2 + s.M * s.X * 2 + (s.X + s.F) * P + _scale_bytes(n_scales + h_scale.numel()),
            )  # fmt: skip
            del h_q, h_scale
        del h, da
    return ctx.rows


# ---- permutation (moe/permute.py, kernels/combine.py) --------------------------------------------

# A, the experts a token is routed to (top-k), of the models behind bench/common.py's shapes
# (configs/model/*.yaml; the seed model routes top-2): the permutation's T = M / A tokens.
TOP_A = {"seed": 2, "mixtral_8x7b": 2, "deepseek_v3_ep8": 8, "qwen3_30b_a3b": 8}


def bench_permute(ctx: Context) -> list[dict]:
    """The layer's permutation at EP=1: gather-quantize (rows and wgrad columns straight from the
    T bf16 tokens), the backward's gather_sum (bf16 rows -> fp32 tokens, as under autocast) with
    the torch loop it replaced, and unpermute_combine forward and backward."""
    from kernels.combine import gather_sum, unpermute_combine, unpermute_combine_bwd
    from kernels.quantize_grouped import quantize_rows_and_cols_grouped
    from kernels.reference_combine import torch_gather_sum
    from moe.permute import plan_permute
    from moe.router import count_tokens_per_expert

    for name, s in ctx.shapes.items():
        A = TOP_A[name]
        T = s.M // A
        g = torch.Generator(device="cuda").manual_seed(0)
        ids_TA = torch.rand(T, s.E, device="cuda", generator=g).topk(A, dim=1).indices
        meta = plan_permute(ids_TA, s.E)
        ends = count_tokens_per_expert(ids_TA, s.E).cumsum(0).int()
        rows, kept = meta.row_of_TA, meta.kept_TA
        idx_bytes = s.M * 8 + s.M  # row_of_TA (int64) and kept_TA (bool)
        x_TH = _x(T, s.H)
        for block, align, label, P in s.grouped_layouts():
            n_scales = s.M * s.H // 128 + s.H * P // 128 if block else s.M + s.H * s.E
            # Each routed row read once (from its token), the index, both FP8 copies and scales.
            nbytes = s.M * s.H * 3 + s.H * P + _scale_bytes(n_scales) + 8 * s.M
            ctx.measure(
                f"quantize_rows_and_cols_grouped[{label},gather]", name, s.E,
                lambda: quantize_rows_and_cols_grouped(x_TH, ends, align, block, False, meta.token_idx_M), nbytes,
            )  # fmt: skip
        dx_MH = _x(s.M, s.H)
        nbytes = s.M * s.H * 2 + T * s.H * 4 + idx_bytes
        ctx.measure("permute_bwd[gather_sum]", name, s.E, lambda: gather_sum(dx_MH, rows, kept, torch.float32), nbytes)
        ctx.measure(
            "permute_bwd[torch loop, replaced]", name, s.E,
            lambda: torch_gather_sum(dx_MH, rows, kept, torch.float32), nbytes,
        )  # fmt: skip
        w_TA = torch.rand(T, A, device="cuda", generator=g)
        nbytes = s.M * s.H * 2 + T * s.H * 2 + idx_bytes + 4 * s.M
        ctx.measure("unpermute_combine", name, s.E, lambda: unpermute_combine(dx_MH, rows, w_TA, kept), nbytes)
        dout_TH = _x(T, s.H)
        nbytes = T * s.H * 2 + 2 * s.M * s.H * 2 + idx_bytes + 8 * s.M
        ctx.measure(
            "unpermute_combine_bwd", name, s.E, lambda: unpermute_combine_bwd(dout_TH, dx_MH, rows, w_TA, kept), nbytes
        )
        del x_TH, dx_MH, dout_TH
    return ctx.rows


BENCHES: dict[str, Callable[[Context], list[dict]]] = {
    "quantize_rows": bench_quantize_rows,
    "quantize_cols_grouped": bench_quantize_cols_grouped,
    "quantize_rows_and_cols_grouped": bench_quantize_rows_and_cols_grouped,
    "quantize_weight": bench_quantize_weight,
    "quantize_weight_experts": bench_quantize_weight_experts,
    "act_rows": bench_act_rows,
    "permute": bench_permute,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma list from: {', '.join(BENCHES)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from: {', '.join(SHAPES)}")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "kernels.json"))
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao's counterparts")
    parser.add_argument("--merge", nargs="+", metavar="PART", help="join JSON parts written by --only runs")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    names, shapes = args.only.split(","), args.shapes.split(",")
    for n, known in [(n, BENCHES) for n in names] + [(s, SHAPES) for s in shapes]:
        if n not in known:
            parser.error(f"unknown name {n!r}; choose from {', '.join(known)}")
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU (Hopper: H100/H200)")

    torchao = not args.no_torchao and _torchao() is not None
    ctx = Context(copy_gbps=copy_gbps(), shapes={s: SHAPES[s] for s in shapes}, torchao=torchao)
    print(f"device-to-device copy: {ctx.copy_gbps:.0f} GB/s; torchao counterparts: {torchao}")
    # Written after every kernel family, "complete" false until the last: a run cut short by its
    # time limit (each new Triton specialisation, ours and torchao's autotuned ones, compiles for
    # seconds: ~150 rows take 5-10 minutes on a fresh machine) still leaves what it measured.
    t0 = time.perf_counter()
    for i, n in enumerate(names):
        print(f"{n}: (+{time.perf_counter() - t0:.0f}s)", flush=True)
        BENCHES[n](ctx)
        gc.collect()
        torch.cuda.empty_cache()
        info = {**run_info(), "complete": i == len(names) - 1, "benches": names[: i + 1]}
        path = write_json(args.out, {**info, "copy_gbps": ctx.copy_gbps, "rows": ctx.rows})
    print(f"wrote {path} (+{time.perf_counter() - t0:.0f}s)")
    print_table(ctx.rows, ["kernel", "shape", "experts", "ms", "gbps", "frac_of_copy", "torchao_ms", "peak_gib"])


def merge(parts: list[str], out: str) -> None:
    """Join kernels.json parts measured side by side (module docstring)."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    for key in ("commit", "gpu", "torch", "triton"):
        if len({d.get(key) for d in loaded}) > 1:
            sys.exit(f"--merge: the parts differ in {key}: {[d.get(key) for d in loaded]}")
    rows = [r for d in loaded for r in d["rows"]]
    benches = [b for d in loaded for b in d.get("benches", [])]  # each part lists the families it finished
    merged = {k: loaded[0][k] for k in ("commit", "gpu", "torch", "triton")}
    merged.update({
        # every part ran what it was asked, or a part cut short is made up by the others (a rerun
        # of the families it did not reach)
        "complete": all(d.get("complete", False) for d in loaded) or set(BENCHES) <= set(benches),
        "benches": benches,
        "copy_gbps": sum(d["copy_gbps"] for d in loaded) / len(loaded),
        "parts": [{"benches": d.get("benches"), "copy_gbps": d["copy_gbps"], "rows": len(d["rows"])} for d in loaded],
        "rows": rows,
    })  # fmt: skip
    path = write_json(out, merged)
    print(f"wrote {path}: {len(rows)} rows from {len(parts)} parts")
    print_table(rows, ["kernel", "shape", "experts", "ms", "gbps", "frac_of_copy", "torchao_ms", "peak_gib"])


if __name__ == "__main__":
    main()
