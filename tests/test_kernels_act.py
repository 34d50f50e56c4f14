"""Activation + FP8 quantization (kernels/act_quant*.py); unpermute + combine: test_kernels_combine.py.

The act kernels compute with hardware exp2 / reciprocal and FMA contraction (kernels/act_math.py),
the references (kernels/reference.py) with fp32 polynomials accurate to a few ulp, so they are
compared within a derived bound instead of bitwise (`_assert_fp8_close_to_reference`):
- each fp32 value the kernel quantizes is within delta = eps * B (+ 1e-33 where the reference
  saturates) of the reference's: eps = (2|g| + 32) u for SwiGLU, (3 x^2 + 64) u for GELU,
  u = 2^-24, B the sum of the magnitudes of the formula's terms (`_act_error_bound`; checked
  directly on the fp32 values by `test_kernel_activation_math_within_bound`);
- scales: the same rule on an amax that moved by at most max(delta) of its span, so
  |scale - ref| <= max(delta) / 448 + 1 ulp; power-of-two scales are equal, or a factor 2
  apart where the reference's amax sat within that distance below the power of two (its
  span then holds a 448);
- bytes: q * scale and the reference's each lie within half an E4M3 step of their own value
  (x * (1/scale) is within 3 u of x / scale), so they differ by at most one step plus delta;
- at most MAX_DIFFERING (3e-3) of the values differ at all, and the dequantized tensors'
  relative L2 difference is at most MAX_REL_L2 (1e-2): measured 2.8e-4 and 1.5e-3 at most.
On CPU the kernels run in Triton's interpreter (numpy's exp2 and IEEE division stand in for the
hardware approximations), whose fp32 -> fp8 cast drops a carry into the next binade (7.935 ->
4.0 where torch gives 8.0) and rounds ties away from zero, and whose fp32 -> bf16 cast truncates.
Under the interpreter (only) the kernels first round to the target grid in fp32, so the
interpreter's cast sees exact values (kernels/common.py, `tl_round_to_fp8_grid`);
`test_interpreter_grid_rounding_is_torchs_cast` checks that rounding against torch's casts.
GPU tests (`-m gpu`) run the hardware instructions at real shapes under the same bounds.
The references are checked against independent definitions: fp64 activations and autograd
derivatives of the dequantized h, within the FP8 rounding bound derived in `_assert_fp8_close`.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as Fn
import triton
import triton.language as tl

import kernels.act_math as act_math
import kernels.act_quant as act_quant
import kernels.act_quant_bwd as act_quant_bwd_mod
from kernels import reference as ref
from kernels.act_quant import act_quant_fwd, triton_act_quant_fwd
from kernels.act_quant_bwd import act_quant_bwd, triton_act_quant_bwd
from kernels.common import FP8_DTYPE, round_up, tl_round_to_bf16_grid, tl_round_to_fp8_grid, triton_interpret

# Under the interpreter exp2 overflows to inf for gates below -88, by design (sigmoid -> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

SIZES = [0, 1, 15, 17, 0, 129, 3]  # empty groups, 1, odd sizes, one past a multiple of 128
DROPPED = 5  # rows past the last group (dropped by capacity): garbage, even NaN, in the inputs


def odd_h(M: int, X: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    """bf16 rows with the awkward cases: zeros, values at and past the E4M3 limit, a huge dynamic
    range (E4M3 subnormals and underflow), a constant row."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, X, generator=g) * scale
    specials = [
        torch.zeros(X),
        torch.tensor([448.0, -448.0, 60.0, -30.0, 449.0, 0.5]).repeat(X)[:X],
        torch.tensor([20.0, -1e-3, 2e-2, 7.0, -1e-6, 0.0]).repeat(X)[:X],
        torch.full((X,), -2.5),
    ]
    for i, row in zip(range(1, M, 7), specials):
        h[i] = row
    return h.bfloat16()


def group_ends(sizes) -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32)


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


