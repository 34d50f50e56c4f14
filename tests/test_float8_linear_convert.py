"""The dense-layer converter (moe/fp8/linear_convert.py) and Float8Linear in a model: which
Linears it swaps (unaligned ones skipped and named, the head and routers left alone, parameters
shared, the reverse swap), a tiny model training with FP8 dense layers, the delayed-scaling amax
sync as one collective across two gloo ranks, and torch.compile of a converted block against eager
(CPU emulation, the GPU path's ops on CPU, and on GPU). Float8Linear's numerics and delayed scaling
by hand: test_float8_linear_layer.py.

Shape letters (README.md): O operands with delayed scales (x, dy), L amax-history length.
"""

from __future__ import annotations

import copy
import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from float8_helpers import _rel
from kernels.common import triton_interpret
from moe.config import ModelConfig, MoEConfig
import moe.fp8.float8_linear as f8l
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.linear_convert import (
    convert_from_float8_training,
    convert_to_float8_training,
    sync_float8_amax_and_scale_history,
)
from moe.fp8.recipe import Float8LinearRecipe
from moe.model import build_model


# ---- the converter: which Linears become Float8Linears; a tiny model trains -------------------


def _tiny_cfg() -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=32, num_shared_experts=1)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                       first_k_dense=1, dense_ffn_dim=32, moe=moe)  # fmt: skip


def test_converter_skips_unaligned_linears_and_names_them(caplog):
    def model():
        return nn.ModuleDict({
            "proj": nn.Linear(64, 48), "odd_in": nn.Linear(40, 48), "odd_out": nn.Linear(64, 50),
            "output": nn.Linear(64, 10),  # the head: skipped by name, not reported as unaligned
        })  # fmt: skip

    m = model()
    with caplog.at_level(logging.WARNING, logger="fp8moe"):
        convert_to_float8_training(m, "tensorwise")
    assert {n for n, mod in m.named_modules() if isinstance(mod, Float8Linear)} == {"proj"}
    assert type(m["odd_in"]) is nn.Linear and type(m["odd_out"]) is nn.Linear and type(m["output"]) is nn.Linear
    warnings = [r.getMessage() for r in caplog.records if r.name == "fp8moe" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "odd_in (40 -> 48)" in warnings[0] and "odd_out (64 -> 50)" in warnings[0]
    assert "proj" not in warnings[0] and "output" not in warnings[0]
    # A filter that picks an unaligned layer is refused by name, before anything is swapped.
    m2 = model()
    with pytest.raises(ValueError, match=r"'odd_in'.*in_features=40 is not"):
        convert_to_float8_training(m2, "rowwise", lambda mod, fqn: fqn != "odd_out")
    assert not any(isinstance(mod, Float8Linear) for mod in m2.modules())
    # A bare Linear: the same rules.
    assert type(convert_to_float8_training(nn.Linear(40, 48), "tensorwise")) is nn.Linear
    assert type(convert_to_float8_training(nn.Linear(64, 48), "tensorwise")) is Float8Linear


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


# ---- torch.compile: compiled gradients match eager (CPU emulation: the same autograd.Function) --


def _block_grads(block, run, x, cos, sin, dy):
    """run(x, cos, sin) (the block or its compiled form): output, x.grad, every parameter's grad
    (None where absent), every amax history (copies)."""
    for p in block.parameters():
        p.grad = None
    x.grad = None
    for m in block.modules():
        if isinstance(m, Float8Linear) and m.recipe.delayed:
            m.amax_history_OL.zero_()
    y = run(x, cos, sin)[0]
    y.backward(dy)
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in block.named_parameters()}
    hist = {n: m.amax_history_OL.clone() for n, m in block.named_modules()
            if isinstance(m, Float8Linear) and m.recipe.delayed}  # fmt: skip
    return y.detach(), x.grad.clone(), grads, hist


