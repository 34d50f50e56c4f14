"""SwiGLU with a recomputed activation: the kernels (kernels/swiglu.py) against their reference
(kernels/reference_swiglu.py), the autograd node (moe/swiglu_down.py) against the plain torch
composition it replaces, and what it leaves for backward.

Kernel and reference compute the same fp32 formulas, the kernel with hardware exp2 / reciprocal
and FMAs (numpy's exp2 and IEEE division under Triton's interpreter), so their fp32 values lie
within `_act_error_bound` (tests/act_helpers.py, kernels/act_math.py's numerics contract) of each
other; both round once to the output dtype, so a kernel value lies between the roundings of the
reference's fp32 value minus and plus that bound (rounding is monotone), which for bf16 is the
reference's value or, near a rounding boundary, its neighbour.
"""

from __future__ import annotations

import pytest
import torch

import kernels.reference_act as ref_act
import kernels.swiglu
from act_helpers import _act_error_bound
from kernels.reference_swiglu import check_swiglu_args, torch_swiglu_bwd, torch_swiglu_fwd
from kernels.swiglu import triton_swiglu_bwd, triton_swiglu_fwd
from moe.dispatch import ExpertInput
from moe.experts import DenseMLP, GroupedMLP, activation_fn
from moe.swiglu_down import swiglu_down
from trainer.memory_activations import _experts_bytes, _mlp_bytes, weight_copy_bytes

# Under the interpreter exp2 overflows to inf for gates below -88, by design (sigmoid -> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")

# Zero-token experts, a single token, counts that are not multiples of 16.
COUNTS = [0, 5, 17, 0, 1, 15, 33, 2]


