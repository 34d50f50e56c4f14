"""moe.permute against a per-token loop reference.

Shape letters (README.md): T tokens, A experts a token is routed to (top-k), H hidden, E experts,
M = T*A routed rows.
"""

from __future__ import annotations

import pytest
import torch

from moe.permute import PermuteMeta, gather_rows, plan_permute, unpermute
from moe.router import count_tokens_per_expert

from routing_helpers import permute, random_routing


def loop_moe(x_TH, topk_ids_TA, topk_weights_TA, expert_fns, num_experts):
    """Reference: out[t] = sum over kept k of w[t, k] * f_e(x[t]), one token at a time."""
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(topk_ids_TA.shape[1]):
            e = int(topk_ids_TA[t, k])
            if e < num_experts:
                out[t] = out[t] + topk_weights_TA[t, k] * expert_fns[e](x_TH[t : t + 1])[0]
    return out


def grouped_moe(x_TH, topk_ids_TA, topk_weights_TA, expert_fns, num_experts, garbage=float("nan")):
    """permute -> per-expert function on its group -> unpermute; dropped rows are filled with garbage."""
    x_MH, tokens_per_expert_E, meta = permute(x_TH, topk_ids_TA, num_experts)
    counts = tokens_per_expert_E.tolist()
    kept = sum(counts)
    groups = torch.split(x_MH[:kept], counts, dim=0)
    outs = [fn(g) for fn, g in zip(expert_fns, groups)]
    dropped = torch.full_like(x_MH[kept:], garbage).detach()
    y_MH = torch.cat(outs + [dropped], dim=0)
    return unpermute(y_MH, meta, topk_weights_TA)


def make_experts(num_experts, H, dtype, seed=0):
    """Per-expert tanh(x * a_e + b_e): elementwise, so a row's result does not depend on which
    other rows share its call (a GEMM's summation order can, and bf16 rounding would show it)."""
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(H, generator=g, dtype=dtype), torch.randn(H, generator=g, dtype=dtype)) for _ in range(num_experts)]
    return [lambda x, a=a, b=b: torch.tanh(x * a + b) for a, b in params]


def test_count_tokens_per_expert_skips_dropped_and_counts_zeros():
    ids_TA = torch.tensor([[0, 3], [3, 5], [5, 0]])  # E = 5: id 5 is dropped, experts 1, 2, 4 get none
    counts = count_tokens_per_expert(ids_TA, 5)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [2, 0, 0, 2, 0]


def test_round_trip_a1_unit_weights_gives_x_back():
    T, H, E = 13, 7, 5
    x_TH = torch.randn(T, H)
    ids_TA = random_routing(T, 1, E, seed=1)
    x_MH, _, meta = permute(x_TH, ids_TA, E)
    out = unpermute(x_MH, meta, torch.ones(T, 1))
    assert torch.equal(out, x_TH)


def test_round_trip_topk_mean_gives_x_back():
    T, H, E, A = 11, 6, 8, 4
    x_TH = torch.randn(T, H, dtype=torch.float64)
    ids_TA = random_routing(T, A, E, seed=2)
    x_MH, _, meta = permute(x_TH, ids_TA, E)
    torch.testing.assert_close(unpermute(x_MH, meta, torch.full((T, A), 1.0 / A, dtype=torch.float64)), x_TH)


@pytest.mark.parametrize("drop_frac", [0.0, 0.3])
def test_grouping_is_stable_and_sorted_by_expert(drop_frac):
    T, A, E, H = 37, 3, 9, 4
    x_TH = torch.randn(T, H)
    ids_TA = random_routing(T, A, E, seed=3, drop_frac=drop_frac)
    x_MH, tokens_per_expert_E, meta = permute(x_TH, ids_TA, E)
    assert isinstance(meta, PermuteMeta) and meta.num_tokens == T
    assert x_MH.shape == (T * A, H) and meta.token_idx_M.shape == (T * A,)
    assert torch.equal(x_MH, x_TH[meta.token_idx_M])
    # Row r holds assignment (t, k) with t = token_idx_M[r].
    t_TA = torch.arange(T)[:, None].expand(T, A)
    assert torch.equal(meta.token_idx_M[meta.row_of_TA], t_TA)
    assert sorted(meta.row_of_TA.flatten().tolist()) == list(range(T * A))
    assert torch.equal(meta.kept_TA, ids_TA < E)
    # Expected order: kept assignments by expert, then token, then slot; dropped last.
    id_of_row = torch.empty(T * A, dtype=torch.int64)
    id_of_row[meta.row_of_TA.flatten()] = ids_TA.flatten()
    expected = sorted(range(T * A), key=lambda m: (int(ids_TA.flatten()[m]), m))
    assert [int(r) for r in meta.row_of_TA.flatten()[expected]] == list(range(T * A))
    assert torch.equal(id_of_row, torch.sort(ids_TA.flatten()).values)
    expected_counts = [int((ids_TA == e).sum()) for e in range(E)]
    assert tokens_per_expert_E.tolist() == expected_counts


