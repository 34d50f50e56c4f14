"""GroupedMLP (torch._grouped_mm) against the per-expert loop reference, forward and backward."""

import pytest
import torch

from moe.dispatch import ExpertInput
from moe.experts import GroupedMLP, activation_fn, loop_grouped_mlp

# Counts with zero-token experts, a single token, and sizes that are not multiples of 16.
ODD_COUNTS = [[0, 5, 17, 0, 1, 15, 33, 2], [0, 0, 0, 0, 0, 0, 0, 40], [3, 0, 0, 0, 0, 0, 0, 0]]


def _experts(activation, H=64, F=48, E=8, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    mod = GroupedMLP(H, F, E, activation).to(device)
    mod.reset_parameters(0.1)
    return mod.to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", ODD_COUNTS)
def test_grouped_matches_loop_forward_backward(activation, counts):
    mod = _experts(activation)
    counts_E = torch.tensor(counts)
    M = int(counts_E.sum())
    x = torch.randn(M, 64, requires_grad=True)
    y = mod(ExpertInput(x, counts_E))
    x_ref = x.detach().clone().requires_grad_()
    w1 = mod.w1.detach().clone().requires_grad_()
    w2 = mod.w2.detach().clone().requires_grad_()
    y_ref = loop_grouped_mlp(x_ref, w1, w2, counts_E, activation)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    # fp32 on both sides: only summation order differs.
    assert _rel(y, y_ref) < 1e-5
    assert _rel(x.grad, x_ref.grad) < 1e-5
    assert _rel(mod.w1.grad, w1.grad) < 1e-5
    assert _rel(mod.w2.grad, w2.grad) < 1e-5
    for e, n in enumerate(counts):
        if n == 0:  # an expert without tokens gets exactly zero gradient
            assert torch.count_nonzero(mod.w1.grad[e]) == 0
            assert torch.count_nonzero(mod.w2.grad[e]) == 0


def test_loop_reference_against_dense_per_expert_math():
    """The reference itself against the definition written out by hand for one expert."""
    mod = _experts("swiglu", H=16, F=8, E=2, dtype=torch.float64)
    x = torch.randn(3, 16, dtype=torch.float64)
    y = loop_grouped_mlp(x, mod.w1, mod.w2, torch.tensor([0, 3]), "swiglu")
    gate, up = (x @ mod.w1[1].t()).split(8, dim=1)
    expected = (gate * torch.sigmoid(gate) * up) @ mod.w2[1].t()
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_bfloat16_under_autocast_uses_bf16_compute():
    mod = _experts("swiglu")
    counts_E = torch.tensor([4, 0, 3, 9, 0, 0, 1, 15])
    x = torch.randn(int(counts_E.sum()), 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mod(ExpertInput(x, counts_E))
    assert y.dtype == torch.bfloat16
    y_ref = loop_grouped_mlp(x, mod.w1, mod.w2, counts_E, "swiglu")
    assert _rel(y, y_ref) < 2e-2  # bf16 operands: 8 mantissa bits over two GEMMs


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        GroupedMLP(8, 8, 2, "relu")
    with pytest.raises(ValueError, match="expert_impl"):
        GroupedMLP(8, 8, 2, "gelu", impl="cutlass")
    mod = _experts("gelu", H=16, F=16, E=2)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        mod(ExpertInput(torch.randn(3, 16), torch.tensor([1, 1, 1])))


def test_activation_swiglu_gate_first():
    h = torch.tensor([[1.0, -2.0, 3.0, 4.0]])  # F=2: gate [1, -2], up [3, 4]
    expected = torch.tensor([[1.0 / (1 + torch.exp(torch.tensor(-1.0))) * 3.0, -2.0 / (1 + torch.exp(torch.tensor(2.0))) * 4.0]])
    torch.testing.assert_close(activation_fn(h, "swiglu"), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_matches_loop_bf16_gpu(activation):
    mod = _experts(activation, H=512, F=384, E=8, dtype=torch.bfloat16, device="cuda")
    counts_E = torch.tensor([0, 1, 15, 17, 129, 0, 300, 7], device="cuda")
    x = torch.randn(int(counts_E.sum()), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = mod(ExpertInput(x, counts_E))
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.detach().double().requires_grad_() for t in (x, mod.w1, mod.w2)]
    y_ref = loop_grouped_mlp(*ref, counts_E, activation)
    y_ref.backward(g.double())
    assert _rel(y, y_ref) < 1e-2
    for got, want in zip((x.grad, mod.w1.grad, mod.w2.grad), ref):
        assert _rel(got, want.grad) < 1e-2