def _h(M, F, dtype, device, seed=0, row_pad=0):
    """h (M, 2F) with gates out to +-20 (past every clamp), zeros and a row of large values; with
    row_pad a strided view (rows row_pad columns apart beyond 2F)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, 2 * F + row_pad, generator=g) * 3
    if M > 2:
        h[0, : F // 2] = torch.linspace(-20, 20, F // 2)
        h[1] = 0
        h[2, ::3] = 60.0
    return h.to(dtype).to(device)[:, : 2 * F]


def _between_roundings(out, v32, d):
    """out (the kernel's, in its dtype) lies between out.dtype(v32 - d) and out.dtype(v32 + d)."""
    lo, hi = (v32 - d).to(out.dtype).double(), (v32 + d).to(out.dtype).double()
    o = out.double()
    return bool(torch.all((lo <= o) & (o <= hi)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,F,row_pad", [(0, 48, 0), (1, 200, 0), (37, 48, 0), (37, 200, 24)])
def test_kernels_match_reference(M, F, row_pad, dtype, device):
    h = _h(M, F, dtype, device, row_pad=row_pad)
    g = torch.Generator().manual_seed(1)
    da = (torch.randn(M, F, generator=g) * 2).to(dtype).to(device)
    a, dh = triton_swiglu_fwd(h), triton_swiglu_bwd(h, da)
    a_ref, dh_ref = torch_swiglu_fwd(h), torch_swiglu_bwd(h, da)
    assert a.shape == a_ref.shape == (M, F) and dh.shape == dh_ref.shape == (M, 2 * F)
    assert a.dtype == a_ref.dtype == dh.dtype == dh_ref.dtype == dtype
    dh32, a32 = ref_act.torch_act_bwd(da.float(), h.float(), "swiglu")  # the reference before its rounding
    assert torch.equal(a32.to(dtype), a_ref) and torch.equal(dh32.to(dtype), dh_ref)
    d_a, d_dh = _act_error_bound("swiglu", h.double(), da.double())
    assert _between_roundings(a, a32, d_a)
    assert _between_roundings(dh, dh32, d_dh)



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,F,row_pad", [(37, 200, 24), (2048, 14336, 0)])
def test_gpu_kernels_match_reference(M, F, row_pad, dtype):
    """The compiled kernels (hardware exp2 and reciprocal), Mixtral's F among the shapes."""
    test_kernels_match_reference(M, F, row_pad, dtype, torch.device("cuda"))

def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"h_MX must be 2-D \(M, 2F\)"):
        torch_swiglu_fwd(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"da_MF must have shape \(3, 4\)"):
        check_swiglu_args(torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="h_MX must be one of"):
        triton_swiglu_fwd(torch.zeros(3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="w2 must be"):
        swiglu_down(torch.zeros(3, 8), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="share the compute dtype"):
        swiglu_down(torch.zeros(3, 8), torch.zeros(5, 4, dtype=torch.bfloat16))


# ---- the autograd node against the plain composition ---------------------------------------------


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# fp32: only summation orders and the activation's last ulps differ. bf16: each side rounds every
# value of the chain (a, y, da, dh, dx) to bf16, 2^-9 relative each, the plain ops a few more
# times (silu(gate) before the product, each backward product): within 4 such steps.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def _plain_grouped(x, w1, w2, ends):
    h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
    h.retain_grad()
    return h, torch._grouped_mm(activation_fn(h, "swiglu"), w2.transpose(-2, -1), offs=ends)


def _fused_grouped(x, w1, w2, ends):
    h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=ends)
    h.retain_grad()
    return h, swiglu_down(h, w2, ends)


@pytest.mark.parametrize("path", ["reference", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_node_equals_plain_ops(dtype, path, device, monkeypatch):
    if path == "kernel":  # the Triton kernels, under the interpreter on a CPU
        monkeypatch.setattr(kernels.swiglu, "_kernel_ok", lambda *tensors: True)
    H, F, E = 64, 48, len(COUNTS)
    g = torch.Generator().manual_seed(0)
    ends = torch.tensor(COUNTS).cumsum(0).to(torch.int32).to(device)
    M = sum(COUNTS)
    leaves = [t.to(dtype).to(device) for t in (torch.randn(M, H, generator=g), torch.randn(E, 2 * F, H, generator=g)
                                               * H**-0.5, torch.randn(E, H, F, generator=g) * F**-0.5)]  # fmt: skip
    dy = torch.randn(M, H, generator=g).to(dtype).to(device)
    results = []
    for fn in (_plain_grouped, _fused_grouped):
        x, w1, w2 = (t.clone().requires_grad_() for t in leaves)
        h, y = fn(x, w1, w2, ends)
        y.backward(dy)
        results.append((y, h.grad, x.grad, w1.grad, w2.grad))
    for name, want, got in zip(("y", "dh", "dx", "dw1", "dw2"), *results):
        assert _rel(got, want) < TOL[dtype], (name, _rel(got, want))
    for e in (e for e, n in enumerate(COUNTS) if n == 0):  # no tokens: exactly zero weight gradients
        assert not results[1][3][e].any() and not results[1][4][e].any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_grouped_node_equals_plain_ops(dtype, monkeypatch):
    """On CUDA: torch's grouped GEMMs and the compiled kernels."""
    test_grouped_node_equals_plain_ops(dtype, "kernel", torch.device("cuda"), monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mlp_equals_plain_ops(dtype):
    """DenseMLP (x (B, S, H) under bf16 autocast, or fp32) against nn.Linear around activation_fn,
    its former forward; and no rows at all."""
    torch.manual_seed(0)
    mlp = DenseMLP(64, 200)
    mlp.reset_parameters(0.05)
    assert mlp.recomputes_activation
    for shape in ((2, 37, 64), (2, 0, 64)):
        x = torch.randn(*shape)
        grads = []
        for fn in (lambda x: mlp.w2(activation_fn(mlp.w1(x), "swiglu")), mlp):
            xl = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = fn(xl)
            assert y.shape == shape and y.dtype == dtype
            y.backward(torch.ones_like(y))
            grads.append((y, xl.grad, mlp.w1.weight.grad, mlp.w2.weight.grad))
            mlp.zero_grad(set_to_none=True)
        if shape[1]:
            for name, want, got in zip(("y", "dx", "dw1", "dw2"), *grads):
                assert _rel(got, want) < TOL[dtype], (name, _rel(got, want))
        else:
            assert not grads[1][2].any() and not grads[1][3].any()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 10, dtype=torch.float64, generator=g, requires_grad=True)
    w2 = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_down, (h, w2))


def test_compiles_through_the_custom_ops(monkeypatch):
    """torch.compile (fullgraph) traces the kernels' custom ops (their fake implementations) in
    the node's forward and backward, and computes what eager does."""
    monkeypatch.setattr(kernels.swiglu, "_kernel_ok", lambda *tensors: True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    ends = torch.tensor([3, 3, 11], dtype=torch.int32, device=device)
    inputs = [(torch.randn(*s, generator=g)).bfloat16().to(device).requires_grad_()
              for s in ((11, 96), (3, 16, 48), (16, 48))]  # fmt: skip

    def fn(h, w2g, w2d):
        return swiglu_down(h, w2g, ends).float().square().sum() + swiglu_down(h, w2d).float().sum()

    def grads(f):
        return torch.autograd.grad(f(*inputs), inputs)

    torch._dynamo.reset()
    eager, compiled = grads(fn), grads(torch.compile(fn, backend="aot_eager", fullgraph=True))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# ---- what autograd keeps for backward --------------------------------------------------------------


def _saved_bytes(run, own) -> int:
    """Bytes of every storage autograd saves during run() (the parameters themselves left out),
    each storage once; the graph stays alive until counted."""
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
    del out
    return sum(saved.values())


def test_bf16_experts_and_dense_mlp_save_h_not_a():
    """Under bf16 autocast the BF16 experts save their bf16 rows, h, the weights' casts and the
    group ends: 2cRF bytes less than the plain ops, which also kept silu(gate) and a; so does a
    SwiGLU DenseMLP over its tokens. Exactly trainer/memory_activations.py's counts."""
    torch.manual_seed(0)
    H, F, c = 64, 48, 2
    experts = GroupedMLP(H, F, len(COUNTS))
    experts.reset_parameters(0.05)
    counts = torch.tensor(COUNTS)
    R, X = sum(COUNTS), 2 * F
    x = torch.randn(R, H, requires_grad=True)
    own = {p.untyped_storage().data_ptr() for p in [*experts.parameters(), x]}
    weights = c * (experts.w1.numel() + experts.w2.numel())
    after = _saved_bytes(lambda: experts(ExpertInput(x, counts)), own)
    assert after == c * R * H + c * R * X + weights + 4 * len(COUNTS)
    assert after == _experts_bytes(experts, R, c, 1, "bf16") + weight_copy_bytes(experts, c)

    def plain():
        rows, ends = x.bfloat16(), counts.cumsum(0, dtype=torch.int32)
        h = torch._grouped_mm(rows, experts.w1.bfloat16().transpose(-2, -1), offs=ends)
        return torch._grouped_mm(activation_fn(h, "swiglu"), experts.w2.bfloat16().transpose(-2, -1), offs=ends)

    assert _saved_bytes(plain, own) - after == 2 * c * R * F

    mlp = DenseMLP(H, F)
    T = 37
    xt = torch.randn(T, H, requires_grad=True)
    own = {p.untyped_storage().data_ptr() for p in [*mlp.parameters(), xt]}
    after = _saved_bytes(lambda: mlp(xt), own)
    assert after == c * T * H + c * T * X + c * (mlp.w1.weight.numel() + mlp.w2.weight.numel())
    assert after == _mlp_bytes(mlp, T, c) + weight_copy_bytes(mlp, c)
    before = _saved_bytes(lambda: mlp.w2(activation_fn(mlp.w1(xt), "swiglu")), own)
    assert before - after == 2 * c * T * F
