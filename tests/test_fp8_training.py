"""moe/fp8/training.py: the one FP8 handle the trainer calls (convert, after backward, after the
optimizer step), and the fp8 config's errors."""

import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.experts import GroupedMLP
from moe.fp8.float8_linear import Float8Linear
from moe.fp8.grouped_mlp import Fp8GroupedMLP
from moe.fp8.recipe import FP8Config
from moe.fp8.training import Fp8Training
from moe.model import build_model


def _model():
    cfg = ModelConfig(vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=128))  # fmt: skip
    return build_model(cfg)


def test_bf16_converts_nothing():
    model = _model()
    fp8 = Fp8Training(FP8Config())
    assert fp8.experts_recipe is None and fp8.dense_recipe is None
    fp8.convert(model)
    assert all(type(layer.experts) is GroupedMLP for layer in model.moe_layers())
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


@pytest.mark.parametrize("grad_accum, cached", [(1, False), (4, True)])
def test_convert_swaps_experts_and_dense_layers_in_place(grad_accum, cached):
    model = _model()
    params = dict(model.named_parameters())
    fp8 = Fp8Training(FP8Config(experts="blockwise", dense="tensorwise_delayed", pow2_scales=True), grad_accum)
    fp8.convert(model)
    for layer in model.moe_layers():
        assert type(layer.experts) is Fp8GroupedMLP and layer.experts.recipe == fp8.experts_recipe
        assert layer.experts.recipe.pow2_scales and layer.experts.cache_weights is cached
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert linears and all(m.recipe == fp8.dense_recipe for m in linears)
    assert type(model.output) is torch.nn.Linear  # the head stays in high precision
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects


def test_after_backward_updates_delayed_scales_only_when_delayed():
    tokens = torch.randint(0, 64, (2, 17))
    for dense, moves in (("tensorwise_delayed", True), ("tensorwise", False)):
        torch.manual_seed(0)
        model = _model()
        fp8 = Fp8Training(FP8Config(dense=dense))
        fp8.convert(model)
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        layer = model.layers[0].attn.wq
        before = layer.scale_O.clone() if moves else None
        fp8.after_backward(model)
        if moves:  # this step's amaxes became the next step's scales
            assert not torch.equal(layer.scale_O, before) and layer.amax_history_OL[:, 1].gt(0).all()
        else:
            assert not hasattr(layer, "amax_history_OL")


def test_after_optimizer_step_drops_every_cached_fp8_weight():
    model = _model()
    fp8 = Fp8Training(FP8Config(experts="rowwise", dense="tensorwise"), grad_accum=2)
    fp8.convert(model)
    tokens = torch.randint(0, 64, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    experts = model.moe_layers()[0].experts
    linear = model.layers[0].attn.wq
    assert experts._w1_cache._value is not None and linear._weight_cache._value is not None
    fp8.after_optimizer_step(model)
    assert experts._w1_cache._value is None and experts._w2_cache._value is None
    assert linear._weight_cache._value is None


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(experts="int4"), "fp8.experts must be one of"),
        (dict(dense="blockwise"), "fp8.dense recipe must be one of"),
        (dict(dense_grad_dtype="e3m4"), "fp8.dense_grad_dtype must be one of"),
        (dict(dense="rowwise", dense_grad_dtype="e5m2"), "fp8.dense=rowwise takes fp8.dense_grad_dtype=e4m3 only"),
        (dict(amax_history_len=0), "fp8.amax_history_len must be >= 1"),
        (dict(amax_margin=-1), "fp8.amax_margin must be >= 0"),
    ],
)
def test_bad_fp8_config_is_a_clear_error(fields, needle):
    with pytest.raises(ValueError, match=needle):
        Fp8Training(FP8Config(**fields))
