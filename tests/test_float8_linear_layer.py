"""Float8Linear and delayed scaling (moe/fp8/float8_linear.py, moe/fp8/recipe.py,
kernels/quantize_tensor.py, sync_float8_amax_and_scale_history in moe/fp8/linear_convert.py);
the dense-layer converter, the amax sync across ranks and torch.compile:
test_float8_linear_convert.py.

Numerics: against a pure-torch emulation of the same recipe (<= 1% relative L2: the kernels and
the emulation round alike, differing only in summation order), and against fp64 loosely (the FP8
rounding itself, see _FP64_BOUND).
Also torch._scaled_mm's shape rules (refused widths, padded token counts), the delayed-scaling
amax history and scales by hand, the state dict, and the recipe's field checks.

Shape letters (README.md): M rows, K in_features, N out_features, O operands with delayed scales
(x, dy), L amax-history length.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from float8_helpers import _rel
from kernels.quantize_tensor import quantize_tensor
from kernels.reference import torch_quantize_tensor
import moe.fp8.float8_linear as f8l
from moe.fp8.float8_linear import Float8Linear, Fp8Operand, amax_to_scale, scaled_mm
from moe.fp8.linear_convert import convert_from_float8_training, sync_float8_amax_and_scale_history
from moe.fp8.recipe import Float8LinearRecipe

RECIPES = [
    Float8LinearRecipe("tensorwise"),
    Float8LinearRecipe("tensorwise", "e5m2"),
    Float8LinearRecipe("rowwise"),
    Float8LinearRecipe("tensorwise_delayed"),
]
# Relative L2 against fp64 on random normal data. E4M3 keeps 3 mantissa bits (relative rounding
# error up to 2**-4, RMS about 2**-4 / sqrt(3) per operand, two operands per GEMM): measured
# 5.5-6.2% rowwise, 6.4-9.2% tensorwise (one scale for outliers too); E5M2 gradients keep 2 bits:
# 12-13% for dx and dW. The bounds leave ~30% headroom; a bf16 (unquantized) path would land
# near 0.4%, so the lower bound proves the GEMMs really ran in FP8.
_FP64_BOUND = {"e4m3": 0.12, "e5m2": 0.18}


def _fake_quant(t: torch.Tensor, dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Quantize and dequantize t with amax over `dim` (None: the whole tensor), scale = amax / fmax."""
    fmax = torch.finfo(dtype).max
    t = t.float()
    amax = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / fmax)
    return (t / scale).clamp(-fmax, fmax).to(dtype).float() * scale


def _emulate(x_MK, w_NK, dy_MN, recipe):
    """y, dx, dW of the recipe in plain torch: each GEMM's operands quantized along its reduction dim."""
    g = torch.float8_e4m3fn if recipe.grad_dtype == "e4m3" else torch.float8_e5m2
    e4 = torch.float8_e4m3fn
    rw = recipe.scaling == "rowwise"
    row, col = (1, 0) if rw else (None, None)
    y = _fake_quant(x_MK, row, e4) @ _fake_quant(w_NK, row, e4).T
    dx = _fake_quant(dy_MN, row, g) @ _fake_quant(w_NK, col, e4)
    dw = _fake_quant(dy_MN, col, g).T @ _fake_quant(x_MK, col, e4)
    return y, dx, dw


def _run_layer(recipe, device, M=40, K=64, N=48, dtype=torch.float32):
    torch.manual_seed(0)
    lin = Float8Linear(K, N, bias=False, recipe=recipe, device=device)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    return lin, x, y, dy


def _check_numerics(recipe, device, dtype=torch.float32, M=40):
    lin, x, y, dy = _run_layer(recipe, device, M=M, dtype=dtype)
    y_e, dx_e, dw_e = _emulate(x.detach(), lin.weight.detach(), dy, recipe)
    for got, want in ((y, y_e), (x.grad, dx_e), (lin.weight.grad, dw_e)):
        assert _rel(got, want) <= 0.01
    x64, w64, dy64 = x.detach().double(), lin.weight.detach().double(), dy.double()
    bound = _FP64_BOUND[recipe.grad_dtype]
    for got, want in ((y, x64 @ w64.T), (x.grad, dy64 @ w64), (lin.weight.grad, dy64.T @ x64)):
        assert 0.01 < _rel(got, want) <= bound


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_tensor_kernel_matches_reference(fp8_dtype):
    # Random values (ties and binade carries included) plus exact grid points and zeros;
    # 4847 elements: two programs and a ragged tail.
    torch.manual_seed(0)
    scale = torch.tensor(0.37)
    x = torch.randn(37, 131) * 40
    x[0, :64] = torch.randn(64).to(fp8_dtype).float() * scale
    x[1, :8] = 0.0
    q, amax = quantize_tensor(x, scale, fp8_dtype)
    q_ref, amax_ref = torch_quantize_tensor(x, scale, fp8_dtype)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert amax.item() == amax_ref.item() == x.abs().max().item()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_tensor_tiny_scales_give_no_nan(fp8_dtype, device):
    """Quantizing multiplies by 1 / scale, and 1 / a subnormal scale is inf (0 * inf: NaN). A
    tensor of tiny values (amax 1e-38 < 448 * 2**-126) gets the scale rule's floor 2**-126 from
    amax_to_scale, and a subnormal scale handed in directly acts as that floor: zeros stay zeros
    (signs kept), nothing is NaN, kernel and reference agree."""
    x = torch.tensor([0.0, -0.0, 1e-38, -3e-39, 2.0**-126, 1.5e-39] * 700, device=device)
    scale = amax_to_scale(x.abs().amax(), torch.finfo(fp8_dtype).max)
    assert scale.item() == 2.0**-126
    for s in (scale, torch.tensor(1e-40, device=device)):
        q, _ = quantize_tensor(x, s, fp8_dtype)
        q_ref, _ = torch_quantize_tensor(x, s, fp8_dtype)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
        assert not q.float().isnan().any()
        assert torch.equal(q.float()[x == 0].view(torch.int32), x[x == 0].view(torch.int32))
        assert q.float().abs().max() > 0  # 1e-38 / 2**-126 = 0.85: representable, not flushed


