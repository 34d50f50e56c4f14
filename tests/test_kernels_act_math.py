"""The act kernels' fp32 arithmetic (kernels/act_math.py, kernels/common.py's grid rounding),
before any quantization; the kernels' FP8 outputs: test_kernels_act_quant.py.

The act kernels compute with hardware exp2 / reciprocal and FMA contraction (kernels/act_math.py),
the references (kernels/reference_act.py) with fp32 polynomials accurate to a few ulp, so the fp32
values are compared within a derived bound instead of bitwise: each value a kernel quantizes is
within delta = eps * B (+ 1e-33 where the reference saturates) of the reference's:
eps = (2|g| + 32) u for SwiGLU, (3 x^2 + 64) u for GELU, u = 2^-24, B the sum of the magnitudes
of the formula's terms (`_act_error_bound`, tests/act_helpers.py), checked by
`test_kernel_activation_math_within_bound`. The once-per-scale division (`tl_fp8_scale`,
`inv_scale`) is checked by `test_kernel_division_is_ieee`.
On CPU the kernels run in Triton's interpreter (numpy's exp2 and IEEE division stand in for the
hardware approximations), whose fp32 -> fp8 cast drops a carry into the next binade (7.935 ->
4.0 where torch gives 8.0) and rounds ties away from zero, and whose fp32 -> bf16 cast truncates.
Under the interpreter (only) the kernels first round to the target grid in fp32, so the
interpreter's cast sees exact values (kernels/common.py, `tl_round_to_fp8_grid`);
`test_interpreter_grid_rounding_is_torchs_cast` checks that rounding against torch's casts.
GPU tests (`-m gpu`) run the hardware instructions under the same bounds.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kernels.act_math as act_math
from act_helpers import _act_error_bound
import kernels.reference_act as ref
from kernels.common import (
    FP8_DTYPE,
    tl_fp8_scale,
    tl_round_to_bf16_grid,
    tl_round_to_fp8_grid,
    torch_fp8_scale,
    triton_interpret,
)

# Under the interpreter exp2 overflows to inf for gates below -88, by design (sigmoid -> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


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
    tl.store(r_ptr + offs, act_math.inv_scale(s, INTERP), mask=offs < n)
    tl.store(sc_ptr + offs, tl_fp8_scale(tl.load(amax_ptr + offs, mask=offs < n), POW2), mask=offs < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_division_is_ieee(device):
    """Once per scale the kernels divide without div.rn. `tl_fp8_scale` (amax / 448, Markstein's
    step) is bitwise the IEEE quotient torch computes, zero amaxes giving scale 1, for amaxes
    across 2^-60..2^60. `inv_scale` (1 / scale, which `tl_fp8_quantize_by` multiplies by) is exact for
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
        assert torch.equal(sc.view(torch.int32), torch_fp8_scale(amax, pow2).view(torch.int32))
    exact = torch.ones_like(s) / s
    assert torch.equal(r[:200], exact[:200])
    ulps = (r.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert ulps.max().item() <= 1, ulps.max().item()


# ---- the activation formulas in fp32, within `_act_error_bound` ----------------------------------


@triton.jit
def _act_values_kernel(g_ptr, u_ptr, da_ptr, a_ptr, dg_ptr, du_ptr, n, SWIGLU: tl.constexpr, INTERP: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g, u, da = tl.load(g_ptr + offs, mask=m), tl.load(u_ptr + offs, mask=m), tl.load(da_ptr + offs, mask=m)
    dg, du, a = act_math.act_bwd(da, g, u, SWIGLU, INTERP)
    tl.store(a_ptr + offs, act_math.act(g, u, SWIGLU, INTERP), mask=m)
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
        dh_ref, a_ref = ref.torch_act_bwd(da[:, None], h, activation)
        dh = torch.stack([dg, du], dim=1) if activation == "swiglu" else dg[:, None]
        for name, v, v_ref, d in (("a", a[:n, None], a_ref, d_a), ("dh", dh, dh_ref, d_dh)):
            err = (v.double() - v_ref.double()).abs()
            assert torch.all(err <= d), f"{name}: {(err / d).max().item():.2f} of the bound"