def _check_compiled_block_matches_eager(scaling, device, backend, dim, tol, same_arithmetic=True):
    """The compiled converted block against the eager one.

    same_arithmetic: compiled and eager quantize the same values (aot_eager; inductor on CPU at
    dim 32), so their outputs and gradients agree within tol. Otherwise (inductor on GPU) the
    fused fp32 arithmetic around the linears moves a tensor's amax by an ulp, and a tensorwise
    scale (amax / 448 over the whole tensor) then shifts every element's rounding grid: the two
    differ by the FP8 rounding noise itself (2.9% relative L2 for dx at dim 256 on H200), which
    is no error. What must hold then is that compiled is as close to the unquantized block
    (the same weights before conversion) as eager is: its error at most 1.25x eager's + tol.
    Two independent roundings of ~10^4-10^5 values have errors within a few percent of each
    other; a lost scale, branch or gradient makes compiled's error several times eager's.
    """
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    cfg = ModelConfig(**{**cfg.__dict__, "dim": dim, "n_heads": 4, "n_kv_heads": 2})
    model = build_model(cfg, device)
    reference = copy.deepcopy(model.layers[0])  # unquantized, same weights
    convert_to_float8_training(model, scaling)
    block = model.layers[0]  # the dense block: attention and FFN projections are Float8Linears
    assert sum(isinstance(m, Float8Linear) for m in block.modules()) >= 6
    x = torch.randn(2, 16, dim, device=device, requires_grad=True)
    dy = torch.randn(2, 16, dim, device=device)
    cos, sin = model.rope_cos, model.rope_sin
    y_e, gx_e, gp_e, hist_e = _block_grads(block, block, x, cos, sin, dy)
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    y_c, gx_c, gp_c, hist_c = _block_grads(block, compiled, x, cos, sin, dy)
    y_r, gx_r, gp_r, _ = _block_grads(reference, reference, x, cos, sin, dy)
    # The residual passes x forward and dy backward: compare the parts the linears make (x.grad
    # alone hides a lost branch), and every parameter's gradient (a dropped FP8 gradient left
    # them all None or zero).
    pairs = {"y - x": (y_c - x.detach(), y_e - x.detach(), y_r - x.detach()),
             "x.grad - dy": (gx_c - dy, gx_e - dy, gx_r - dy)}  # fmt: skip
    for name, g in gp_e.items():
        assert g is not None and gp_c[name] is not None, name
        pairs[name] = (gp_c[name], g, gp_r[name])
    for name, (c, e, r) in pairs.items():
        if same_arithmetic:
            assert _rel(c, e) <= tol, name
        else:
            assert _rel(c, r) <= 1.25 * _rel(e, r) + tol, (name, _rel(c, r), _rel(e, r))
    # delayed: both amaxes (x forward, dy backward) recorded; fused arithmetic moves an amax by a
    # bf16 ulp or two (2^-8 = 0.4% each).
    amax_rtol = tol if same_arithmetic else 0.01
    for name, h in hist_e.items():
        assert h[:, 0].gt(0).all() and torch.allclose(hist_c[name], h, rtol=amax_rtol), name


def _cpu_scaled_mm_supports(rowwise: bool) -> bool:
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    sa, sb = (torch.ones(16, 1), torch.ones(1, 16)) if rowwise else (torch.tensor(1.0), torch.tensor(1.0))
    try:
        torch._scaled_mm(a, a.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("path", ["emulation", "gpu_ops"])
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "tensorwise_delayed"])
def test_compiled_converted_block_matches_eager_aot_eager(scaling, path, monkeypatch):
    """aot_eager: Dynamo + AOTAutograd, where the autograd.Function is captured, without codegen.
    The quantizers are the kernels' entry points on every path: under TRITON_INTERPRET the
    Triton kernels (under compile the fp8moe:: custom ops), else their torch references.

    gpu_ops: the GEMM the CUDA path runs, on CPU: torch._scaled_mm writing out_dtype directly,
    whose no-op `.to(out_dtype)` was the compiled gradient loss on GPUs (the emulation's fp32
    matmul hit it too, without autocast)."""
    if path == "gpu_ops":
        if not triton_interpret():
            pytest.skip("the Triton quantizers need TRITON_INTERPRET=1 on CPU")
        if not _cpu_scaled_mm_supports(rowwise=scaling == "rowwise"):
            pytest.skip(f"this torch's CPU torch._scaled_mm lacks {scaling} scales")
        monkeypatch.setattr(f8l, "_emulated_scaled_mm", f8l._hardware_scaled_mm)
    _check_compiled_block_matches_eager(scaling, "cpu", "aot_eager", dim=32, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise"])
def test_compiled_converted_block_matches_eager_inductor_cpu(scaling):
    # Inductor's C++ code may round a few fp32 values differently, moving FP8 casts a step.
    _check_compiled_block_matches_eager(scaling, "cpu", "inductor", dim=32, tol=0.01)


# ---- GPU: torch.compile -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["tensorwise", "rowwise", "tensorwise_delayed"])
def test_compiled_converted_block_matches_eager(scaling):
    # bf16 autocast: _scaled_mm writes bf16 directly, the case whose no-op .to() lost the gradients.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _check_compiled_block_matches_eager(scaling, "cuda", "inductor", dim=256, tol=1e-3, same_arithmetic=False)
