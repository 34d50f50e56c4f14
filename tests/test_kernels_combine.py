"""Unpermute + combine (kernels/combine.py): the kernels are bitwise equal to their reference
(kernels/reference_combine.py); the reference is checked against a per-token fp64 loop and its
torch path by gradcheck in float64. On CPU the kernels run in Triton's interpreter; GPU tests
(`-m gpu`) run real shapes.

Shape letters (README.md): T tokens, A experts a token is routed to, M = T*A routed rows, H hidden
size, E experts.
"""

from __future__ import annotations

import pytest
import torch

import kernels.reference_combine as ref
from kernels.combine import UnpermuteCombine, gather_sum, unpermute_combine, unpermute_combine_bwd

from fp8_inputs import assert_same

U32 = 2.0**-24  # fp32 unit roundoff


# ---- combine -------------------------------------------------------------------------------------


def combine_inputs(T=37, A=3, H=200, E=5, seed=0, device="cpu", dtype=torch.bfloat16):
    """Routing from moe.permute (through tests/routing_helpers.py; row_of_TA a permutation of T*A
    rows), about one assignment in six dropped, NaN in the dropped rows of y."""
    from routing_helpers import permute

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E + 1, (T, A), generator=g)
    _, _, meta = permute(torch.zeros(T, 1), ids, E)
    y = torch.randn(T * A, H, generator=g).to(dtype)
    y[meta.row_of_TA[~meta.kept_TA]] = float("nan")
    w = torch.rand(T, A, generator=g)
    dout = torch.randn(T, H, generator=g).to(dtype)
    return tuple(t.to(device) for t in (y, meta.row_of_TA, w, meta.kept_TA, dout))


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of n fp32 roundings in a sum."""
    return n * U32 / (1 - n * U32)


def _combine_loop64(y, row_of_TA, w, kept):
    """The definition, one token at a time in fp64."""
    T, A = row_of_TA.shape
    out = torch.zeros(T, y.shape[1], dtype=torch.float64)
    for t in range(T):
        for a in range(A):
            if kept[t, a]:
                out[t] += w[t, a].double() * y[row_of_TA[t, a]].double()
    return out


def test_combine_reference_definition():
    y, rows, w, kept, dout = combine_inputs(seed=1)
    T, A = rows.shape
    out = ref.torch_unpermute_combine(y, rows, w, kept)
    expected = _combine_loop64(y, rows, w, kept)
    # fp32: A rounded products and A - 1 additions, |error| <= gamma_2A sum|terms| <= 2A u sum|terms|
    # (first order), then one bf16 rounding, half a step = 2^-8 of the value at most.
    terms = torch.zeros_like(expected)
    for a in range(A):
        terms += torch.where(kept[:, a, None], (w[:, a, None].double() * y[rows[:, a]].double()).abs(), 0.0)
    bound = 2.0**-8 * (expected.abs() + 2 * A * U32 * terms) + 2 * A * U32 * terms
    assert not out.isnan().any()
    assert torch.all((out.double() - expected).abs() <= bound)
    dy, dw = ref.torch_unpermute_combine_bwd(dout, y, rows, w, kept)
    for t in range(T):
        for a in range(A):
            r = rows[t, a]
            if not kept[t, a]:
                assert torch.all(dy[r] == 0) and dw[t, a] == 0
                continue
            dy_exact = w[t, a].double() * dout[t].double()
            # one fp32 product (u) then one bf16 rounding (2^-8 of the fp32 value)
            assert torch.all((dy[r].double() - dy_exact).abs() <= (2.0**-8 + 2.0**-22) * dy_exact.abs())
            prods = dout[t].double() * y[r].double()  # exact in fp32 (8 + 8 significant bits)
            assert abs(dw[t, a].item() - prods.sum().item()) <= _gamma(y.shape[1] - 1) * prods.abs().sum().item()


def test_combine_torch_path_gradcheck_float64():
    y, rows, w, kept, _ = combine_inputs(T=6, A=2, H=5, E=3, seed=2, dtype=torch.float64)
    y = y.nan_to_num(0.0)  # gradcheck perturbs every input element; NaN rows are tested elsewhere
    w = w.double().requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda y, w: UnpermuteCombine.apply(y, rows, w, kept), (y, w))


@pytest.mark.parametrize("A", [3, 8])  # the backward's programs own 8 and 4 tokens; T=37 leaves a partial tile
def test_combine_kernel_matches_reference(A):
    y, rows, w, kept, dout = combine_inputs(A=A, seed=3)
    out = unpermute_combine(y, rows, w, kept)
    assert_same([out], [ref.torch_unpermute_combine(y, rows, w, kept)])
    dy, dw = unpermute_combine_bwd(dout, y, rows, w, kept)
    dy_ref, dw_ref = ref.torch_unpermute_combine_bwd(dout, y, rows, w, kept)
    assert_same([dy], [dy_ref])
    assert not out.isnan().any() and not dy.isnan().any() and not dw.isnan().any()
    # dweights: fp32 sums of H exact products in another order, each within gamma_(H-1) sum|products|.
    prods = torch.stack([(dout.double() * y[rows[:, a]].double()).nan_to_num(0).abs().sum(1) for a in range(A)], 1)
    assert torch.all((dw.double() - dw_ref.double()).abs() <= 2 * _gamma(y.shape[1] - 1) * prods)
    # Through autograd (the Function the layer uses): the same kernels.
    y_leaf, w_leaf = y.clone().requires_grad_(), w.clone().requires_grad_()
    UnpermuteCombine.apply(y_leaf, rows, w_leaf, kept).backward(dout)
    assert_same([y_leaf.grad, w_leaf.grad], [dy, dw])


def test_combine_kernel_zero_rows_when_not_a_permutation():
    """M > T*A (rows no assignment points at): dy is zero there."""
    y, rows, w, kept, dout = combine_inputs(T=9, A=2, H=16, seed=4)
    y = torch.cat([y, torch.full((4, 16), float("nan"), dtype=y.dtype)])
    dy, _ = unpermute_combine_bwd(dout, y, rows, w, kept)
    assert_same([dy], [ref.torch_unpermute_combine_bwd(dout, y, rows, w, kept)[0]])
    assert torch.all(dy[-4:] == 0)


# ---- gather_sum: the permutation's backward -----------------------------------------------------


def test_gather_sum_reference_definition():
    """Each token's kept rows summed: exact in fp64 order-free terms up to A - 1 fp32 additions."""
    y, rows, _, kept, _ = combine_inputs(T=23, A=4, H=48, seed=6)
    got = ref.torch_gather_sum(y, rows, kept, torch.float32)
    want = _combine_loop64(y, rows, torch.ones(rows.shape), kept)
    terms = sum(torch.where(kept[:, a, None], y[rows[:, a]].double().abs(), 0.0) for a in range(4))
    assert got.dtype == torch.float32 and not got.isnan().any()  # NaN rows are dropped ones
    assert torch.all((got.double() - want).abs() <= _gamma(3) * terms)


