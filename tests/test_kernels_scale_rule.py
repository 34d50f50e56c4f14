"""The scale rule's arithmetic in Triton (kernels/common.py): the interpreter's own FP8 cast and
what `tl_fp8_quantize_by` rounds around it, the division-free scale and reciprocal (IEEE, on the CPU
interpreter and the GPU), and quantizing as x times the IEEE inverse of the scale. The quantizers
built on it are tests/test_kernels_quantize.py's.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.common import FP8_DTYPE, tl_div_448, tl_fp8_quantize, tl_rcp_rn, torch_fp8_quantize, triton_interpret

from fp8_inputs import assert_same

@triton.jit
def _interpreter_cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.float8e4nv), mask=offs < n)


def _interpreter_cast(v: torch.Tensor) -> torch.Tensor:
    v = v.float().contiguous()
    out = torch.empty(v.shape, dtype=FP8_DTYPE)
    if v.numel():
        _interpreter_cast_kernel[(triton.cdiv(v.numel(), 4096),)](v, out, v.numel(), BLOCK=4096)
    return out


# ---- the interpreter's cast: what `tl_fp8_quantize_by`'s grid rounding works around -------------


@pytest.mark.skipif(not triton_interpret(), reason="only the interpreter's cast is off")
def test_interpreter_cast_bug_is_the_known_one():
    g = torch.Generator().manual_seed(1)
    v = torch.cat([(torch.randn(20000, generator=g) * 60).clamp(-448, 448), torch.tensor([7.935, -100.0, 2e-3])])
    v = v.bfloat16().float()  # bf16 inputs make exact ties common, as in the kernels
    ours, torchs = _interpreter_cast(v).float(), v.to(FP8_DTYPE).float()
    diff = ours != torchs
    carry = (torchs.abs() > v.abs()) & (torch.frexp(torchs.abs())[0] == 0.5)  # rounded up to 2^n
    spacing = torch.ldexp(torch.ones_like(v), torch.frexp(v.abs())[1].clamp(min=-5) - 4)  # E4M3 ulp at |v|
    tie = (v - torchs).abs() == spacing / 2  # exactly halfway: the interpreter rounds away from zero
    subnormal = v.abs() < 2.0**-6
    assert diff.any(), "interpreter cast now matches torch: drop the grid rounding in tl_fp8_quantize_by"
    assert not (diff & ~(carry | tie | subnormal)).any(), v[diff & ~(carry | tie | subnormal)][:5]
    assert torch.equal(ours[diff & carry & ~subnormal], torchs[diff & carry & ~subnormal] / 2)


# ---- the scale rule's two divisions, taken without a division ------------------------------------


@triton.jit
def _div_rcp_kernel(a_ptr, q_ptr, s_ptr, r_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(q_ptr + offs, tl_div_448(tl.load(a_ptr + offs, mask=ok, other=1.0)), mask=ok)
    tl.store(r_ptr + offs, tl_rcp_rn(tl.load(s_ptr + offs, mask=ok, other=1.0)), mask=ok)


def _binade(exponent: int, significands: torch.Tensor) -> torch.Tensor:
    return (significands | ((exponent + 127) << 23)).view(torch.float32)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_division_free_scale_and_reciprocal_are_ieee(device):
    """tl_div_448 (amax / 448) and tl_rcp_rn (1 / s) bitwise against torch's IEEE division. GPU:
    every fp32 significand in 40 binades of amax (from 2^-126, where the quotient is subnormal
    and the rule floors it, to 2^127) and 17 of s across [2^-62, 2^125] (div.full.f32 then
    Newton). CPU (the interpreter divides exactly, so only the steps after it are checked):
    2^14 random significands and the all-ones and all-zeros ones. inf and NaN amaxes pass."""
    gen = torch.Generator().manual_seed(0)
    if device == "cuda":
        sig = torch.arange(1 << 23, dtype=torch.int32)
    else:
        sig = torch.cat([torch.randint(0, 1 << 23, (1 << 14,), generator=gen, dtype=torch.int32),
                         torch.tensor([0, (1 << 23) - 1], dtype=torch.int32)])  # fmt: skip
    sig = sig.to(device)
    a_exps = sorted({*range(-126, 128, 7), -61, -60, -59, 127})
    s_exps = sorted({*range(-62, 126, 12), 125})
    for i, a_exp in enumerate(a_exps):
        s_exp = s_exps[i % len(s_exps)]
        a, s = _binade(a_exp, sig), _binade(s_exp, sig)
        q, r = torch.empty_like(a), torch.empty_like(s)
        _div_rcp_kernel[(triton.cdiv(a.numel(), 4096),)](a, q, s, r, a.numel(), BLOCK=4096)
        exact_q = a / torch.full((), 448.0, device=device)
        normal = exact_q >= 2.0**-126  # smaller quotients end at the rule's floor 2^-126 either way
        assert torch.equal(q[normal].view(torch.int32), exact_q[normal].view(torch.int32)), a_exp
        assert torch.all(q[~normal] <= 2.0**-126), a_exp
        assert torch.equal(r.view(torch.int32), (torch.ones_like(s) / s).view(torch.int32)), s_exp
    special = torch.tensor([float("inf"), float("nan"), 0.0], device=device)
    q = torch.empty_like(special)
    _div_rcp_kernel[(1,)](special, q, torch.ones_like(special), torch.empty_like(special), 3, BLOCK=4)
    assert q[0] == float("inf") and q[1].isnan() and q[2] == 0.0


@triton.jit
def _quantize_kernel(x_ptr, s_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    j = tl.program_id(1)  # one scale per grid column, every x under each
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(q_ptr + j * n + offs, tl_fp8_quantize(x, tl.load(s_ptr + j)), mask=offs < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantize_is_x_times_ieee_inverse(device):
    """tl_fp8_quantize bitwise torch_fp8_quantize, clamp(x * RN(1 / scale)) cast, for every
    finite bf16 x (signed zeros, subnormals, up to 3.4e38, so that most scales saturate some)
    at powers of two from the floor 2^-126 to 2^120, the all-ones significand, scales either
    side of 2^-60 (below it the inverse is taken on the scale times 2^64) and random ones.
    GPU: 584 scales; CPU (the interpreter, rounding to the E4M3 grid before its cast): 40 and
    no subnormal x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)]
    if device == "cpu":  # the interpreter converts subnormal bf16 wrongly (1e-39 -> 4.4e-39)
        x = x[(x.float().abs() >= 2.0**-126) | (x == 0)]
    n_random = 520 if device == "cuda" else 10
    exps = torch.randint(-126, 121, (n_random,), generator=gen, dtype=torch.int32)
    random_s = torch.randint(0, 1 << 23, (n_random,), generator=gen, dtype=torch.int32) | ((exps + 127) << 23)
    # the floor, 2^-60 and its neighbours (the inverse's two paths), the largest, plain ones
    special = torch.tensor([2.0**-126, 2.0**-61 * (2 - 2.0**-23), 2.0**-60, 2.0**-60 * (1 + 2.0**-23), 2.0**120,
                            1.0, 3.0, 1 / 448]).view(torch.int32)  # fmt: skip
    pow2 = (torch.arange(-126, 121, 9 if device == "cuda" else 24, dtype=torch.int32) + 127) << 23
    all_ones = pow2 | 0x7FFFFF
    scale = torch.cat([random_s, special, pow2, all_ones]).view(torch.float32).to(device)
    x = x.to(device)
    q = torch.empty(scale.numel(), x.numel(), dtype=FP8_DTYPE, device=device)
    _quantize_kernel[(triton.cdiv(x.numel(), 4096), scale.numel())](x, scale, q, x.numel(), BLOCK=4096)
    assert_same([q], [torch_fp8_quantize(x[None, :], scale[:, None])])
