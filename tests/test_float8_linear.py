"""Float8Linear, the dense-layer converter and delayed scaling (moe/fp8/float8_linear.py,
moe/fp8/linear_convert.py, kernels/quantize_tensor.py).

Numerics: against a pure-torch emulation of the same recipe (<= 1% relative L2: the kernels and
the emulation round alike, differing only in summation order and, under Triton's interpreter, a
rare mis-rounded fp8 cast), and against fp64 loosely (the FP8 rounding itself, see _FP64_BOUND).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kernels.quantize_tensor import quantize_tensor
from kernels.reference import torch_quantize_tensor
from moe.config import ModelConfig, MoEConfig
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.linear_convert import (
    convert_from_float8_training,
    convert_to_float8_training,
    sync_float8_amax_and_scale_history,
)
from moe.fp8.recipe import Float8LinearRecipe
from moe.model import build_model

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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


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


def _check_numerics(recipe, device, dtype=torch.float32):
    lin, x, y, dy = _run_layer(recipe, device, dtype=dtype)
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


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scaling}-{r.grad_dtype}")
def test_float8_linear_matches_emulation_and_fp64(recipe):
    _check_numerics(recipe, "cpu")


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


def _tiny_cfg() -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, num_shared_experts=1)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       first_k_dense=1, dense_ffn_dim=32, moe=moe)  # fmt: skip


def test_converter_swaps_dense_linears_only_sharing_parameters():
    model = build_model(_tiny_cfg())
    params_before = {n: p for n, p in model.named_parameters()}
    convert_to_float8_training(model, "tensorwise")
    swapped = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert "output" not in swapped and not any("router" in n for n in swapped)
    assert {"layers.0.attn.wq", "layers.0.attn.wk", "layers.0.ffn.w1", "layers.1.attn.wo"} <= swapped
    assert all(p is params_before[n] for n, p in model.named_parameters())
    # A filter decides per module; the reverse swap restores plain Linears.
    model2 = convert_to_float8_training(build_model(_tiny_cfg()), "rowwise", lambda m, fqn: fqn.endswith("wq"))
    assert {n for n, m in model2.named_modules() if isinstance(m, Float8Linear)} == {"layers.0.attn.wq", "layers.1.attn.wq"}
    convert_from_float8_training(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_bad_recipe_names_the_field():
    with pytest.raises(ValueError, match="fp8.dense recipe"):
        Float8LinearRecipe("delayed")
    with pytest.raises(ValueError, match="fp8.dense_grad_dtype"):
        Float8LinearRecipe("rowwise", "e5m2")


@pytest.mark.slow
def test_tiny_model_trains_with_emulated_fp8_dense_layers():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    convert_to_float8_training(model, Float8LinearRecipe("tensorwise_delayed", history_len=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (4, 16))
    labels = tokens.roll(-1, dims=1)
    losses = []
    for _ in range(8):
        out = model(tokens, labels)
        (out.loss + out.aux_loss).backward()
        sync_float8_amax_and_scale_history(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses


# ---- one collective for all layers' amaxes, across two gloo ranks -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe = Float8LinearRecipe("tensorwise_delayed", history_len=2)
        model = nn.Sequential(*(Float8Linear(16, 16, recipe=recipe) for _ in range(3)))
        for i, m in enumerate(model):  # rank-dependent amaxes: the max alternates between ranks
            m.amax_history_OL[:, 0] = torch.tensor([1.0 + i + rank * (-1) ** i, 0.5 * (rank + 1) + i])
        calls = []
        real = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            sync_float8_amax_and_scale_history(model)
        finally:
            dist.all_reduce = real
        torch.save({"calls": calls, "hist": [m.amax_history_OL.clone() for m in model],
                    "scale": [m.scale_O.clone() for m in model]}, os.path.join(result_dir, f"{rank}.pt"))  # fmt: skip
        dist.barrier()  # leave together: gloo aborts a process whose peer tears down first
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_amax_sync_is_one_collective_and_takes_the_max_across_ranks(tmp_path):
    mp.spawn(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["calls"] == r1["calls"] == [6]  # one all_reduce of 3 layers x 2 operands
    for i in range(3):
        amax_x = max(1.0 + i + r * (-1) ** i for r in (0, 1))
        amax_dy = max(0.5 * (r + 1) + i for r in (0, 1))
        for res in (r0, r1):
            assert res["hist"][i][:, 1].tolist() == [amax_x, amax_dy]  # rolled: last step's slot
            assert res["scale"][i].tolist() == pytest.approx([amax_x / 448, amax_dy / 448])


# ---- GPU: torch._scaled_mm and torch.compile ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.scaling}-{r.grad_dtype}")
def test_float8_linear_on_cuda_scaled_mm(recipe):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check_numerics(recipe, "cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "tensorwise_delayed"])
def test_compiled_converted_block_matches_eager(scaling):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    cfg = ModelConfig(**{**cfg.__dict__, "dim": 256, "n_heads": 4, "n_kv_heads": 2})
    model = build_model(cfg, "cuda")
    convert_to_float8_training(model, scaling)
    block = model.layers[0]
    x = torch.randn(2, 16, 256, device="cuda", requires_grad=True)
    cos, sin = model.rope_cos, model.rope_sin
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_eager = block(x, cos, sin)[0]
        y_eager.float().sum().backward()
        g_eager = x.grad.clone()
        x.grad = None
        compiled = torch.compile(block, fullgraph=True)
        y_comp = compiled(x, cos, sin)[0]
        y_comp.float().sum().backward()
    assert _rel(y_comp, y_eager) <= 0.01 and _rel(x.grad, g_eager) <= 0.02
