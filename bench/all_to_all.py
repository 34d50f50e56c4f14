"""Expert-parallel dispatch + combine (moe.all_to_all.AllToAllDispatcher) alone, BF16 vs FP8 payloads.

    torchrun --nproc_per_node 2 -m bench.all_to_all [--shapes mixtral_8x7b,deepseek_v3_ep8]
        [--payloads bf16,rowwise,blockwise] [--out PATH]
    torchrun --nproc_per_node 2 -m bench.all_to_all --device cpu --tiny     # gloo smoke test

Every rank holds M routed rows of width H (bench.common.SHAPES) grouped by expert, with per-expert
counts from seeded skewed routing (bench.moe_block.routed_counts, seed = rank, so ranks send
different amounts); the EP group is all ranks, each owning E / world experts. The experts are the
identity, so only the dispatcher is timed:
  fwd      dispatch (the counts all-to-all, the one host synchronisation for split sizes, the
           payload all-to-all, regrouping by local expert; bf16 gathers the rows in token order
           first (here the identity permutation), FP8 gathers them inside its quantization) then
           combine (BF16 all-to-all back), in the autograd Functions as the MoE layer calls them
           (grad enabled, no backward)
  fwd_bwd  the same, then backward: the reverse all-to-alls of the gradients (always BF16)
Payloads: bf16 (2H bytes a row), rowwise and blockwise: one packed row of E4M3 bytes and fp32
scales (one, or H / 128), padded to 16 bytes (moe/all_to_all.py's wire format; 4112 and 4224
bytes at H = 4096), in one all-to-all; FP8 payloads include the sender's quantization and the
receiver's unpacking and dequantization, as in training.

Timing: all ranks meet at a barrier before each timed call, which then runs between two CUDA
events (wall clock on CPU); after warm-up, the median over iterations per rank. ms_* is rank 0's
median, ms_*_max the largest median over ranks.
bytes_per_rank: forward bytes rank 0 hands to the payload all-to-alls (dispatch rows in the
payload format + combine rows in BF16), the rows it keeps for itself included; bytes_off_rank
counts only rows that leave rank 0; *_vs_bf16 are ratios to the bf16 row of the same shape (dispatch
alone: about 0.5 for FP8). gbps = bytes_per_rank / ms_fwd (GB/s, 1e9 bytes).
peak_gib: largest peak allocated memory over ranks during one fwd_bwd (inputs included; CUDA only).
Rank 0 writes bench/results/all_to_all.json and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.common import GIB, REPO, SHAPES, git_commit, print_table, require_gpu, write_results
from bench.moe_block import routed_counts
from kernels.quantize_packed import packed_row_layout
from moe.all_to_all import AllToAllDispatcher
from moe.fp8.recipe import Fp8Recipe
from moe.permute import plan_permute

PAYLOADS = ("bf16", "rowwise", "blockwise")
# --tiny (CPU smoke test): (M rows per rank, H, F unused, E, activation unused).
TINY_SHAPES = {"tiny_e4": (96, 256, 0, 4, "swiglu"), "tiny_e8": (160, 384, 0, 8, "swiglu")}
COLUMNS = ["shape", "payload", "ms_fwd", "ms_fwd_max", "ms_fwd_bwd", "ms_fwd_bwd_max", "bytes_per_rank",
           "dispatch_bytes_vs_bf16", "bytes_vs_bf16", "gbps", "peak_gib"]


def _run_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (cpu)"
    return {"commit": git_commit(), "gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def row_bytes(payload: str, H: int) -> int:
    """Bytes one row occupies on the wire in dispatch."""
    if payload == "bf16":
        return 2 * H
    return packed_row_layout(H, Fp8Recipe(payload).block)[2]  # E4M3 bytes + fp32 scales + padding


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def once(self, fn) -> float:
        dist.barrier()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, warmup: int, iters: int) -> tuple[float, float]:
        """(this rank's median ms, the largest median over ranks)."""
        for _ in range(warmup):
            self.once(fn)
        med = statistics.median(self.once(fn) for _ in range(iters))
        worst = torch.tensor([med], dtype=torch.float64, device="cuda" if self.cuda else "cpu")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return med, float(worst.item())


def bench_one(shape: tuple, name: str, payload: str, device: torch.device, warmup: int, iters: int) -> dict:
    M, H, _, E, _ = shape
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = None if payload == "bf16" else Fp8Recipe(payload)
    disp = AllToAllDispatcher(dist.group.WORLD, E, recipe)
    counts = routed_counts(M, E, "skewed", seed=rank)
    counts_E = counts.to(device)
    # Rows already grouped by expert, one assignment each: the identity permutation.
    perm = plan_permute(torch.repeat_interleave(torch.arange(E, device=device), counts_E).view(-1, 1), E)
    gen = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(M, H, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(M, H, device=device, dtype=torch.bfloat16, generator=gen)

    def fwd():
        inp, handle = disp.dispatch(x, perm, counts_E)
        return disp.combine(inp.x, handle)  # identity experts

    def fwd_bwd():
        fwd().backward(dy)

    # Rows this rank sends to / receives from each rank (host ints, for the byte count).
    L = E // world
    sent_P = counts.view(world, L).sum(1)
    all_counts = torch.zeros(world, E, dtype=torch.int64, device=device)
    all_counts[rank] = counts_E
    dist.all_reduce(all_counts)
    recv = all_counts.cpu()[:, rank * L : (rank + 1) * L].sum(1)
    S, R = int(sent_P.sum()), int(recv.sum())
    dispatch_bytes = S * row_bytes(payload, H)
    combine_bytes = R * 2 * H
    off_rank = (S - int(sent_P[rank])) * row_bytes(payload, H) + (R - int(recv[rank])) * 2 * H

    fwd_bwd()  # first call outside the timing (quantize kernels compile / autotune)
    ms_fwd, ms_fwd_max = Timer(device).median(fwd, warmup, iters)
    x.grad = None
    ms_fb, ms_fb_max = Timer(device).median(fwd_bwd, warmup, iters)
    peak = None
    if device.type == "cuda":
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        t = torch.tensor([torch.cuda.max_memory_allocated() / GIB], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t.item())
    total = dispatch_bytes + combine_bytes
    return {
        "shape": name, "payload": payload, "M": M, "H": H, "E": E,
        "ms_fwd": ms_fwd, "ms_fwd_max": ms_fwd_max, "ms_fwd_bwd": ms_fb, "ms_fwd_bwd_max": ms_fb_max,
        "bytes_per_rank": total, "dispatch_bytes": dispatch_bytes, "combine_bytes": combine_bytes,
        "bytes_off_rank": off_rank, "gbps": total / ms_fwd / 1e6, "peak_gib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="mixtral_8x7b,deepseek_v3_ep8")
    ap.add_argument("--payloads", default=",".join(PAYLOADS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test); ignores --shapes")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls (default 5, tiny 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls (default 20, tiny 3)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "all_to_all.json"))
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    iters = args.iters if args.iters is not None else (3 if args.tiny else 20)

    if args.device == "cuda":
        require_gpu("bench.all_to_all")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = TINY_SHAPES if args.tiny else {s: SHAPES[s] for s in args.shapes.split(",")}
    rows = []
    info = _run_info(device) if rank == 0 else {}
    try:
        for name, shape in shapes.items():
            base = None
            for payload in args.payloads.split(","):
                try:
                    row = bench_one(shape, name, payload, device, warmup, iters)
                except Exception as err:  # a payload failing must not hide the others' numbers
                    if device.type != "cpu" and "NCCL" in str(err):
                        raise  # a broken communicator would hang every later collective
                    row = {"shape": name, "payload": payload, "error": f"{type(err).__name__}: {err}"[:300]}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if payload == "bf16":
                    base = (row.get("bytes_per_rank"), row.get("dispatch_bytes"))
                ok = base and base[0] and row.get("bytes_per_rank")
                row["bytes_vs_bf16"] = row["bytes_per_rank"] / base[0] if ok else None
                row["dispatch_bytes_vs_bf16"] = row["dispatch_bytes"] / base[1] if ok and base[1] else None
                rows.append(row)
                if rank == 0:  # written after every row, so a later hang or timeout keeps these
                    print(row, flush=True)
                    write_results(args.out, {**info, "world_size": world, "warmup": warmup, "iters": iters,
                                             "rows": rows})  # fmt: skip
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if rank == 0:
            print_table(rows, COLUMNS)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