@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("T, A, H", [(37, 3, 200), (1, 1, 128), (18, 8, 384)])
def test_gather_sum_kernel_matches_reference(dtype, out_dtype, T, A, H):
    """Bitwise: the same fp32 additions in the same order. Odd H (200), one token, top-8,
    dropped assignments whose rows hold NaN (never read)."""
    y, rows, _, kept, _ = combine_inputs(T=T, A=A, H=H, seed=7, dtype=dtype)
    got = gather_sum(y, rows, kept, out_dtype)
    want = ref.torch_gather_sum(y, rows, kept, out_dtype)
    assert got.dtype == out_dtype and got.shape == (T, H)
    assert_same([got], [want])
    assert not got.isnan().any()


def test_gather_sum_equals_unit_weight_combine():
    y, rows, _, kept, _ = combine_inputs(seed=8)
    assert_same([gather_sum(y, rows, kept, y.dtype)], [unpermute_combine(y, rows, torch.ones(rows.shape), kept)])


def test_gather_sum_bad_input_is_a_clear_error():
    y, rows, _, kept, _ = combine_inputs(T=5, A=2, H=16, seed=9)
    with pytest.raises(ValueError, match="kept_TA .* must match row_of_TA"):
        gather_sum(y, rows, kept[:, :1], torch.float32)
    with pytest.raises(ValueError, match="y_MH must be 2-D"):
        gather_sum(y[None], rows, kept, torch.float32)


@pytest.mark.gpu
def test_gpu_combine_bitwise(device):
    T, A, H, E = 16384, 8, 4096, 64
    y, rows, w, kept, dout = combine_inputs(T, A, H, E, seed=5, device=device)
    out = unpermute_combine(y, rows, w, kept)
    assert_same([out], [ref.torch_unpermute_combine(y, rows, w, kept)])
    dy, dw = unpermute_combine_bwd(dout, y, rows, w, kept)
    dy_ref, dw_ref = ref.torch_unpermute_combine_bwd(dout, y, rows, w, kept)
    assert_same([dy], [dy_ref])
    prods = torch.stack([(dout.double() * y[rows[:, a]].double()).nan_to_num(0).abs().sum(1) for a in range(A)], 1)
    assert torch.all((dw.double() - dw_ref.double()).abs() <= 2 * _gamma(H - 1) * prods)


@pytest.mark.gpu
@pytest.mark.parametrize("T, A, H", [(16384, 2, 4096), (4097, 8, 7168)])
def test_gpu_gather_sum_bitwise(device, T, A, H):
    y, rows, _, kept, _ = combine_inputs(T, A, H, 64, seed=10, device=device)
    got = gather_sum(y, rows, kept, torch.float32)
    assert_same([got], [ref.torch_gather_sum(y, rows, kept, torch.float32)])
    assert not got.isnan().any()