def assert_same(out, expected):
    assert len(out) == len(expected)
    for i, (a, b) in enumerate(zip(out, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == FP8_DTYPE:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a.cpu(), b.cpu()), f"output {i} differs at {(a != b).nonzero()[:5].tolist()}"


# ---- the interpreter's casts, and the grid rounding that sidesteps them --------------------------


@triton.jit
def _grid_kernel(x_ptr, q_ptr, b_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(q_ptr + offs, tl_round_to_fp8_grid(tl.minimum(tl.maximum(x, -448.0), 448.0)), mask=offs < n)
    tl.store(b_ptr + offs, tl_round_to_bf16_grid(x), mask=offs < n)


def test_interpreter_grid_rounding_is_torchs_cast():
    """Rounding to the E4M3 / bf16 grid in fp32 equals torch's round-to-nearest-even casts,
    including ties, carries into the next binade (7.935 -> 8), E4M3 subnormals and -0."""
    g = torch.Generator().manual_seed(0)
    all_fp8 = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = all_fp8[all_fp8.isfinite()].unique()
    x = torch.cat([
        torch.randn(20000, generator=g) * 100, torch.randn(5000, generator=g) * 1e-2, grid,
        (grid[1:] + grid[:-1]) / 2, -(grid[1:] + grid[:-1]) / 2, torch.tensor([7.935, -0.0, 1e-30, 3e38]),
    ])  # fmt: skip
    q, b = torch.empty_like(x), torch.empty_like(x)
    _grid_kernel[(triton.cdiv(x.numel(), 4096),)](x, q, b, x.numel(), BLOCK=4096)
    fp8 = x.clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(q.to(FP8_DTYPE).view(torch.uint8), fp8.view(torch.uint8))
    assert torch.equal(q, fp8.float())  # already on the grid: any correct cast of q is exact
    assert torch.equal(b, x.bfloat16().float())


@triton.jit
def _scale_kernel(s_ptr, amax_ptr, r_ptr, sc_ptr, n, POW2: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(s_ptr + offs, mask=offs < n, other=1.0)
    tl.store(r_ptr + offs, act_math._inv_scale(s, INTERP), mask=offs < n)
    tl.store(sc_ptr + offs, act_math._fp8_scale(tl.load(amax_ptr + offs, mask=offs < n), POW2), mask=offs < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_division_is_ieee(device):
    """Once per scale the kernels divide without div.rn. `_fp8_scale` (amax / 448, Markstein's
    step) is bitwise the IEEE quotient torch computes, zero amaxes giving scale 1, for amaxes
    across 2^-60..2^60. `_inv_scale` (1 / scale, which `_quant` multiplies by) is exact for
    powers of two and within 1 ulp otherwise (rcp.approx on the GPU; exact in the interpreter)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 16
    s = (torch.rand(n, generator=g) + 0.5) * torch.exp2(torch.randint(-60, 60, (n,), generator=g).float())
    s[:200] = torch.exp2(torch.arange(-100, 100).float())
    s[200:400] = (torch.arange(200, dtype=torch.int32) * 2**23 + (20 << 23) + 0x7FFFFF).view(torch.float32)
    s = s.to(device)
    amax = torch.where(torch.arange(n, device=device) % 1000 == 7, 0.0, s)
    r, sc = torch.empty_like(s), torch.empty_like(s)
    for pow2 in (False, True):
        _scale_kernel[(n // 4096,)](s, amax, r, sc, n, POW2=pow2, INTERP=triton_interpret(), BLOCK=4096)
        assert torch.equal(sc.view(torch.int32), ref.torch_fp8_scale(amax, pow2).view(torch.int32))
    exact = torch.ones_like(s) / s
    assert torch.equal(r[:200], exact[:200])
    ulps = (r.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1, ulps.max().item()


# ---- references against independent definitions -------------------------------------------------


def _act64(h64: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h64.chunk(2, dim=1)
        return Fn.silu(gate) * up
    # Exact-erf GELU through erfc: F.gelu's 0.5 x (1 + erf(x / sqrt 2)) cancels even in fp64 for
    # x < -5 (relative error 2.6e-5 at x = -7.125, more than our fp32 kernel's).
    return 0.5 * h64 * torch.special.erfc(-h64 / math.sqrt(2))


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


def _assert_fp8_close(q, scale, v64, B, where=""):
    """q * scale against the exact value v64. The kernel rounds its fp32 value v (|v - v64| <= d,
    d = 2^-16 B) divided by the scale s (one more rounding, 2^-23 relative at most) to E4M3:
    half a step is 2^-4 of the value for normals, 2^-10 s in the subnormal range, and a clamp
    at 448 only removes the division's excess. So |q s - v64| <= 2^-4 (1 + 2^-23)(|v64| + d)
    + 2^-10 s + d."""
    deq, s, v64 = q.double() * scale.double(), scale.double(), v64.double()
    d = 2.0**-16 * B.double()
    bound = 2.0**-4 * (1 + 2.0**-23) * (v64.abs() + d) + 2.0**-10 * s + d
    bad = ~((deq - v64).abs() <= bound)
    assert not bad.any(), f"{where}: {bad.sum().item()} values off, e.g. {deq[bad][:3]} vs {v64[bad][:3]}"


def _assert_scale(scale, amax64, Bmax, pow2, where=""):
    """scale = amax / 448 (fp32), or the next power of two; 1 where amax is 0. amax is the fp32
    values', each within 2^-16 Bmax of the exact ones."""
    s, amax64 = scale.double(), amax64.double()
    d = 2.0**-16 * Bmax.double()
    lo, hi = (amax64 - d).clamp_min(0) / 448 * (1 - 2.0**-23), (amax64 + d) / 448 * (1 + 2.0**-23)
    if pow2:
        assert torch.all(torch.frexp(s)[0] == 0.5), f"{where}: not powers of two"
        ok = (s >= lo) & (s < 2 * hi)
    else:
        ok = (s >= lo) & (s <= hi)
    ok = torch.where(amax64 + d == 0, s == 1, ok | ((amax64 - d <= 0) & (s == 1)))
    assert ok.all(), f"{where}: {(~ok).sum().item()} scales off, e.g. {s[~ok][:3]} vs amax {amax64[~ok][:3]}"


def _expand(scale, block, n):
    """(R,) or (R, n // block) scales -> (R, n)."""
    return scale[:, None].expand(-1, n) if block == 0 else scale.repeat_interleave(block, dim=1)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("activation, F, block", [("swiglu", 256, 0), ("swiglu", 384, 128), ("gelu", 200, 0),
                                                  ("gelu", 384, 128)])  # fmt: skip
def test_reference_fwd_definition(activation, F, block, pow2):
    X = 2 * F if activation == "swiglu" else F
    h = odd_h(64, X, seed=3)
    a_q, a_scale, h_q, h_scale = ref.torch_act_quant_fwd(h, activation, block, pow2, True)
    h64 = h.double()
    a64 = _act64(h64, activation)
    B_a, _ = _error_budget(activation, h64)
    _assert_fp8_close(a_q, _expand(a_scale, block, F), a64, B_a, "a")
    _assert_fp8_close(h_q, _expand(h_scale, block, X), h64, torch.zeros_like(h64), "h")  # h is exact in fp32
    span = block or F
    _assert_scale(a_scale.view(64, -1), a64.abs().view(64, -1, span).amax(2), B_a.view(64, -1, span).amax(2), pow2)
    span = block or X
    _assert_scale(h_scale.view(64, -1), h64.abs().view(64, -1, span).amax(2), torch.zeros(64, X // span), pow2)
    assert torch.all(a_q[1].view(torch.uint8) == 0) and torch.all(a_scale[1] == 1)  # the zero row
    empty = ref.torch_act_quant_fwd(h, activation, block, pow2, False)
    assert empty[2].numel() == 0 and empty[3].numel() == 0


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("activation, F, block, align", [("swiglu", 96, 0, 16), ("swiglu", 128, 128, 128),
                                                         ("gelu", 80, 0, 32), ("gelu", 384, 128, 128)])  # fmt: skip
def test_reference_bwd_definition(activation, F, block, align, pow2):
    da, h_q, h_scale, ends = bwd_inputs(activation, F, block, seed=5)
    dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end = ref.torch_act_quant_bwd(
        da, h_q, h_scale, activation, ends, align, block, pow2
    )
    M, X = h_q.shape
    E, kept = len(SIZES), sum(SIZES)
    # The dequantized h the way the kernel forms it (q * scale in fp32); everything after in fp64.
    h64 = (h_q.float() * _expand(h_scale, block, X)).double()[:kept].requires_grad_()
    da64 = da[:kept].double()
    a64 = _act64(h64, activation)
    (dh64,) = torch.autograd.grad((a64 * da64).sum(), h64)
    h64, a64 = h64.detach(), a64.detach()
    B_a, B_dh = _error_budget(activation, h64, da64)

    # dgrad operand: rows, then zeros (scale 1) for the dropped rows.
    _assert_fp8_close(dh_q[:kept], _expand(dh_scale, block, X)[:kept], dh64, B_dh, "dh rows")
    span = block or X
    _assert_scale(dh_scale[:kept].view(kept, -1), dh64.abs().view(kept, -1, span).amax(2),
                  B_dh.view(kept, -1, span).amax(2), pow2, "dh row scales")  # fmt: skip
    assert torch.all(dh_q[kept:].view(torch.uint8) == 0) and torch.all(dh_scale[kept:] == 1)

    # wgrad operands: each group's rows transposed into its padded columns, zeros elsewhere.
    P = round_up(M, align) + E * align
    assert dht_q.shape == (X, P) and at_q.shape == (F, P) and padded_end.dtype == torch.int32
    assert padded_end.tolist() == torch.tensor([round_up(s, align) for s in SIZES]).cumsum(0).tolist()
    written = torch.zeros(P, dtype=torch.bool)
    for e, size in enumerate(SIZES):
        if size == 0:  # nothing written; the scale checks below cover empty groups
            continue
        start, pstart = sum(SIZES[:e]), padded_end[e].item() - round_up(size, align)
        cols, rows = slice(pstart, pstart + size), slice(start, start + size)
        written[cols] = True
        for name, q, scale, v64, B in [("dh^T", dht_q, dht_scale, dh64, B_dh), ("a^T", at_q, at_scale, a64, B_a)]:
            if block:
                tiles = slice(pstart // block, (pstart + round_up(size, block)) // block)
                s_cols = scale[:, tiles].repeat_interleave(block, dim=1)[:, :size]
                v_pad = torch.zeros(v64.shape[1], round_up(size, block), dtype=torch.float64)
                b_pad = torch.zeros_like(v_pad)
                v_pad[:, :size], b_pad[:, :size] = v64[rows].t(), B[rows].t()
                amax = v_pad.abs().view(-1, v_pad.shape[1] // block, block).amax(2)
                Bmax = b_pad.view(-1, b_pad.shape[1] // block, block).amax(2)
                _assert_scale(scale[:, tiles], amax, Bmax, pow2, f"{name} tile scales, group {e}")
            else:
                s_cols = scale[:, e : e + 1].expand(-1, size)
                _assert_scale(scale[:, e], v64[rows].abs().amax(0), B[rows].amax(0), pow2, f"{name} scales, group {e}")
            _assert_fp8_close(q[:, cols], s_cols, v64[rows].t(), B[rows].t(), f"{name} group {e}")
    assert torch.all(dht_q.view(torch.uint8)[:, ~written] == 0) and torch.all(at_q.view(torch.uint8)[:, ~written] == 0)
    if block:  # tiles of padding only have scale 1
        pad_tiles = ~written.view(-1, block).any(1)
        assert torch.all(dht_scale[:, pad_tiles] == 1) and torch.all(at_scale[:, pad_tiles] == 1)
    else:  # empty groups and the all-zero-gradient group get scale 1
        assert torch.all(dht_scale[:, [0, 4, 6]] == 1) and torch.all(at_scale[:, [0, 4]] == 1)


def test_reference_rejects_bad_arguments():
    h = torch.zeros(4, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="activation"):
        ref.torch_act_quant_fwd(h, "relu")
    with pytest.raises(ValueError, match="block"):
        ref.torch_act_quant_fwd(h, "swiglu", 64)
    with pytest.raises(ValueError, match="multiple of block"):
        ref.torch_act_quant_fwd(h[:, :192], "gelu", 128)
    with pytest.raises(ValueError, match="align"):
        ref.torch_act_quant_bwd(torch.zeros(4, 128), h.to(FP8_DTYPE), torch.ones(4, 2), "swiglu",
                                group_ends([4]), 16, 128)  # fmt: skip
    with pytest.raises(ValueError, match="da must have shape"):
        ref.torch_act_quant_bwd(torch.zeros(4, 64), h.to(FP8_DTYPE), torch.ones(4), "swiglu", group_ends([4]))


# ---- act kernels against the reference (interpreter on CPU): the numerics contract ---------------

# Fraction of FP8 values allowed to differ from the reference's at all (each by one E4M3 step at
# most), plus 2 for isolated flips in tiny outputs. Measured with the interpreter: at most 2.8e-4
# (the saved h, where x / scale is exactly an E4M3 tie that x * (1/scale) breaks by its rounding
# error and the reference to even), 9.2e-5 elsewhere; 10x margin for the GPU's ex2 / rcp.
MAX_DIFFERING = 3e-3
# Relative L2 difference of the dequantized tensors: one step is 6-12% of a value, so a few flips
# among small values show. Measured at most 1.5e-3 (six flips in the GELU blockwise dh rows),
# 2e-4 elsewhere; a systematic one-step error everywhere would give 6e-2 or more.
MAX_REL_L2 = 1e-2


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


@triton.jit
def _act_values_kernel(g_ptr, u_ptr, da_ptr, a_ptr, dg_ptr, du_ptr, n, SWIGLU: tl.constexpr, INTERP: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g, u, da = tl.load(g_ptr + offs, mask=m), tl.load(u_ptr + offs, mask=m), tl.load(da_ptr + offs, mask=m)
    dg, du, a = act_math._act_bwd(da, g, u, SWIGLU, INTERP)
    tl.store(a_ptr + offs, act_math._act(g, u, SWIGLU, INTERP), mask=m)
    tl.store(dg_ptr + offs, dg, mask=m)
    tl.store(du_ptr + offs, du, mask=m)
    tl.store(a_ptr + n + offs, a, mask=m)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_activation_math_within_bound(activation, device):
    """The kernels' fp32 a and dh against the reference's, before any quantization, within
    `_act_error_bound`, over bf16 inputs (the forward's) and FP8-times-scale inputs (the
    backward's) out to |x| = 20, past every clamp. Measured with the interpreter: at most 0.33
    of the bound for SwiGLU (a and dh) and 0.15 for GELU."""
    gen = torch.Generator().manual_seed(0)
    n = 1 << 16
    x = torch.cat([torch.randn(n // 2, generator=gen) * 3, (torch.rand(n // 2, generator=gen) * 40 - 20)])
    u, da = torch.randn(2, n, generator=gen).bfloat16().float()
    for g in (x.bfloat16().float(), (x * 7).to(FP8_DTYPE).float() * 0.1429):
        g, u, da = g.to(device), u.to(device), da.to(device)
        a, dg, du = torch.empty(2 * n, device=device), torch.empty_like(g), torch.empty_like(g)
        _act_values_kernel[(n // 4096,)](g, u, da, a, dg, du, n, SWIGLU=activation == "swiglu",
                                         INTERP=triton_interpret(), BLOCK=4096)  # fmt: skip
        assert torch.equal(a[:n], a[n:])  # forward and backward agree on a
        h = torch.stack([g, u], dim=1) if activation == "swiglu" else g[:, None]
        d_a, d_dh = _act_error_bound(activation, h.double(), da[:, None].double())
        dh_ref, a_ref = ref._torch_act_bwd(da[:, None], h, activation)
        dh = torch.stack([dg, du], dim=1) if activation == "swiglu" else dg[:, None]
        for name, v, v_ref, d in (("a", a[:n, None], a_ref, d_a), ("dh", dh, dh_ref, d_dh)):
            err = (v.double() - v_ref.double()).abs()
            assert torch.all(err <= d), f"{name}: {(err / d).max().item():.2f} of the bound"


def _e4m3_step(q: torch.Tensor) -> torch.Tensor:
    """Spacing of the E4M3 grid in q's binade: 2^(e - 3), and 2^-9 for subnormals and zero."""
    return torch.ldexp(torch.ones_like(q), torch.frexp(q.abs().clamp_min(2.0**-6))[1] - 4)


def _row_spans(C: int, block: int):
    """Scale index of each element of rows (R, C) with scales (R,) or (R, C // block)."""
    cols = torch.arange(C)
    return lambda r: r[:, None] * (C // block) + (cols // block).to(r.device) if block else r[:, None].expand(-1, C)


def _col_spans(padded_end: torch.Tensor, P: int, block: int):
    """Scale index of each element of (K, P) column layouts with scales (K, E) or (K, P // block)."""
    E = padded_end.numel()
    p = torch.arange(P, device=padded_end.device)
    col = p // block if block else torch.searchsorted(padded_end.long(), p, right=True).clamp(max=E - 1)
    return lambda r: r[:, None] * (P // block if block else E) + col


def _to_columns(v_MK: torch.Tensor, ends: torch.Tensor, padded_end: torch.Tensor, P: int) -> torch.Tensor:
    """(K, P): row m of group e in column padded_end[e - 1] + m - ends[e - 1], zeros elsewhere."""
    ends, pend = ends.long(), padded_end.long()
    m = torch.arange(int(ends[-1]), device=v_MK.device)
    e = torch.searchsorted(ends, m, right=True)
    start, pstart = torch.cat([ends.new_zeros(1), ends])[e], torch.cat([pend.new_zeros(1), pend])[e]
    out = v_MK.new_zeros(v_MK.shape[1], P)
    out[:, pstart + m - start] = v_MK[: m.numel()].t()
    return out


def _assert_fp8_close_to_reference(q, scale, q_ref, scale_ref, spans, delta, pow2, where):
    """The contract of the module docstring for one FP8 output: q (R, C) with scales `scale`,
    element (r, c) scaled by scale.flatten()[spans(r)[c]]; delta (R, C) bounds the fp32 values'
    difference (None: 0, the values are the same). Rows go in chunks to bound GPU memory."""
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype == FP8_DTYPE, (where, q.shape, q_ref.shape)
    assert scale.shape == scale_ref.shape and scale.dtype == scale_ref.dtype == torch.float32, where
    s, s_ref = scale.flatten().double(), scale_ref.flatten().double()
    dmax, qmax, qmax_ref = (torch.zeros_like(s) for _ in range(3))
    R, C = q.shape
    n_bad, bad_example, differing, sq_diff, sq_ref = 0, "", 0, 0.0, 0.0
    step = max(1, (1 << 22) // max(C, 1))
    for r0 in range(0, R, step):
        rows = torch.arange(r0, min(R, r0 + step), device=q.device)
        span = spans(rows).flatten()
        qk, qr = q[rows].double().flatten(), q_ref[rows].double().flatten()
        d = torch.zeros_like(qk) if delta is None else delta[rows].double().flatten()
        dmax.scatter_reduce_(0, span, d, "amax")
        qmax.scatter_reduce_(0, span, qk.abs(), "amax")
        qmax_ref.scatter_reduce_(0, span, qr.abs(), "amax")
        sk, sr = s[span], s_ref[span]
        deq, deq_ref = qk * sk, qr * sr
        tol = 0.5 * (_e4m3_step(qk) * sk + _e4m3_step(qr) * sr) + d + 2.0**-22 * torch.maximum(deq.abs(), deq_ref.abs())
        bad = ~((deq - deq_ref).abs() <= tol)
        if bad.any():
            n_bad += bad.sum().item()
            bad_example = bad_example or f"{deq[bad][:3].tolist()} vs {deq_ref[bad][:3].tolist()}"
        differing += (qk != qr).sum().item()
        sq_diff += (deq - deq_ref).square().sum().item()
        sq_ref += deq_ref.square().sum().item()
    if pow2:  # equal, or one power of two apart where the smaller scale's span reaches 448
        ok = (s == s_ref) | ((s == 2 * s_ref) & (qmax_ref == 448)) | ((2 * s == s_ref) & (qmax == 448))
    else:
        ok = (s - s_ref).abs() <= dmax / 448 * (1 + 2.0**-20) + 2.0**-23 * torch.maximum(s, s_ref)
    # Spans whose values all lie below 2^-100 (GELU's derivative at h ~ -12.7 is ~1e-34): the
    # hardware ex2/rcp run flush-to-zero and lose their relative accuracy next to the subnormal
    # range, so such a span's scale is only known to be tiny. Seen once on an H200: kernel
    # 1.2e-38 vs reference 7.5e-37 for one of 102,400 column scales (values below 3.4e-34).
    ok |= (s <= 2.0**-100 / 448) & (s_ref <= 2.0**-100 / 448)
    assert ok.all(), f"{where}: {(~ok).sum().item()} scales off, e.g. {s[~ok][:3].tolist()} vs {s_ref[~ok][:3]}"
    assert n_bad == 0, f"{where}: {n_bad} values more than one E4M3 step off, e.g. {bad_example}"
    assert differing <= MAX_DIFFERING * q.numel() + 2, f"{where}: {differing} of {q.numel()} values differ"
    assert sq_diff <= MAX_REL_L2**2 * sq_ref, f"{where}: relative L2 {(sq_diff / max(sq_ref, 1e-300)) ** 0.5:.2e}"


def _dequant(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 q * scale, as kernel and reference both form the backward's h."""
    return q.float() * (scale[:, None] if block == 0 else scale.repeat_interleave(block, dim=1))


def _check_fwd(h, activation, block, pow2, out, expected, where=""):
    """act_quant_fwd's outputs against the reference's, by `_assert_fp8_close_to_reference`."""
    assert [t.shape for t in out] == [t.shape for t in expected], where
    a_q, a_scale, h_q, h_scale = out
    M, F = a_q.shape
    d_a, _ = _act_error_bound(activation, h.double() if h.is_cpu else h.float())
    _assert_fp8_close_to_reference(a_q, a_scale, *expected[:2], _row_spans(F, block), d_a, pow2, f"{where} a")
    if h_q.numel():  # h is exact in fp32 on both sides
        _assert_fp8_close_to_reference(h_q, h_scale, *expected[2:], _row_spans(h.shape[1], block), None, pow2,
                                       f"{where} h")  # fmt: skip


def _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected, where=""):
    """act_quant_bwd's outputs against the reference's: dh rows, dh^T and a^T within the bounds,
    padded ends exactly."""
    assert [t.shape for t in out] == [t.shape for t in expected], where
    dh_q, dh_scale, dht_q, dht_scale, at_q, at_scale, padded_end = out
    assert_same([padded_end], [expected[6]])
    M, X = h_q.shape
    P, kept = dht_q.shape[1], int(ends[-1])
    h = _dequant(h_q, h_scale, block)[:kept]
    wide = torch.float64 if h.is_cpu else torch.float32
    d_a, d_dh = _act_error_bound(activation, h.to(wide), da[:kept].to(wide))
    d_rows = torch.cat([d_dh, d_dh.new_zeros(M - kept, X)])  # rows in no group: zeros on both sides
    _assert_fp8_close_to_reference(dh_q, dh_scale, *expected[:2], _row_spans(X, block), d_rows, pow2, f"{where} dh")
    cols = _col_spans(padded_end, P, block)
    _assert_fp8_close_to_reference(dht_q, dht_scale, *expected[2:4], cols, _to_columns(d_dh, ends, padded_end, P),
                                   pow2, f"{where} dh^T")  # fmt: skip
    _assert_fp8_close_to_reference(at_q, at_scale, *expected[4:6], cols, _to_columns(d_a, ends, padded_end, P),
                                   pow2, f"{where} a^T")  # fmt: skip
    assert not dh_q.float().isnan().any() and not dht_q.float().isnan().any()  # dropped rows do not leak


def test_contract_rejects_wrong_outputs():
    """The comparison can fail: one byte two E4M3 steps off, a scale 1% off, one value in a
    hundred one step off, a power-of-two scale doubled without a 448 in its span."""
    h = odd_h(37, 256, seed=1)
    a_q, a_scale, _, _ = ref.torch_act_quant_fwd(h, "swiglu", 128, False, False)
    d_a, _ = _act_error_bound("swiglu", h.double())

    def check(q, scale=a_scale, pow2=False, q_ref=a_q, scale_ref=a_scale):
        _assert_fp8_close_to_reference(q, scale, q_ref, scale_ref, _row_spans(128, 128), d_a, pow2, "")

    check(a_q, a_scale)
    i = ((a_q.view(torch.uint8) > 0x40) & (a_q.view(torch.uint8) < 0x70)).flatten().nonzero()[0].item()
    for steps, fails in ((1, False), (2, True)):
        q = a_q.clone()
        q.view(torch.uint8).view(-1)[i] += steps
        with pytest.raises(AssertionError) if fails else contextlib.nullcontext():
            check(q)
    with pytest.raises(AssertionError, match="scales off"):
        check(a_q, a_scale * torch.where(torch.arange(a_scale.numel()) == 5, 1.01, 1.0).view_as(a_scale))
    q = a_q.clone()
    b = q.view(torch.uint8).view(-1)
    every_100th = torch.arange(0, b.numel(), 100)
    b[every_100th[(b[every_100th] & 0x7F) < 0x7E]] ^= 1  # the last mantissa bit: one step, never NaN
    with pytest.raises(AssertionError, match="values differ"):
        check(q)
    p_q, p_scale, _, _ = ref.torch_act_quant_fwd(h, "swiglu", 128, True, False)
    span = (p_q.float().abs().amax(dim=1) < 448).nonzero()[0].item()  # a row (one tile) without 448
    with pytest.raises(AssertionError, match="scales off"):
        check(p_q, p_scale * torch.where(torch.arange(37)[:, None] == span, 2.0, 1.0), True, p_q, p_scale)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(
    "activation, F, block, chunked",
    [("swiglu", 96, 0, False), ("swiglu", 96, 0, True), ("gelu", 80, 0, True), ("swiglu", 128, 128, False),
     ("gelu", 384, 128, False)],
)  # fmt: skip
def test_fwd_kernel_matches_reference(activation, F, block, chunked, pow2, monkeypatch):
    if chunked:  # rows longer than one chunk: the amax sweep then the quantize sweep
        monkeypatch.setattr(act_quant, "_fwd_config", lambda F, block_k: (2, 32, 4))
    X = 2 * F if activation == "swiglu" else F
    h = odd_h(37, X, seed=1)
    for save in (True, False):
        out = act_quant._act_quant_fwd_impl(h, activation, block, pow2, save)
        _check_fwd(h, activation, block, pow2, out, ref.torch_act_quant_fwd(h, activation, block, pow2, save))
    empty = h[:0]  # M = 0
    assert_same(act_quant_fwd(empty, activation, block, pow2), ref.torch_act_quant_fwd(empty, activation, block, pow2))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("activation, F, block, align", [("swiglu", 96, 0, 16), ("gelu", 80, 0, 32),
                                                         ("swiglu", 128, 128, 128), ("gelu", 384, 128, 128)])  # fmt: skip
def test_bwd_kernel_matches_reference(activation, F, block, align, pow2):
    da, h_q, h_scale, ends = bwd_inputs(activation, F, block, seed=2)
    out = act_quant_bwd_mod._act_quant_bwd_impl(da, h_q, h_scale, activation, ends, align, block, pow2)
    expected = ref.torch_act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected)


@pytest.mark.parametrize("sizes", [[0, 0, 0], [40], [7, 0]])
def test_bwd_kernel_edge_groups(sizes):
    """No rows in any group (everything dropped), one group holding every row, a trailing empty group."""
    da, h_q, h_scale, ends = bwd_inputs("swiglu", 32, 0, sizes=sizes, seed=4, zero_last=False)
    no_rows = (da[:0], h_q[:0], h_scale[:0], "swiglu", ends * 0, 16, 0, False)
    for args in [(da, h_q, h_scale, "swiglu", ends, 16, 0, False), no_rows]:
        out = act_quant_bwd_mod._act_quant_bwd_impl(*args)
        _check_bwd(*args[:5], 0, False, out, ref.torch_act_quant_bwd(*args))


def test_custom_ops_trace_with_fake_tensors():
    """The registered ops have fake implementations (what torch.compile traces) with the real shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    da, h_q, h_scale, ends = bwd_inputs("swiglu", 128, 128)
    h = odd_h(9, 256)
    real = [t.shape for t in act_quant_fwd(h, "swiglu", 128)] + [
        t.shape for t in act_quant_bwd(da, h_q, h_scale, "swiglu", ends, 128, 128)
    ]
    with FakeTensorMode() as mode:
        fake = [t.shape for t in triton_act_quant_fwd(mode.from_tensor(h), "swiglu", 128, False, True)] + [
            t.shape
            for t in triton_act_quant_bwd(*(mode.from_tensor(t) for t in (da, h_q, h_scale)), "swiglu",
                                          mode.from_tensor(ends), 128, 128, False)  # fmt: skip
        ]
    assert fake == real


# ---- GPU: real shapes; act kernels within the contract ---------------------------------------

GPU_SHAPES = [  # (activation, M, F, E): Mixtral 8x7B, Qwen3-30B-A3B, the GELU seed shape
    ("swiglu", 16384, 14336, 8),
    ("swiglu", 65536, 768, 128),
    ("gelu", 32768, 6400, 16),
]


def _gpu_sizes(M: int, E: int, seed: int) -> list[int]:
    """Random group sizes with the odd ones forced in: 0, 1, 15, 17, 129; a few rows dropped."""
    g = torch.Generator().manual_seed(seed)
    odd = [0, 1, 15, 17, 129, 0]
    rest = M - DROPPED - sum(odd)
    counts = torch.bincount(torch.randint(0, E - len(odd), (rest,), generator=g), minlength=E - len(odd))
    return odd + counts.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("block, pow2", [(0, False), (128, False), (0, True)])
@pytest.mark.parametrize("activation, M, F, E", GPU_SHAPES)
def test_gpu_act_kernels_match_reference(activation, M, F, E, block, pow2, device):
    X = 2 * F if activation == "swiglu" else F
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(M, X, device=device, generator=g) * 3).bfloat16()
    h[1], h[2, ::3] = 0, 448.0  # an all-zero row; values at the E4M3 limit
    fwd = act_quant_fwd(h, activation, block, pow2)
    _check_fwd(h, activation, block, pow2, fwd, ref.torch_act_quant_fwd(h, activation, block, pow2), "fwd")
    # The backward from the reference's FP8 h, so that both sides start from the same bytes.
    _, _, h_q, h_scale = ref.torch_act_quant_fwd(h, activation, block, pow2)
    del fwd, h
    sizes = _gpu_sizes(M, E, seed=1)
    ends = group_ends(sizes).to(device)
    da = torch.randn(M, F, device=device, generator=g).bfloat16()
    da[sum(sizes) :] = float("nan")
    align = 128 if block else 16
    out = act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    expected = ref.torch_act_quant_bwd(da, h_q, h_scale, activation, ends, align, block, pow2)
    _check_bwd(da, h_q, h_scale, activation, ends, block, pow2, out, expected, "bwd")