# M (tokens) 48: every GEMM operand aligned; 40: wgrad's operands padded to 48 token columns.
TOKEN_COUNTS = [48, 40]


@pytest.mark.parametrize("M", TOKEN_COUNTS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scaling}-{r.grad_dtype}")
def test_float8_linear_matches_emulation_and_fp64(recipe, M):
    _check_numerics(recipe, "cpu", M=M)


# ---- torch._scaled_mm's shape rules: refused widths, padded token counts ----------------------


def test_cpu_scaled_mm_enforces_the_gpu_shape_rules():
    """The emulation refuses what torch._scaled_mm refuses (mat1's inner dim and both of mat2's
    dims multiples of 16, mat2 column-major), so a bad shape fails in CPU tests too."""
    q = lambda *shape: torch.zeros(*shape).to(torch.float8_e4m3fn)  # noqa: E731
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"K=40 and N=64 must be multiples of 16.*a \(48, 40\)"):
        scaled_mm(Fp8Operand(q(48, 40), one), Fp8Operand(q(64, 40).t(), one), torch.float32, False)
    with pytest.raises(ValueError, match="N=40"):
        scaled_mm(Fp8Operand(q(48, 64), one), Fp8Operand(q(40, 64).t(), one), torch.float32, False)
    with pytest.raises(ValueError, match="column-major"):
        scaled_mm(Fp8Operand(q(48, 64), one), Fp8Operand(q(64, 32), one), torch.float32, False)
    # M (mat1's rows) is free: 40 rows are fine.
    assert scaled_mm(Fp8Operand(q(40, 64), one), Fp8Operand(q(32, 64).t(), one), torch.float32, False).shape == (40, 32)


@pytest.mark.parametrize("recipe", RECIPES[:3], ids=lambda r: f"{r.scaling}-{r.grad_dtype}")
def test_token_count_not_a_multiple_of_16_pads_only_wgrad_operands(recipe, monkeypatch):
    """B*S = 2*13 = 26 tokens: forward and dgrad GEMMs take 26 rows as they are, wgrad (which
    contracts over tokens) gets 32 token columns, the extra 6 all FP8 zeros; results as unpadded."""
    calls = []
    real = f8l.scaled_mm

    def recording(a, b, out_dtype, rowwise):
        calls.append((tuple(a.q.shape), tuple(b.q.shape), a.q, b.q))
        return real(a, b, out_dtype, rowwise)

    monkeypatch.setattr(f8l, "scaled_mm", recording)
    torch.manual_seed(0)
    lin = Float8Linear(64, 32, bias=False, recipe=recipe)
    x = torch.randn(2, 13, 64, requires_grad=True)
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert [c[:2] for c in calls] == [((26, 64), (64, 32)), ((26, 32), (32, 64)), ((32, 32), (32, 64))]
    dyt_q, xt_q = calls[2][2], calls[2][3]  # (N, 32) row-major, (32, K) column-major
    assert not dyt_q.view(torch.uint8)[:, 26:].any() and not xt_q.view(torch.uint8)[26:, :].any()
    y_e, dx_e, dw_e = _emulate(x.detach().reshape(26, 64), lin.weight.detach(), dy.reshape(26, 32), recipe)
    assert y.shape == (2, 13, 32) and x.grad.shape == x.shape
    for got, want in ((y.reshape(26, 32), y_e), (x.grad.reshape(26, 64), dx_e), (lin.weight.grad, dw_e)):
        assert _rel(got, want) <= 0.01


def test_float8_linear_refuses_widths_the_fp8_gemms_cannot_take():
    for k, n, bad in ((40, 48, "in_features=40"), (64, 50, "out_features=50"), (8, 24, "in_features=8, out_features=24")):
        with pytest.raises(ValueError, match=rf"multiples of 16.*\({bad} is not\)"):
            Float8Linear(k, n)
    Float8Linear(16, 48)  # aligned: fine


