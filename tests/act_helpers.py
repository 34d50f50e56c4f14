"""Shared inputs and error bounds for the activation + FP8 quantization tests
(tests/test_kernels_act_math.py, tests/test_kernels_act_reference.py,
tests/test_kernels_act_quant.py).

Inputs: bf16 rows with the awkward cases (`odd_h`); groups with empty ones, odd sizes and rows
dropped by capacity past the last group (`SIZES`, `DROPPED`, `bwd_inputs`). Bounds:
`_error_budget`, the sum of the magnitudes of the terms each fp32 formula adds up, and
`_act_error_bound`, built on it: the bound delta on the difference between the kernels' fp32
values and the reference's.
Test files import it as `act_helpers`: tests/ has no __init__.py, so pytest's default "prepend"
import mode puts tests/ itself on sys.path.
"""

from __future__ import annotations

import math

import torch

import kernels.reference_act as ref

from fp8_inputs import group_ends, rows_with_specials

SIZES = [0, 1, 15, 17, 0, 129, 3]  # empty groups, 1, odd sizes, one past a multiple of 128
DROPPED = 5  # rows past the last group (dropped by capacity): garbage, even NaN, in the inputs


def odd_h(M: int, X: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """bf16 rows with the awkward cases: zeros, values at and past the E4M3 limit, a huge dynamic
    range (E4M3 subnormals and underflow), a constant row."""
    patterns = [[448.0, -448.0, 60.0, -30.0, 449.0, 0.5], [20.0, -1e-3, 2e-2, 7.0, -1e-6, 0.0]]
    return rows_with_specials(M, X, patterns, seed, scale)


def bwd_inputs(activation: str, F: int, block: int, sizes=SIZES, seed=0, device="cpu", zero_last=True):
    """(da, h_q, h_scale, group_end) with `DROPPED` NaN rows past the last group and, with
    zero_last, a last group whose gradient is all zeros."""
    M = sum(sizes) + DROPPED
    X = 2 * F if activation == "swiglu" else F
    _, _, h_q, h_scale = ref.torch_act_quant_fwd(odd_h(M, X, seed), activation, block, False, True)
    g = torch.Generator().manual_seed(seed + 1)
    da = torch.randn(M, F, generator=g).bfloat16()
    if zero_last:
        da[sum(sizes) - sizes[-1] : sum(sizes)] = 0
    da[sum(sizes) :] = float("nan")
    h_q.view(torch.uint8)[sum(sizes) :] = 0x7F  # E4M3 NaN
    return tuple(t.to(device) for t in (da, h_q, h_scale, group_ends(sizes)))


def _error_budget(activation: str, h64: torch.Tensor, da64: torch.Tensor | None = None):
    """Per-element sums of the magnitudes of the terms each fp32 formula adds up: the fp32
    evaluation error of a value is <= 2^-16 of it (a budget of 256 ulp for at most ~40 roundings,
    polynomial errors < 0.1 ulp, and the rounding of x*x amplified by exp, <= 78 ulp at
    |x| = 12.5). The 1e-30 term covers the saturation past the clamps (exp at +-87, Phi at
    +-12.5), which is below 1e-35 of the terms. Returns (B_a, B_dh)."""
    if activation == "swiglu":
        g, u = h64.chunk(2, dim=1)
        s = torch.sigmoid(g)
        B_a = (g * s * u).abs() + 1e-30 * (1 + g.abs()) * u.abs()
        if da64 is None:
            return B_a, None
        B_gate = (da64 * u).abs() * (s * (1 + g.abs()) + 1e-30 * (1 + g.abs()))
        B_up = (da64 * g * s).abs() + 1e-30 * (da64 * (1 + g.abs())).abs()
        return B_a, torch.cat([B_gate, B_up], dim=1)
    x = h64
    phi = 0.5 * torch.erfc(-x / math.sqrt(2))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    B_a = (x * phi).abs() + 1e-30 * (1 + x.abs())
    B_dh = None if da64 is None else da64.abs() * (phi + x.abs() * pdf + 1e-30 * (1 + x.abs()))
    return B_a, B_dh


def _act_error_bound(activation: str, h: torch.Tensor, da: torch.Tensor | None = None):
    """Per element, a bound delta on |kernel fp32 value - reference fp32 value| of a and (given
    da) dh: both sides' errors against the exact value, eps * B + 1e-33 S.

    B: `_error_budget`, the sum of the magnitudes of the terms each formula adds up (covers the
    cancellation in dsilu and in the GELU derivative). eps: kernels/act_math.py's bounds, SwiGLU
    (2|g| + 11) u and GELU (1.5 x^2 + 18) u, plus the reference's (exp within 5 ulp, Phi within
    8 ulp and x^2 u amplified by exp), rounded up. S: past its clamps (exp at -87, Phi at -12.5)
    the reference returns up to 1e-33 (1 + |x|) times the other factors where the kernel gives
    about 0. Returns (delta_a, delta_dh); dtype and device of h."""
    B_a, B_dh = _error_budget(activation, h, da)
    if activation == "swiglu":
        g, u = h.chunk(2, dim=1)
        eps, sat = 2.0**-24 * (2 * g.abs() + 32), 1e-33 * (1 + g.abs())
        d_a = eps * B_a + sat * u.abs()
        if da is None:
            return d_a, None
        return d_a, torch.cat([eps, eps], dim=1) * B_dh + torch.cat([sat * (da * u).abs(), sat * da.abs()], dim=1)
    eps, sat = 2.0**-24 * (3 * h * h + 64), 1e-33 * (1 + h.abs())
    return eps * B_a + sat, None if da is None else eps * B_dh + sat * da.abs()