def test_zero_token_experts():
    T, E, H = 6, 8, 3
    ids_TA = torch.tensor([[2, 5]] * T)  # all other experts get nothing
    x_MH, tokens_per_expert_E, meta = permute(torch.randn(T, H), ids_TA, E)
    assert tokens_per_expert_E.tolist() == [0, 0, T, 0, 0, T, 0, 0]
    assert meta.token_idx_M.tolist() == list(range(T)) + list(range(T))


@pytest.mark.parametrize("drop_frac", [0.0, 0.25])
def test_forward_and_gradients_match_loop_reference_float64(drop_frac):
    T, A, E, H = 19, 3, 6, 5
    ids_TA = random_routing(T, A, E, seed=4, drop_frac=drop_frac)
    experts = make_experts(E, H, torch.float64)
    x_TH = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w_TA = torch.rand(T, A, dtype=torch.float64, requires_grad=True)
    ref = loop_moe(x_TH, ids_TA, w_TA, experts, E)
    got = grouped_moe(x_TH, ids_TA, w_TA, experts, E)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(T, H, dtype=torch.float64)
    ref_gx, ref_gw = torch.autograd.grad(ref, (x_TH, w_TA), grad_out)
    got_gx, got_gw = torch.autograd.grad(got, (x_TH, w_TA), grad_out)
    torch.testing.assert_close(got_gx, ref_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_gw, ref_gw, rtol=1e-12, atol=1e-12)
    dropped = ids_TA == E
    assert torch.all(got_gw[dropped] == 0)


def test_gradcheck_permute_and_unpermute():
    T, A, E, H = 7, 2, 4, 3
    ids_TA = random_routing(T, A, E, seed=5, drop_frac=0.3)
    x_TH = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    w_TA = torch.rand(T, A, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        x_MH, _, meta = permute(x, ids_TA, E)
        return unpermute(x_MH * x_MH, meta, w)  # nonlinear in x so both paths are exercised

    assert torch.autograd.gradcheck(f, (x_TH, w_TA))


@pytest.mark.parametrize("garbage", [float("nan"), float("inf")])
def test_dropped_rows_contribute_exactly_zero(garbage):
    T, A, E, H = 10, 2, 4, 6
    ids_TA = random_routing(T, A, E, seed=6, drop_frac=0.4)
    assert (ids_TA == E).any()
    experts = make_experts(E, H, torch.float32)
    x_TH = torch.randn(T, H, requires_grad=True)
    w_TA = torch.rand(T, A, requires_grad=True)
    got = grouped_moe(x_TH, ids_TA, w_TA, experts, E, garbage=garbage)
    ref = loop_moe(x_TH, ids_TA, w_TA, experts, E)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref)
    gx, gw = torch.autograd.grad(got.sum(), (x_TH, w_TA))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert torch.all(gw[ids_TA == E] == 0)


def test_permute_backward_ignores_garbage_gradient_in_dropped_rows():
    # Grouped GEMMs may leave the rows past the last group unwritten in their input gradient.
    T, A, E, H = 8, 2, 4, 3
    ids_TA = random_routing(T, A, E, seed=7, drop_frac=0.4)
    x_TH = torch.randn(T, H, requires_grad=True)
    x_MH, tokens_per_expert_E, meta = permute(x_TH, ids_TA, E)
    kept = int(tokens_per_expert_E.sum())
    grad_MH = torch.ones_like(x_MH)
    grad_MH[kept:] = float("nan")
    (gx,) = torch.autograd.grad(x_MH, x_TH, grad_MH)
    torch.testing.assert_close(gx, meta.kept_TA.sum(1, keepdim=True).float().expand(T, H))


