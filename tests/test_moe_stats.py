"""Per-layer MoE metrics (trainer/layer_metrics.py): each layer's balancing losses from the model,
load imbalance, dropped share and expert-bias norm from planted counts, and the wandb groups
(trainer/metrics.py) with metrics.jsonl's keys left flat."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe.config import ModelConfig, MoEConfig
from moe.model import build_model
from trainer.config import TrainConfig
from trainer.layer_metrics import layer_metrics, moe_layer_metrics
from trainer.metrics import MetricsLogger
from wandb_fake import install_fake_wandb

LOSSES = ("aux_loss", "seq_aux_loss", "z_loss")


def _model(**moe):
    """Four blocks, the first dense: MoE layers at block indices 1, 2, 3."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16, first_k_dense=1,
                      moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32, aux_loss_coeff=0.01, seq_aux_loss_coeff=0.1,
                                    z_loss_coeff=0.001, **moe))  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def test_model_output_holds_each_layer_s_losses():
    model = _model()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert set(out.layer_aux_losses) == set(out.aux_losses) == set(LOSSES)
    for name, per_layer_Y in out.layer_aux_losses.items():
        assert per_layer_Y.shape == (3,) and not per_layer_Y.requires_grad
        assert len(set(per_layer_Y.tolist())) == 3  # three routers, three values
        torch.testing.assert_close(per_layer_Y.sum(), out.aux_losses[name].detach(), rtol=1e-6, atol=0)


def test_layer_metrics_from_planted_counts():
    counts_YE = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [1, 2, 3, 10]])
    aux = {"aux_loss": torch.tensor([0.03, 0.06, 0.09]), "z_loss": torch.tensor([0.3, 0.0, 0.6])}
    bias = [torch.tensor([3.0, 4.0]), torch.zeros(2), torch.tensor([1.0, 0.0])]
    m = moe_layer_metrics([1, 2, 3], counts_YE, aux, steps=3, assignments=50, expert_bias_E=bias)
    mean = counts_YE.double().mean(dim=1)
    for y, i in enumerate((1, 2, 3)):
        load = counts_YE[y].double().numpy()
        assert m[f"moe/layer{i}/load_max_over_mean"] == pytest.approx(load.max() / mean[y].item())
        assert m[f"moe/layer{i}/load_p95_over_mean"] == pytest.approx(np.percentile(load, 95) / mean[y].item())
        assert m[f"moe/layer{i}/dropped"] == pytest.approx(1.0 - load.sum() / 50)
        assert m[f"moe/layer{i}/aux_loss"] == pytest.approx(aux["aux_loss"][y].item() / 3)
        assert m[f"moe/layer{i}/z_loss"] == pytest.approx(aux["z_loss"][y].item() / 3)
    assert m["moe/layer1/load_max_over_mean"] == 1.0 and m["moe/layer2/load_max_over_mean"] == 4.0
    assert [m[f"moe/layer{i}/expert_bias_norm"] for i in (1, 2, 3)] == [5.0, 0.0, 1.0]
    none = moe_layer_metrics([1], counts_YE[:1], {}, steps=1, assignments=None, expert_bias_E=None)
    assert set(none) == {"moe/layer1/load_max_over_mean", "moe/layer1/load_p95_over_mean"}


@pytest.mark.parametrize("capacity, bias", [(None, False), (1.25, True)])
def test_layer_metrics_of_a_model(capacity, bias):
    """Keys by block index (the dense block 0 has none), each loss the mean over the window's
    steps, a dropped share only under a capacity limit, a bias norm only with a bias."""
    model = _model(capacity_factor=capacity, expert_bias=bias)
    if bias:
        for i, layer in enumerate(model.moe_layers()):
            layer.router.expert_bias.fill_(0.5 * i)
    cfg = TrainConfig()
    cfg.model = model.cfg
    trainer = SimpleNamespace(env=SimpleNamespace(world_size=1, distributed=False, is_main=True), model=model,
                              cfg=cfg, fp8=SimpleNamespace(stats=SimpleNamespace(read=lambda *a: ({}, []))), step=4)
    counts_YE = torch.tensor([[4, 4, 4, 4], [8, 4, 2, 1], [16, 0, 0, 0]])
    aux = {name: torch.tensor([1.0, 2.0, 3.0]) for name in LOSSES}
    record = layer_metrics(trainer, counts_YE, aux, steps=2, tokens=8)
    assert not any(k.startswith("moe/layer0/") for k in record)
    assert record["moe/layer3/z_loss"] == 1.5 and record["moe/layer3/load_max_over_mean"] == 4.0
    assert ("moe/layer2/dropped" in record) == (capacity is not None)
    if capacity is not None:  # 8 tokens x top-2 = 16 assignments, 15 kept
        assert record["moe/layer2/dropped"] == pytest.approx(1 / 16)
    assert ("moe/layer1/expert_bias_norm" in record) == bias
    if bias:
        assert record["moe/layer3/expert_bias_norm"] == pytest.approx(1.0 * 2)  # 4 experts of 1.0


def test_wandb_groups_the_keys_and_metrics_jsonl_keeps_them_flat(tmp_path, monkeypatch):
    events = install_fake_wandb(monkeypatch)
    logger = MetricsLogger(str(tmp_path), {}, "offline", "p", "n", "g", "bf16")
    record = {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "memory_gib": 1.0, "load_imbalance": 1.1,
              "mfu": None, "moe/layer1/dropped": 0.0, "fp8/layer1/x/amax": 3.0}  # fmt: skip
    logger.log(record, {"expert_load/layer_0": [1.0, 2.0]})
    logger.log({"step": 1, "val_loss": 2.5})
    logger.log({"step": 2, "sqnr/L1/y": 26.0})
    logger.close()
    logged = [e[1] for e in events if isinstance(e, tuple)]  # the payloads
    assert set(logged[0]) == {"train/loss", "train/lr", "perf/tokens_per_s", "mem/memory_gib", "moe/load_imbalance",
                              "moe/layer1/dropped", "fp8/layer1/x/amax", "moe/expert_load/layer_0"}  # fmt: skip
    assert logged[1] == {"val/loss": 2.5} and logged[2] == {"fp8/sqnr/L1/y": 26.0}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == record | {"expert_load/layer_0": [1.0, 2.0]}
    assert lines[1] == {"step": 1, "val_loss": 2.5}
