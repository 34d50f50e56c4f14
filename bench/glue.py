"""The glue around the transformer block, each fused path against its torch path (Hopper GPU).

    python -m bench.glue [--widths mixtral_8x7b,parity_300m] [--ops gqa,add_rmsnorm,...] [--out PATH]

Widths (B sequences of S tokens, T = B * S; H hidden, Q query / J key-value heads of D = H / Q,
V vocabulary; E experts of FFN size F, A routed to a token):
  mixtral_8x7b   B 1, S 4096, H 4096, Q 32, J 8, V 32000, E 8, F 14336, A 2
  parity_300m    B 8, S 1024, H 1024, Q 16, J 8, V 32000, E 8, F 1536, A 2
  qwen3_30b_a3b  B 1, S 4096, H 2048, Q 32, J 4, V 151936, E 128, F 768, A 8
Ops, each forward + backward of what the model runs (inputs made once, outside the timing):
  gqa          causal SDPA, bf16: K/V repeated to Q heads (torch) / enable_gqa (fused) / enable_gqa
               with only the flash backend allowed (fused_flash: it runs, so flash takes GQA)
  add_rmsnorm  (y, z) = (rmsnorm(x + r) * w, x + r), x fp32 (the residual stream), r bf16 (the
               attention output): the plain ops / kernels/rmsnorm.py
  qk_norm      the per-head q norm, bf16 rows of D: the plain ops / kernels/rmsnorm.py
  rope         q and k from the projections' outputs, bf16: the torch ops on q and on k /
               kernels/rope.py (one launch for both)
  loss         the output head and cross-entropy under bf16 autocast from fp32 h (T, H): the plain
               path / moe/loss.py's chunks of 1024, 2048, 4096 rows (those below T)
  cross_entropy  one chunk of min(T, 4096) rows of bf16 logits: each row's loss, and with backward
               the gradient written over the logits: kernels/reference_loss.py (torch) /
               kernels/cross_entropy.py (fused), each on its own copy of the logits
  experts      the BF16 routed experts' SwiGLU MLP over R = T * A bf16 rows, E equal groups, bf16
               weights: the plain ops (autograd keeps silu(gate) and a) / moe/experts.py's
               torch_grouped_mlp (moe/swiglu_down.py: keeps h, recomputes a in backward)
Timing: bench.common.time_ms (CUDA events, L2 flushed, warm-up, median), repeated ROUNDS times
with the impls of an op interleaved, the median of those medians; peak_gib: everything alive
during one step, extra_gib: that above what was allocated before it (the op's own working set
and what it saves). ratio = the torch path's ms / the impl's (> 1: faster than torch).
max_abs_diff: the forward output (the loss) against the torch path's.
Writes bench/results/glue.json (bench.common.write_results) and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import GIB, REPO, comma_choices, print_table, require_gpu, run_info, time_ms, write_results

WIDTHS = {
    "mixtral_8x7b": dict(B=1, S=4096, H=4096, Q=32, J=8, V=32000, E=8, F=14336, A=2),
    "parity_300m": dict(B=8, S=1024, H=1024, Q=16, J=8, V=32000, E=8, F=1536, A=2),
    "qwen3_30b_a3b": dict(B=1, S=4096, H=2048, Q=32, J=4, V=151936, E=128, F=768, A=8),
}
OPS = ("gqa", "add_rmsnorm", "qk_norm", "rope", "loss", "cross_entropy", "experts")
ROUNDS = 5
EPS = 1e-5

Run = Callable[[bool], torch.Tensor]  # run(backward) -> the forward's output


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_()


def _step(outputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...], leaves: list[torch.Tensor],
          backward: bool) -> torch.Tensor:  # fmt: skip
    if backward:
        torch.autograd.backward(outputs, grads)
        for t in leaves:
            t.grad = None
    return outputs[0]


def gqa_case(B, S, H, Q, J, V, **_) -> dict[str, Run]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    D = H // Q
    q, k, v = _leaf(B, S, Q, D), _leaf(B, S, J, D), _leaf(B, S, J, D)
    do = torch.randn(B, Q, S, D, device="cuda", dtype=torch.bfloat16)

    def attend(repeat: bool, flash_only: bool = False) -> Run:
        def run(backward):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            if repeat:
                kt, vt = kt.repeat_interleave(Q // J, dim=1), vt.repeat_interleave(Q // J, dim=1)
            if flash_only:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not repeat)
            return _step((o,), (do,), [q, k, v], backward)

        return run

    return {"torch": attend(True), "fused": attend(False), "fused_flash": attend(False, flash_only=True)}


def add_rmsnorm_case(B, S, H, Q, J, V, **_) -> dict[str, Run]:
    from kernels.reference_norm import torch_add_rms_norm
    from kernels.rmsnorm import add_rms_norm

    T = B * S
    x, r, w = _leaf(T, H, dtype=torch.float32), _leaf(T, H), _leaf(H, dtype=torch.float32)
    dy, dz = torch.randn(T, H, device="cuda"), torch.randn(T, H, device="cuda")

    def norm(fn) -> Run:
        return lambda backward: _step(fn(x, r, w, EPS), (dy, dz), [x, r, w], backward)

    return {"torch": norm(torch_add_rms_norm), "fused": norm(add_rms_norm)}


def qk_norm_case(B, S, H, Q, J, V, **_) -> dict[str, Run]:
    from kernels.reference_norm import torch_add_rms_norm
    from kernels.rmsnorm import rms_norm

    x, w = _leaf(B * S * Q, H // Q), _leaf(H // Q, dtype=torch.float32)
    dy = torch.randn(B * S * Q, H // Q, device="cuda", dtype=torch.bfloat16)
    return {
        "torch": lambda backward: _step((torch_add_rms_norm(x, None, w, EPS)[0],), (dy,), [x, w], backward),
        "fused": lambda backward: _step((rms_norm(x, w, EPS),), (dy,), [x, w], backward),
    }


def rope_case(B, S, H, Q, J, V, **_) -> dict[str, Run]:
    from kernels.rope import rope_qk, torch_rope_qk
    from moe.model import rope_tables

    D = H // Q
    q, k = _leaf(B, S, Q * D), _leaf(B, S, J * D)
    cos, sin = (t.cuda() for t in rope_tables(D, S, 10000.0))
    dq = torch.randn(B, S, Q, D, device="cuda", dtype=torch.bfloat16)
    dk = torch.randn(B, S, J, D, device="cuda", dtype=torch.bfloat16)

    def rotate(fn) -> Run:
        return lambda backward: _step(fn(q.view(B, S, Q, D), k.view(B, S, J, D), cos, sin), (dq, dk), [q, k], backward)

    return {"torch": rotate(torch_rope_qk), "fused": rotate(rope_qk)}


def loss_case(B, S, H, Q, J, V, **_) -> dict[str, Run]:
    from moe.loss import linear_cross_entropy

    T = B * S
    h = _leaf(T, H, dtype=torch.float32)
    head = nn.Linear(H, V, bias=False, device="cuda")
    nn.init.normal_(head.weight, std=H**-0.5)
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[: T // 16] = -100

    def loss(chunk_rows: int) -> Run:
        def run(backward):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                value = linear_cross_entropy(h, head, labels, chunk_rows)
            return _step((value,), (torch.ones_like(value),), [h, head.weight], backward)

        return run

    return {"torch": loss(0), **{f"chunk_{c}": loss(c) for c in (1024, 2048, 4096) if c < T}}


def cross_entropy_case(B, S, V, **_) -> dict[str, Run]:
    from kernels.cross_entropy import cross_entropy_grad_
    from kernels.reference_loss import torch_cross_entropy_grad_

    T = min(B * S, 4096)
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[: T // 16] = -100
    scale = torch.where(labels >= 0, 1.0 / T, 0.0)
    x_TV = torch.randn(T, V, device="cuda").mul_(4).bfloat16()

    def chunk(fn) -> Run:
        x = x_TV.clone()  # the first (forward-only) call of each sees the same logits
        return lambda backward: fn(x, labels, scale, backward).sum()

    return {"torch": chunk(torch_cross_entropy_grad_), "fused": chunk(cross_entropy_grad_)}


def experts_case(B, S, H, E, F, A, **_) -> dict[str, Run]:
    from moe.experts import activation_fn, torch_grouped_mlp

    R = B * S * A
    x = _leaf(R, H)
    w1, w2 = _leaf(E, 2 * F, H, scale=H**-0.5), _leaf(E, H, F, scale=F**-0.5)
    group_end_E = torch.full((E,), R // E, device="cuda", dtype=torch.int32).cumsum(0, dtype=torch.int32)
    dy = torch.randn(R, H, device="cuda", dtype=torch.bfloat16)

    def plain(x_MH, w1_EXH, w2_EHF, ends, activation):
        h_MX = torch._grouped_mm(x_MH, w1_EXH.transpose(-2, -1), offs=ends)
        return torch._grouped_mm(activation_fn(h_MX, activation), w2_EHF.transpose(-2, -1), offs=ends)

    def mlp(fn) -> Run:
        return lambda backward: _step((fn(x, w1, w2, group_end_E, "swiglu"),), (dy,), [x, w1, w2], backward)

    return {"torch": mlp(plain), "fused": mlp(torch_grouped_mlp)}


CASES = {"gqa": gqa_case, "add_rmsnorm": add_rmsnorm_case, "qk_norm": qk_norm_case, "rope": rope_case,
         "loss": loss_case, "cross_entropy": cross_entropy_case, "experts": experts_case}  # fmt: skip


def _peak(run: Run) -> tuple[float, float]:
    """(peak GiB during one step, that above what was allocated before it)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / GIB, (peak - before) / GIB


