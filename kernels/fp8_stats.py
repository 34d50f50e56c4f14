"""FP8 operand statistics, counted by the quantization kernels in the pass that casts the values.

An entry point given `stats` (int64, STATS_FIELDS words per operand, on x's device) adds to it,
for the values it casts to E4M3 with the inverse scales it casts them by (q = cast(x * inv)):

    stats[0]  max |x|, as its fp32 bits (atomic max; the bits of non-negative floats order as
              the floats do): `amax_of` reads it back
    stats[1]  underflows: x != 0 that cast to zero, |x * inv| <= 2**-10 (half E4M3's smallest
              subnormal 2**-9; the tie rounds to even, to zero)
    stats[2]  saturations: |x * inv| > 464, values the cast clips to 448 by more than its rounding
              (464 is the midpoint between 448 and the 480 a wider format would have; the tie
              rounds to even, to 448)
    stats[3]  values counted

Counts add up over calls, so one buffer takes a whole log window (micro-batches, the recomputed
forward of activation checkpointing: shares stay right because stats[3] counts the same calls).
With `stats=None` nothing is counted and the kernels compile as without this file (a constexpr
STATS flag): the statistics cost nothing when off.

Scaling and what the counts can show (kernels/common.py's rule): the expert recipes scale every
row, column or tile by its own amax (current scaling), so |x * inv| <= 448 (1 + 4u) < 464 and
saturation is zero by construction: what they can show is underflow, values more than ~2**19
below their row's (tile's) amax. Saturation needs a scale taken from other values: delayed
scaling (moe/fp8/float8_linear.py) or a planted scale (`torch_fp8_stats_add` with any inv).

How a kernel counts: one atomic per word per program at most, never one per tile. Thousands of
programs, each adding every tile's counts to the same four words, serialize on those addresses
(the atomics of one word run one after another in L2). So each program carries its partials in
registers (`tl_fp8_stats_zero`, then `tl_fp8_stats_tile` on each tile it casts, with the fp32
values and inverses it quantizes with: amax bits and two int32 counts) and adds them once, at its
end (`tl_fp8_stats_flush`), skipping the atomics that would change nothing: a count of 0, an
amax not above the word's current one. stats[3] needs no counting: a launch's values are its
shape, added by its first program. Nothing depends on the order programs run in (integer adds
and integer max), so the counts are exact and deterministic. The references count with
`torch_fp8_stats_add`, and tests compare the two exactly (integer counts, amax bits) under
Triton's interpreter on odd shapes, with programs that carry partials over several chunks
(tests/test_fp8_stats.py).

Shape letters (README.md): O the operands a buffer holds statistics of.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATS_FIELDS = 4  # amax bits, underflows, saturations, values
UNDERFLOW_BOUND = 2.0**-10  # |x * inv| at or below it casts to zero
SATURATION_BOUND = 464.0  # |x * inv| above it is clipped to 448 by more than rounding
_TL_UNDERFLOW = tl.constexpr(UNDERFLOW_BOUND)
_TL_SATURATION = tl.constexpr(SATURATION_BOUND)


def new_stats(operands: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed int64 (O, STATS_FIELDS) buffer for `operands` operands."""
    return torch.zeros((operands, STATS_FIELDS), dtype=torch.int64, device=device)


def check_stats_arg(stats: torch.Tensor | None, x: torch.Tensor, operands: int, name: str = "stats") -> None:
    """`stats` is None or a contiguous int64 tensor of operands * STATS_FIELDS words on x's device."""
    if stats is None:
        return
    want = operands * STATS_FIELDS
    if stats.dtype != torch.int64 or stats.numel() != want or not stats.is_contiguous() or stats.device != x.device:
        raise ValueError(
            f"{name} must be None or a contiguous int64 tensor of {want} elements ({operands} operand(s) x "
            f"{STATS_FIELDS} fields) on {x.device}, got {stats.dtype} {tuple(stats.shape)} on {stats.device}"
        )


def amax_of(stats_O: torch.Tensor) -> torch.Tensor:
    """fp32 amax of each operand, from the bits word of its row: stats_O (..., O, STATS_FIELDS) ->
    (..., O)."""
    return stats_O[..., 0].to(torch.int32).view(torch.float32)


@triton.jit
def tl_fp8_stats_zero():
    """Empty partials (amax bits, underflows, saturations), int32 scalars, for a program to carry
    through its loops."""
    zero = tl.zeros([], dtype=tl.int32)
    return zero, zero, zero


@triton.jit
def tl_fp8_stats_tile(amax, under, sat, x, inv, mask):
    """The partials (amax, under, sat) with one more tile's added. x: the fp32 values the kernel
    casts (2-D tile), inv: the inverse scales it multiplies them by (broadcast against x), mask:
    x's real elements (the rest count for nothing). amax is carried as the int32 bits of |x|'s
    max and combined by integer max, as the atomic in `tl_fp8_stats_flush` combines programs.
    The counts are int32: no program casts 2**31 values (int32 column offsets already bound a
    row to fewer)."""
    ax = tl.where(mask, tl.abs(x), 0.0)
    y = ax * inv
    t_amax = tl.max(tl.max(ax, axis=1), axis=0).to(tl.int32, bitcast=True)
    t_under = tl.sum(tl.sum(((ax > 0.0) & (y <= _TL_UNDERFLOW)).to(tl.int32), axis=1), axis=0)
    t_sat = tl.sum(tl.sum((y > _TL_SATURATION).to(tl.int32), axis=1), axis=0)
    return tl.maximum(amax, t_amax), under + t_under, sat + t_sat


@triton.jit
def tl_fp8_stats_flush(stats_ptr, amax, under, sat, first, rows, cols):
    """Adds one program's partials to stats_ptr[0:4], at its end: at most one relaxed atomic per
    word, and none that would leave its word as it is. The amax word only grows while a launch
    runs, so a partial at or below a value read from it (volatile: from L2, not a stale L1
    line) cannot raise it; counts of 0 add nothing. stats[3] gets the launch's rows * cols
    values (run-time or constexpr integers, multiplied in int64) from its `first` program."""
    amax = amax.to(tl.int64)
    seen = tl.load(stats_ptr, volatile=True)
    tl.atomic_max(stats_ptr, amax, mask=amax > seen, sem="relaxed")
    tl.atomic_add(stats_ptr + 1, under.to(tl.int64), mask=under != 0, sem="relaxed")
    tl.atomic_add(stats_ptr + 2, sat.to(tl.int64), mask=sat != 0, sem="relaxed")
    values = (rows + tl.zeros([], dtype=tl.int64)) * cols
    tl.atomic_add(stats_ptr + 3, values, mask=first & (values != 0), sem="relaxed")


def torch_fp8_stats_add(stats: torch.Tensor | None, x: torch.Tensor, inv: torch.Tensor) -> None:
    """The reference of a launch's counting (`tl_fp8_stats_tile` on every tile, then the flushes)
    over a whole tensor: x (any float dtype, any shape), inv broadcast against it; adds into
    stats (4 int64 words) on the device, no host sync. Nothing when stats is None."""
    if stats is None:
        return
    ax = x.float().abs()
    y = ax * inv
    amax = ax.amax() if ax.numel() else ax.new_zeros(())
    counts = torch.stack([((ax > 0) & (y <= UNDERFLOW_BOUND)).sum(), (y > SATURATION_BOUND).sum()])
    flat = stats.view(-1)
    flat[0] = torch.maximum(flat[0], amax.view(torch.int32).to(torch.int64))
    flat[1:3] += counts
    flat[3] += ax.numel()