def test_gather_rows_casts_before_gathering_and_returns_fp32_gradients():
    """The layer's path under autocast: fp32 tokens, bf16 rows, the gradient summed in fp32 and
    returned in fp32 (what gathering fp32 rows and casting them gave, with M - T fewer casts)."""
    T, A, E, H = 13, 3, 5, 40
    ids_TA = random_routing(T, A, E, seed=10, drop_frac=0.2)
    x_TH = torch.randn(T, H, requires_grad=True)
    meta = plan_permute(ids_TA, E)
    x_MH = gather_rows(x_TH, meta, torch.bfloat16)
    ref_MH, _, ref_meta = permute(x_TH, ids_TA, E)  # fp32 rows
    assert x_MH.dtype == torch.bfloat16
    assert torch.equal(x_MH, ref_MH.to(torch.bfloat16)) and torch.equal(meta.row_of_TA, ref_meta.row_of_TA)
    # Three kept rows of 1 + 2**-7 sum to 3 + 3 * 2**-7, off the bf16 grid: only an fp32 sum is exact.
    g_MH = torch.full((T * A, H), 1 + 2**-7, dtype=torch.bfloat16)
    (gx,) = torch.autograd.grad(x_MH, x_TH, g_MH)
    assert gx.dtype == torch.float32
    n_kept = meta.kept_TA.sum(1, keepdim=True).float()
    assert torch.equal(gx, (n_kept * (1 + 2**-7)).expand(T, H))


def test_gather_rows_wrong_token_count_is_a_clear_error():
    meta = plan_permute(random_routing(6, 2, 4, seed=11), 4)
    with pytest.raises(ValueError, match=r"x_TH must be \(6, H\)"):
        gather_rows(torch.randn(5, 3), meta)


def test_unpermute_keeps_y_dtype_and_sums_in_fp32():
    T, A, H = 4, 8, 16
    # Eight bf16 terms of 1 + 2**-7: the exact sum 8.0625 is a bf16 number; a running sum in bf16
    # rounds from the third term on (bf16 spacing is 2**-6 in [2, 4)) and misses it.
    y_MH = torch.full((T * A, H), 1 + 2**-7, dtype=torch.bfloat16)
    ids_TA = torch.arange(A).repeat(T, 1)
    _, _, meta = permute(torch.zeros(T, H, dtype=torch.bfloat16), ids_TA, A)
    out = unpermute(y_MH, meta, torch.ones(T, A))
    assert out.dtype == torch.bfloat16
    assert torch.all(out == 8.0625)


# GPU copies: bf16 on CUDA against the loop reference run in fp32 on the CPU.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("drop_frac", [0.0, 0.25])
def test_gpu_matches_loop_reference(device, dtype, drop_frac):
    T, A, E, H = 300, 4, 16, 64
    ids_TA = random_routing(T, A, E, seed=8, drop_frac=drop_frac)
    experts = make_experts(E, H, torch.float32)
    # The reference sees the same bf16-rounded inputs, expert outputs and output gradient, so
    # what is left to compare is our fp32 accumulation and the final rounding.
    experts_ref = [lambda v, f=f: f(v).to(dtype).float() for f in experts]
    x_ref = torch.randn(T, H).to(dtype).float().requires_grad_()
    w_ref = torch.rand(T, A, requires_grad=True)
    ref = loop_moe(x_ref, ids_TA, w_ref, experts_ref, E)
    grad_out = torch.randn(T, H).to(dtype).float()
    ref_gx, ref_gw = torch.autograd.grad(ref, (x_ref, w_ref), grad_out)

    x = x_ref.detach().to(device, dtype).requires_grad_()
    w = w_ref.detach().to(device).requires_grad_()
    experts_dev = [lambda v, f=f: f(v.float().cpu()).to(device, dtype) for f in experts]
    got = grouped_moe(x, ids_TA.to(device), w, experts_dev, E)
    assert got.dtype == dtype
    gx, gw = torch.autograd.grad(got, (x, w), grad_out.to(device, dtype))
    torch.testing.assert_close(got.float().cpu(), ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    # grad_x is rounded to bf16 on its way through the experts (grad_y and grad_x_MH are bf16).
    torch.testing.assert_close(gx.float().cpu(), ref_gx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.cpu(), ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_no_host_sync(device, dtype):
    T, A, E, H = 256, 2, 8, 32
    ids_TA = random_routing(T, A, E, seed=9).to(device)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(T, A, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_MH, _, meta = permute(x, ids_TA, E)
        out = unpermute(x_MH * 2, meta, w)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and w.grad is not None