def bench_op(width: str, op: str) -> list[dict]:
    impls = CASES[op](**WIDTHS[width])
    rows, ref = {}, None
    for name, run in list(impls.items()):
        row = rows[name] = {"width": width, "op": op, "impl": name}
        try:
            with torch.no_grad():
                out = run(False).float()
            ref = out if ref is None else ref
            row["max_abs_diff"] = (out - ref).abs().max().item()
            run(True)  # compile and warm up every path before the first timing
        except Exception as exc:  # e.g. a backend that refuses the shape: the other impls still run
            row["error"] = f"{type(exc).__name__}: {exc}"
            del impls[name]
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(ROUNDS):
        for name, run in impls.items():
            times[name].append(time_ms(lambda: run(True), warmup_ms=10, rep_ms=30))
    for name, run in impls.items():
        peak, extra = _peak(run)
        rows[name].update(ms=statistics.median(times[name]), peak_gib=peak, extra_gib=extra)
    base = rows["torch"].get("ms")
    for row in rows.values():
        if base and row.get("ms"):
            row["ratio"] = base / row["ms"]
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default=",".join(WIDTHS), help=f"comma list of {list(WIDTHS)}")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "glue.json"))
    args = ap.parse_args(argv)
    widths, ops = comma_choices("--widths", args.widths, WIDTHS), comma_choices("--ops", args.ops, OPS)
    require_gpu("bench.glue")
    rows = []
    for width in widths:
        for op in ops:
            try:
                rows += bench_op(width, op)
            except Exception as exc:  # one broken op keeps the others' rows
                rows.append({"width": width, "op": op, "error": f"{type(exc).__name__}: {exc}"})
            gc.collect()
            torch.cuda.empty_cache()
    write_results(args.out, {**run_info(), "widths": WIDTHS, "rounds": ROUNDS, "rows": rows})
    print_table(rows, ["width", "op", "impl", "ms", "ratio", "peak_gib", "extra_gib", "max_abs_diff", "error"])


if __name__ == "__main__":
    main()
