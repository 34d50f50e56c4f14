"""moe/fp8/sqnr_probe.py: per-layer SQNR of the FP8 experts against BF16, and a probe that leaves
training exactly as it was.

Bounds: E4M3 keeps 3 mantissa bits, so one quantized operand of Gaussian data sits near 29 dB
(relative rounding error uniform within half a step of 2^-3), a GEMM of two such near 26 dB and
two chained GEMMs a few dB lower. A probe of FP8 experts reads 15-35 dB: below, something other
than FP8 rounding went wrong; above, FP8 did not run. A BF16 GEMM against the BF16 experts is
either exact (the SQNR cap, ~3000 dB) or within BF16's rounding (> 40 dB; 8 mantissa bits).
"""

import math

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import FP8Config
from moe.fp8.sqnr_probe import QUANTITIES, probe, sqnr_db
from moe.fp8.training import Fp8Training
from moe.model import build_model

FP8_DB = (15.0, 35.0)


@pytest.fixture(autouse=True)
def kernels_by_reference_on_cpu(monkeypatch):
    """As in test_fp8_grouped_mlp.py: on a CPU the kernels' references, not the interpreter."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(fp8_cfg: FP8Config, seed=0, expert_bias=False, n_layers=3):
    """The first block dense, the others MoE (L1 and L2 of three)."""
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=128, expert_bias=expert_bias,
                                    aux_loss_coeff=0.01),
                      first_k_dense=1)  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg)
    fp8 = Fp8Training(fp8_cfg)
    fp8.convert(model)
    return model, fp8


def _tokens(seed=0):
    return torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed))


def _forward(model, tokens):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(tokens[:, :-1], tokens[:, 1:])

    return run


def test_sqnr_db():
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, torch.tensor([3.0, 4.5])) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr_db(torch.zeros(3), torch.ones(3)) is None  # no signal, no key
    assert sqnr_db(ref, ref) > 3000  # exact: capped, finite (metrics.jsonl is JSON)


def test_probe_reports_every_fp8_layer_in_the_fp8_band():
    model, _ = _model(FP8Config(experts="rowwise"))
    metrics = probe(model, _forward(model, _tokens()))
    moe_blocks = [i for i, b in enumerate(model.layers) if any(isinstance(m, Fp8GroupedMLP) for m in b.modules())]
    assert moe_blocks == [1, 2]
    assert set(metrics) == {f"sqnr/L{i}/{q}" for i in moe_blocks for q in QUANTITIES}
    for key, value in metrics.items():
        assert FP8_DB[0] < value < FP8_DB[1], (key, value)


def test_probe_places_the_error_of_a_gemm_ablation():
    """fp8.gemms=wgrad with a BF16 intermediate: the forward is the BF16 experts' own (exact), dx
    comes from BF16 GEMMs (BF16 rounding apart), only the weight gradients carry FP8 error."""
    model, _ = _model(FP8Config(experts="blockwise", gemms="wgrad", intermediate="bf16"))
    metrics = probe(model, _forward(model, _tokens()))
    for i in (1, 2):
        assert metrics[f"sqnr/L{i}/y"] > 3000
        assert metrics[f"sqnr/L{i}/dx"] > 40
        for q in ("dw1", "dw2"):
            assert FP8_DB[0] < metrics[f"sqnr/L{i}/{q}"] < FP8_DB[1], (i, q)


def test_bf16_model_has_nothing_to_probe():
    model, _ = _model(FP8Config())
    ran = []
    assert probe(model, lambda: ran.append(1)) == {} and not ran  # not even a forward


def _train(model, fp8, steps, probe_at=()):
    """AdamW steps as the trainer runs them (forward under autocast, backward, FP8 hooks,
    optimizer); the probe (on another micro-batch) before the steps in `probe_at`."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        if step in probe_at:
            before = torch.random.get_rng_state()
            probe(model, _forward(model, _tokens(seed=100 + step)))
            assert torch.equal(torch.random.get_rng_state(), before)
            assert all(p.grad is None for p in model.parameters())
            assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, Fp8GroupedMLP))
        out = _forward(model, _tokens(seed=step))()
        (out.loss + out.aux_loss).backward()
        fp8.after_backward(model)
        opt.step()
        fp8.after_optimizer_step(model)
        opt.zero_grad(set_to_none=True)
        for layer in model.moe_layers():
            layer.router.update_expert_bias()
        losses.append(out.loss.item())
    return losses


def test_probe_leaves_training_unchanged():
    """The same run with and without probes: the same losses, parameters and buffers, bit for
    bit, with every kind of state a forward can touch (delayed-scaling amax histories, the
    router's expert-bias load, FP8 weight caches across micro-batches) and torch's RNG."""
    cfg = FP8Config(experts="rowwise", dense="tensorwise_delayed")
    runs = []
    for probe_at in ((), (0, 1)):  # before the first delayed-scaling sync, and after one
        model, fp8 = _model(cfg, expert_bias=True, n_layers=2)
        fp8.cache_weights = True  # caches live across the probe: it must not leave them stale
        for m in model.modules():
            if isinstance(m, Fp8GroupedMLP):
                m.cache_weights = True
        losses = _train(model, fp8, steps=2, probe_at=probe_at)
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k], state_b[k]), k
    assert any(isinstance(m, Float8Linear) for m in model.modules())
    assert any(k.endswith("amax_history_OL") for k in state_a) and any(k.endswith("expert_bias") for k in state_a)


def test_sqnr_interval_is_validated():
    from trainer.config import TrainConfig

    cfg = TrainConfig()
    cfg.logging.sqnr_interval = -1
    with pytest.raises(ValueError, match=r"logging\.sqnr_interval must be >= 0 \(0 disables\), got -1"):
        cfg.validate()
