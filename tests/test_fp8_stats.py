"""FP8 operand statistics (logging.fp8_stats_interval): the kernels count what their references
count (kernels/fp8_stats.py), the FP8 experts count every operand they cast, a planted scale
saturates and warns, and a short training run logs per-layer FP8 and MoE keys.

On a CPU the kernels run in Triton's interpreter (tests/conftest.py), where they quantize bit for
bit as their references, so the counts (integers) and the amax bits must be equal, not close. The
activation kernel is fed values in its contract's range (|h| < 13): past it the kernel's exp2
flushes silu and GELU's tail to exactly 0 where the reference keeps ~1e-38; both cast to 0, but
only the reference's is a nonzero value that underflows. On a GPU (`-m gpu`) the quantizers are
bitwise their references too (equal counts); the activation kernel's fp32 a is within
tests/act_helpers.py's bound of the reference's, so a's underflows differ by at most the bytes
that differ and its amax by at most that bound, while h (exact bf16 values, power-of-two scales,
whose inverses the kernel takes exactly) counts equal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from act_helpers import _act_error_bound
from fp8_inputs import group_ends
from kernels.act_quant import triton_act_quant_fwd
from kernels.common import FP8_DTYPE, torch_fp8_inverse
from kernels.fp8_stats import (
    SATURATION_BOUND,
    amax_of,
    new_stats,
    tl_fp8_stats_flush,
    tl_fp8_stats_tile,
    tl_fp8_stats_zero,
    torch_fp8_stats_add,
)
from kernels.quantize import triton_quantize_rows
from kernels.quantize_grouped import triton_quantize_rows_and_cols_grouped
from kernels.quantize_weight import triton_quantize_weight
from kernels.reference import torch_quantize_rows, torch_quantize_rows_and_cols_grouped, torch_quantize_weight
from kernels.reference_act import torch_act_quant_fwd
from moe.dispatch import ExpertInput
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import Fp8Recipe
from moe.fp8.stats import OPERANDS, Fp8Stats, Fp8StatsCollector
from trainer.config import TrainConfig
from trainer.layer_metrics import layer_metrics

ROOT = Path(__file__).resolve().parents[1]


def _wide(M: int, K: int, seed: int) -> torch.Tensor:
    """bf16 values over ~40 binades (some underflow in any row), a zero block and a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.exp(torch.randn(M, K, generator=g) * 3.0)
    x[0, : K // 3] = 0.0
    x[M // 2] = 0.0
    return x.bfloat16()


def _act_input(M: int, X: int, seed: int) -> torch.Tensor:
    """bf16 randn * 3 with a few columns 1e-7 times smaller (a and h underflow there), some zeros."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, X, generator=g) * 3.0
    h[:, 3:9] *= 1e-7
    h[1, :7] = 0.0
    return h.bfloat16()


_GE = group_ends([5, 0, 20, 7])  # 37 rows: an empty group, 5 tail rows past every group
_IDX = torch.randperm(37, generator=torch.Generator().manual_seed(3))
# name: (kernel, reference, operands, input); each call takes (x, stats) and returns the outputs.
CASES = {
    "rows_rowwise": (lambda x, s: triton_quantize_rows(x, 0, False, None, s),
                     lambda x, s: torch_quantize_rows(x, 0, False, None, s), 1, lambda: _wide(37, 200, 0)),
    "rows_rowwise_long": (lambda x, s: triton_quantize_rows(x, 0, True, None, s),
                          lambda x, s: torch_quantize_rows(x, 0, True, None, s), 1, lambda: _wide(3, 8200, 1)),
    "rows_1x128_gather": (lambda x, s: triton_quantize_rows(x, 128, False, _IDX.to(x.device), s),
                          lambda x, s: torch_quantize_rows(x, 128, False, _IDX, s), 1, lambda: _wide(37, 256, 2)),
    "grouped_rowwise": (lambda x, s: triton_quantize_rows_and_cols_grouped(x, _GE.to(x.device), 128, 0, False,
                                                                           _IDX.to(x.device), s),
                        lambda x, s: torch_quantize_rows_and_cols_grouped(x, _GE, 128, 0, False, _IDX, s),
                        1, lambda: _wide(37, 96, 3)),
    "grouped_blockwise": (lambda x, s: triton_quantize_rows_and_cols_grouped(x, _GE.to(x.device), 128, 128, True,
                                                                             None, s),
                          lambda x, s: torch_quantize_rows_and_cols_grouped(x, _GE, 128, 128, True, None, s),
                          1, lambda: _wide(37, 256, 4)),
    "weight_rowwise_fp32": (lambda w, s: triton_quantize_weight(w, "rowwise", False, True, s),
                            lambda w, s: torch_quantize_weight(w, "rowwise", False, True, s), 1,
                            lambda: _wide(80, 72, 5).float().mul(1.0 + 2**-12).view(2, 40, 72)),
    "weight_rowwise_bf16": (lambda w, s: triton_quantize_weight(w, "rowwise", True, False, s),
                            lambda w, s: torch_quantize_weight(w, "rowwise", True, False, s), 1,
                            lambda: _wide(144, 72, 14).view(2, 72, 72)),  # counting: 32-row slices, else 64
    "weight_blockwise": (lambda w, s: triton_quantize_weight(w, "blockwise", False, False, s),
                         lambda w, s: torch_quantize_weight(w, "blockwise", False, False, s), 1,
                         lambda: _wide(256, 128, 6).view(2, 128, 128)),
    "act_swiglu_rowwise": (lambda h, s: triton_act_quant_fwd(h, "swiglu", 0, False, True, s),
                           lambda h, s: torch_act_quant_fwd(h, "swiglu", 0, False, True, s), 2,
                           lambda: _act_input(37, 2 * 96, 7)),
    "act_swiglu_long": (lambda h, s: triton_act_quant_fwd(h, "swiglu", 0, True, True, s),
                        lambda h, s: torch_act_quant_fwd(h, "swiglu", 0, True, True, s), 2,
                        lambda: _act_input(2, 2 * 8200, 8)),
    "act_gelu_1x128": (lambda h, s: triton_act_quant_fwd(h, "gelu", 128, False, True, s),
                       lambda h, s: torch_act_quant_fwd(h, "gelu", 128, False, True, s), 2,
                       lambda: _act_input(37, 256, 9)),
}  # fmt: skip


def _bytes(outputs) -> list[torch.Tensor]:
    return [t.view(torch.uint8) if t.dtype == FP8_DTYPE else t for t in outputs]


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_counts_what_its_reference_counts(case):
    kernel, reference, operands, make = CASES[case]
    x = make()
    got, want = new_stats(operands, "cpu"), new_stats(operands, "cpu")
    out = kernel(x, got)
    reference(x, want)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert got[:, 1].gt(0).all() and got[:, 3].gt(0).all()  # every operand has underflows to count
    # Counting changes no byte: the outputs are those of the kernel without statistics.
    for a, b in zip(_bytes(out), _bytes(kernel(x, None))):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("act")])
def test_gpu_quantizer_counts_what_its_reference_counts(case, device):
    kernel, reference, operands, make = CASES[case]
    x = make()
    got, want = new_stats(operands, device), new_stats(operands, "cpu")
    kernel(x.to(device), got)
    reference(x, want)
    assert torch.equal(got.cpu(), want), (got.tolist(), want.tolist())


@pytest.mark.gpu
def test_gpu_counts_at_scale(device):
    """Mixtral-width rows (8192 x 4096): every program's atomics land, none twice."""
    x = _wide(8192, 4096, 13).to(device)
    stats = new_stats(1, device)
    q, _ = triton_quantize_rows(x, 0, False, None, stats)
    assert stats[0, 1] == ((q.float() == 0) & (x != 0)).sum() and stats[0, 3] == x.numel()
    assert amax_of(stats)[0] == x.float().abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("activation, block", [("swiglu", 0), ("gelu", 128)])
def test_gpu_act_counts_within_the_activation_contract(activation, block, device):
    h = _act_input(512, 2 * 1024 if activation == "swiglu" else 1024, 12)
    got, want = new_stats(2, device), new_stats(2, "cpu")
    a_q = triton_act_quant_fwd(h.to(device), activation, block, True, True, got)[0].cpu()
    a_ref = torch_act_quant_fwd(h, activation, block, True, True, want)[0]
    got = got.cpu()
    assert torch.equal(got[1], want[1]), (got.tolist(), want.tolist())
    differing = (a_q.view(torch.uint8) != a_ref.view(torch.uint8)).sum()
    assert (got[0, 1] - want[0, 1]).abs() <= differing and got[0, 2:].tolist() == want[0, 2:].tolist()
    delta = _act_error_bound(activation, h.double())[0].max().item()
    assert abs(amax_of(got)[0].item() - amax_of(want)[0].item()) <= delta


def test_counts_are_the_cast_s_zeros_and_values():
    """The definition, independently of both implementations: an underflow is a nonzero input
    whose byte is zero; the amax is the input's."""
    x = _wide(37, 200, 10)
    stats = new_stats(1, "cpu")
    q, _ = triton_quantize_rows(x, 0, False, None, stats)
    assert stats[0, 1] == ((q.float() == 0) & (x != 0)).sum()
    assert stats[0, 2] == 0  # current scaling never saturates
    assert stats[0, 3] == x.numel()
    assert amax_of(stats)[0] == x.float().abs().max()
    triton_quantize_rows(x, 0, False, None, stats)  # a second call adds
    assert stats[0, 3] == 2 * x.numel()


@triton.jit
def _planted_kernel(x_ptr, inv_ptr, stats_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Counts x * inv (one inv a row), BLOCK_M rows a program in BLOCK_K-wide chunks, the
    partials carried over the chunks and flushed once."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv = tl.load(inv_ptr + rows, mask=rows < M, other=1.0)
    amax, under, sat = tl_fp8_stats_zero()
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)
        amax, under, sat = tl_fp8_stats_tile(amax, under, sat, x, inv[:, None], mask)
    tl_fp8_stats_flush(stats_ptr, amax, under, sat, tl.program_id(0) == 0, M, K)


def _planted(seed=11):
    """Rows scaled from a quarter of their amax (a scale taken elsewhere): the values above
    448 x scale saturate; values within rounding of the bound (448 to 464) do not."""
    x = torch.randn(19, 50, generator=torch.Generator().manual_seed(seed)) * 4.0
    scale = x.abs().amax(dim=1, keepdim=True) / 4.0 / 448.0
    x[0, :3] = scale[0] * torch.tensor([449.0, 463.0, 466.0])
    return x, torch_fp8_inverse(scale)


@pytest.mark.parametrize("block_m, block_k", [(8, 64), (4, 16)])  # one chunk a program; four, the last ragged
def test_planted_scale_saturates_in_kernel_and_reference(block_m, block_k):
    x, inv = _planted()
    got, want = new_stats(1, "cpu"), new_stats(1, "cpu")
    _planted_kernel[(triton.cdiv(19, block_m),)](x, inv.view(-1).contiguous(), got, 19, 50, BLOCK_M=block_m,
                                                 BLOCK_K=block_k)  # fmt: skip
    torch_fp8_stats_add(want, x, inv)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert want[0, 2] == ((x.abs() * inv) > SATURATION_BOUND).sum() > 3


@pytest.mark.parametrize("earlier_amax", [0.5, 1e30])
def test_flush_adds_to_a_buffer_s_earlier_counts(earlier_amax):
    """A buffer already holding counts (an earlier call of the window): the flush adds to them
    and raises the amax word only past its value, whether it skips its atomic max or not."""
    x, inv = _planted()
    earlier = torch.tensor([[torch.tensor(earlier_amax).view(torch.int32).item(), 5, 7, 11]])
    got, want = earlier.clone(), earlier.clone()
    _planted_kernel[(triton.cdiv(19, 4),)](x, inv.view(-1).contiguous(), got, 19, 50, BLOCK_M=4, BLOCK_K=16)
    torch_fp8_stats_add(want, x, inv)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert amax_of(got)[0] == max(earlier_amax, x.abs().max().item()) and got[0, 3] == 11 + x.numel()


def _model_with_experts_in(block: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(block))
    model.layers.append(torch.nn.Sequential(Fp8GroupedMLP(16, 16, 2, "swiglu")))
    return model


def test_planted_saturation_warns_naming_layer_and_operand(caplog):
    """A scale planted at a quarter of w2's amax: the share of values past 448 x scale is
    logged under layer 3's key and warned about once, naming layer and operand."""
    x, inv = _planted()
    model = _model_with_experts_in(3)
    collector = Fp8StatsCollector(interval=1)
    collector.attach(model, step=1)
    stats = model.layers[3][0].stats
    torch_fp8_stats_add(stats.of("w2"), x, inv)
    share = ((x.abs() * inv) > SATURATION_BOUND).float().mean().item()
    lg = TrainConfig().logging
    trainer = SimpleNamespace(env=SimpleNamespace(world_size=1, distributed=False, is_main=True), step=7,
                              model=None, cfg=SimpleNamespace(logging=lg), fp8=SimpleNamespace(stats=collector))
    with caplog.at_level(logging.WARNING, logger="fp8moe"):
        record = layer_metrics(trainer, None, {}, 1, 64)
    assert record["fp8/layer3/w2/saturation"] == pytest.approx(share) and share > lg.fp8_saturation_warn
    assert record["fp8/layer3/w2/amax"] == x.abs().max().item()
    assert "fp8/layer3/x/amax" not in record  # nothing counted: no key
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "layer 3 experts w2:" in warned[0] and "saturate at 448" in warned[0], warned
    # Still above: no second warning; back below, then above again: warned again.
    torch_fp8_stats_add(stats.of("w2"), x, inv)
    assert collector.read(None, lg.fp8_saturation_warn)[1] == []
    torch_fp8_stats_add(stats.of("w2"), x, torch_fp8_inverse(x.abs().amax(dim=1, keepdim=True) / 448.0))
    assert collector.read(None, lg.fp8_saturation_warn)[1] == []
    torch_fp8_stats_add(stats.of("w2"), x, inv)
    assert len(collector.read(None, lg.fp8_saturation_warn)[1]) == 1


@pytest.mark.parametrize("recipe, cache_weights, intermediate",
                         [("rowwise", False, "fp8"), ("blockwise", True, "bf16")])  # fmt: skip
def test_experts_count_every_operand_and_change_nothing(monkeypatch, recipe, cache_weights, intermediate):
    """Forward and backward of the FP8 experts (the references on a CPU) with a buffer: each
    operand's values counted once, outputs and gradients bitwise those without."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    counts_E = torch.tensor([5, 0, 130, 9])
    M, H, F, E = int(counts_E.sum()), 128, 128, 4
    results = []
    for stats in (None, Fp8Stats(0, "cpu")):
        torch.manual_seed(0)
        mod = Fp8GroupedMLP(H, F, E, "swiglu", recipe=Fp8Recipe(recipe, intermediate=intermediate))
        mod.reset_parameters(0.05)
        mod.cache_weights, mod.stats = cache_weights, stats
        x = torch.randn(M, H).bfloat16().requires_grad_()
        y = mod(ExpertInput(x, counts_E))
        y.backward(torch.randn(M, H).bfloat16())
        results.append((y, x.grad, mod.w1.grad, mod.w2.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    n = dict(zip(OPERANDS, stats.counts_O[:, 3].tolist()))
    assert n == {"x": M * H, "w1": E * 2 * F * H, "a": M * F, "h": 0 if intermediate == "bf16" else M * 2 * F,
                 "w2": E * H * F, "dy": M * H}  # fmt: skip
    assert amax_of(stats.counts_O)[OPERANDS.index("w1")] == mod.w1.detach().bfloat16().float().abs().max()


def test_collector_attaches_on_its_steps_only():
    model = _model_with_experts_in(1)
    experts = model.layers[1][0]
    collector = Fp8StatsCollector(interval=3)
    for step, on in ((1, False), (3, True), (4, False), (6, True)):
        collector.attach(model, step)
        assert (experts.stats is not None) == on and (not on or experts.stats.layer == 1)
        collector.detach()
        assert experts.stats is None
    assert Fp8StatsCollector(0).read() == ({}, [])


@pytest.mark.parametrize("field, value, needle", [
    ("fp8_stats_interval", -1, "logging.fp8_stats_interval must be >= 0"),
    ("fp8_saturation_warn", 1.5, "logging.fp8_saturation_warn must be a share in [0, 1]"),
    ("fp8_underflow_warn", -0.1, "logging.fp8_underflow_warn must be a share in [0, 1]"),
])  # fmt: skip
def test_bad_fields_are_refused(field, value, needle):
    cfg = TrainConfig()
    setattr(cfg.logging, field, value)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()


def test_compiled_blocks_refuse_statistics():
    cfg = TrainConfig()
    cfg.logging.fp8_stats_interval, cfg.run.compile = 2, True
    with pytest.raises(ValueError, match="eager mode only; with run.compile=true"):
        cfg.validate()


def test_short_fp8_run_logs_per_layer_fp8_and_moe_keys(tmp_path, monkeypatch):
    """A 2-step run of the tiny model with FP8 experts (the CPU emulation), statistics every
    2nd step, capacity, z-loss and expert bias on: per-layer MoE keys in every record, FP8 keys
    in step 2's only, for each operand of both MoE layers (the first block dense)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs
    from trainer.run import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    register_configs()
    overrides = [
        "model.dim=64", "model.n_layers=3", "model.first_k_dense=1", "model.moe.ffn_dim=64", "run.seq_len=64",
        "run.micro_batch_size=2", "run.eval_interval=0", "run.steps=2", "run.device=cpu", "data=mock",
        "data.mock_vocab_size=256", "optim.warmup_steps=1", "fp8=rowwise", "logging.wandb=disabled",
        "logging.interval=1", "logging.fp8_stats_interval=2", "model.moe.capacity_factor=1.0",
        "model.moe.z_loss_coeff=0.001", "model.moe.expert_bias=true", "checkpoint.interval=0",
        "checkpoint.interval_minutes=0", "checkpoint.at_end=false", f"run.output_root={tmp_path}", "run.name=r",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    cfg.validate()
    train(cfg, str(tmp_path / "r"))
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for i in (1, 2):
            for name in ("load_max_over_mean", "load_p95_over_mean", "dropped", "aux_loss", "z_loss",
                         "expert_bias_norm"):  # fmt: skip
                assert f"moe/layer{i}/{name}" in r, (r["step"], i, name)
        assert "moe/layer0/aux_loss" not in r  # the dense block
        assert records[0]["loss"] is not None and 0.0 <= r["moe/layer1/dropped"] < 1.0
    assert not any(k.startswith("fp8/") for k in records[0])
    fp8 = {k: v for k, v in records[1].items() if k.startswith("fp8/")}
    assert set(fp8) == {f"fp8/layer{i}/{op}/{s}" for i in (1, 2) for op in OPERANDS
                        for s in ("amax", "underflow", "saturation")}  # fmt: skip
    assert all(v > 0 for k, v in fp8.items() if k.endswith("/amax"))
    assert all(v == 0.0 for k, v in fp8.items() if k.endswith("/saturation"))  # current scaling
