"""The activation + FP8 quantization references (kernels/reference_act.py: torch_act_quant_fwd,
torch_act_quant_bwd) against independent definitions: fp64 activations and autograd derivatives
of the dequantized h, within the FP8 rounding bound derived in `_assert_fp8_close` (the fp32
evaluation error from `_error_budget`, tests/act_helpers.py), scales by `_assert_scale`; and the
references' argument checks. The kernels against these references: test_kernels_act_quant.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

from act_helpers import SIZES, _error_budget, bwd_inputs, group_ends, odd_h
import kernels.reference_act as ref
from kernels.common import FP8_DTYPE, round_up


# ---- references against independent definitions -------------------------------------------------


def _act64(h64: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h64.chunk(2, dim=1)
        return Fn.silu(gate) * up
    # Exact-erf GELU through erfc: F.gelu's 0.5 x (1 + erf(x / sqrt 2)) cancels even in fp64 for
    # x < -5 (relative error 2.6e-5 at x = -7.125, more than our fp32 kernel's).
    return 0.5 * h64 * torch.special.erfc(-h64 / math.sqrt(2))


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
