"""What every benchmark shares: run metadata, GPU timing, peak memory, the copy ceiling, output.

Timing is CUDA events around each call (warm-up, L2 flushed before each timed call, median), with
the call's host launch time hidden behind GPU work queued ahead of it (`time_ms`). Bandwidth counts
each input byte read once and each output byte written once.

Results files under bench/results/ are committed: a benchmark calls `require_gpu` before it
writes anything, and writes rows with `write_results`, which keeps the file as it was when every
row failed.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3

# The four benchmark shapes of the experts block, after the models they are named for:
# (M routed rows, H, F, E, activation).
SHAPES = {
    "seed": (32768, 4096, 6400, 16, "gelu"),
    "mixtral_8x7b": (16384, 4096, 14336, 8, "swiglu"),
    "deepseek_v3_ep8": (32768, 7168, 2048, 32, "swiglu"),
    "qwen3_30b_a3b": (65536, 2048, 768, 128, "swiglu"),
}


def git_commit() -> str:
    """HEAD's hash, with "+dirty" when the working tree differs from it. A copy of the tree
    without .git (the Docker image: .dockerignore leaves it out) reads it from FP8MOE_COMMIT;
    else "unknown"."""
    if os.environ.get("FP8MOE_COMMIT"):
        return os.environ["FP8MOE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return head.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info() -> dict:
    """The fields every results file starts with."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"commit": git_commit(), "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__}


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on the current CUDA stream: events around each call, the L2
    flushed (256 MB written) before it, and a GPU sleep of twice fn's host time (at most 0.5 ms)
    queued between the flush and the start event, so that the GPU's work is timed and not the
    host's launch (our ops take 40-320 us to launch; without the sleep the GPU waited for them
    inside the timed span: bench/NOTES.md, Kernels, the slow spells)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    host_us = (time.perf_counter() - t0) / 3 * 1e6
    torch.cuda.synchronize()
    flush = torch.empty(256 * 1024**2, dtype=torch.uint8, device="cuda")
    # ~2000 cycles a microsecond at Hopper's 1.98 GHz boost clock (longer in time when clocked
    # lower). At most 0.5 ms: a longer fn (a whole layer step) keeps the GPU busy with its first
    # kernels while the host launches the rest, and where it cannot, that host time is real.
    sleep_cycles = int(min(2 * host_us + 20, 500) * 2000)

    def timed(n: int) -> list[float]:
        events = []
        for _ in range(n):
            flush.zero_()
            torch.cuda._sleep(sleep_cycles)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    estimate = max(sorted(timed(5))[2], 1e-3)
    timed(max(1, int(warmup_ms / estimate)))
    times = sorted(timed(max(1, int(rep_ms / estimate))))
    del flush
    return float(times[len(times) // 2])


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated GiB during one fn() call, counting everything alive (inputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() / GIB


def copy_gbps(nbytes: int = 2 * GIB) -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + bytes written), the memory-bound ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / ms / 1e6


def require_gpu(what: str) -> None:
    """Exit (status 1, the reason on stderr) unless a CUDA GPU is visible. A benchmark calls it
    before it writes anything: without a GPU every row fails, and the committed results file
    would be replaced by empty rows."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA GPU (Hopper: H100/H200) and none is visible: "
                         "nothing was run or written")


def comma_choices(flag: str, text: str, allowed) -> list[str]:
    """The comma-separated names `text` gives for `flag`, each one of `allowed`; SystemExit naming
    the unknown ones and the allowed names."""
    picked = text.split(",")
    bad = [v for v in picked if v not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; allowed: {list(allowed)}")
    return picked


def failed_row(head: dict, err: Exception, limit: int = 500) -> dict:
    """The row of a measurement that raised: `head` (the row's keys) and the error, cut to `limit`
    characters, after freeing what the failure left on the GPU, so that one failing row (an OOM
    included) does not lose the others."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**head, "error": f"{type(err).__name__}: {err}"[:limit]}


def write_results(path: str | Path, payload: dict, rows_key: str = "rows") -> Path | None:
    """`write_json`, unless no row of `payload[rows_key]` succeeded (every one carries an
    "error"): a run where everything failed never replaces results measured before. Returns the
    path written, or None."""
    rows = payload[rows_key]
    if not any(not row.get("error") for row in rows):
        return None
    return write_json(path, payload)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table; floats with 3 significant decimals, None as '-'."""

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