# ---- recipes and delayed scaling: amax history, synced scales, state dict ---------------------


def test_delayed_scaling_bookkeeping_by_hand():
    recipe = Float8LinearRecipe("tensorwise_delayed", "e5m2", history_len=3, margin=1)
    lin = Float8Linear(16, 16, bias=False, recipe=recipe)
    # Steps' amaxes (x, dy); E4M3 max 448 for x, E5M2 max 57344 for dy; margin 1 doubles.
    steps = [(2.0, 0.5), (1.0, 0.25), (0.5, 4.0), (0.25, 0.125)]
    expected_hist = [[0, 2, 0], [0, 1, 2], [0, 0.5, 1], [0, 0.25, 0.5]]  # x's row after each roll
    expected_x_max = [2.0, 2.0, 2.0, 1.0]  # 2.0 ages out after three steps
    expected_dy_max = [0.5, 0.5, 4.0, 4.0]
    for (ax, ady), hist, mx, mdy in zip(steps, expected_hist, expected_x_max, expected_dy_max):
        lin.amax_history_OL[:, 0] = torch.tensor([ax, ady])
        sync_float8_amax_and_scale_history(lin)
        assert lin.amax_history_OL[0].tolist() == hist
        assert lin.scale_O.tolist() == pytest.approx([mx * 2 / 448, mdy * 2 / 57344], rel=1e-7)
    # A non-finite amax (an overflowing step) is dropped, not folded into the history.
    lin.amax_history_OL[:, 0] = torch.tensor([float("inf"), float("nan")])
    sync_float8_amax_and_scale_history(lin)
    assert torch.isfinite(lin.scale_O).all() and lin.amax_history_OL[:, 1].tolist() == [0.0, 0.0]


def test_delayed_forward_records_amax_and_uses_the_synced_scale():
    recipe = Float8LinearRecipe("tensorwise_delayed", history_len=4)
    lin, x, y, dy = _run_layer(recipe, "cpu")
    # First step: current scaling (no history yet), amaxes recorded for x (forward) and dy (backward).
    assert lin.amax_history_OL[:, 0].tolist() == pytest.approx([x.abs().max().item(), dy.abs().max().item()])
    sync_float8_amax_and_scale_history(lin)
    assert lin.scale_O[0].item() == pytest.approx(x.abs().max().item() / 448)
    # Next step: the stored scale is used as is. Halve x: the stale scale now wastes one binade,
    # so the output matches an emulation with the stored scale, not a fresh one.
    x2 = (x.detach() / 2).requires_grad_()
    y2 = lin(x2)
    s = lin.scale_O[0]
    x_fq = (x2.detach() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    w = lin.weight.detach()
    ws = w.abs().max() / 448
    w_fq = (w / ws).to(torch.float8_e4m3fn).float() * ws
    assert _rel(y2, x_fq @ w_fq.T) <= 0.01
    assert lin.amax_history_OL[0, 0].item() == pytest.approx(x2.abs().max().item())


def test_state_dict_round_trip_keeps_delayed_state_and_reverse_swap_keeps_params():
    recipe = Float8LinearRecipe("tensorwise_delayed", history_len=5, margin=2)
    lin, *_ = _run_layer(recipe, "cpu")
    sync_float8_amax_and_scale_history(lin)
    state = lin.state_dict()
    assert {"amax_history_OL", "scale_O"} <= set(state)
    fresh = Float8Linear(64, 48, bias=False, recipe=recipe)
    assert not fresh._delayed_ready
    fresh.load_state_dict(state)
    assert torch.equal(fresh.amax_history_OL, lin.amax_history_OL) and torch.equal(fresh.scale_O, lin.scale_O)
    assert fresh._delayed_ready  # restored scales are used from the first step on
    # Non-delayed recipes add nothing to the state dict: an nn.Linear checkpoint loads as is.
    assert set(Float8Linear(16, 16, recipe=Float8LinearRecipe("rowwise")).state_dict()) == {"weight", "bias"}
    back = convert_from_float8_training(lin)
    assert type(back) is nn.Linear and back.weight is lin.weight


def test_bad_recipe_names_the_field():
    with pytest.raises(ValueError, match="fp8.dense recipe"):
        Float8LinearRecipe("delayed")
    with pytest.raises(ValueError, match="fp8.dense_grad_dtype"):
        Float8LinearRecipe("rowwise", "e5m2")


# ---- GPU: torch._scaled_mm --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M", TOKEN_COUNTS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scaling}-{r.grad_dtype}")
def test_float8_linear_on_cuda_scaled_mm(recipe, M):
    # K=64, N=48 (multiples of 16, as torch._scaled_mm needs); M=40 exercises the wgrad padding.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check_numerics(recipe, "cuda", dtype=torch.bfloat16, M=M)
