"""bench/train_step.py on CPU: its model configs (the loss-parity model and the Qwen3 slice among
them), each impl's overrides, the speedup columns.

The timing itself needs a GPU; here the configs it composes are checked against what the
experiments promise (tests/test_input_errors.py checks that it refuses without a GPU and never
replaces a results file with failed rows).
"""

import pytest
import torch

from bench import train_step
from moe.counting import count_params, training_flops_per_token
from moe.model import MoETransformer
from trainer.memory_plan import GIB, REFUSE_RATIO, plan_memory


def _counts(cfg):
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    return count_params(model), training_flops_per_token(model, cfg.run.seq_len)


@pytest.mark.parametrize("impl", ["bf16", "rowwise", "blockwise"])
def test_parity_model_is_issue_7_sized(impl):
    cfg = train_step.compose_config("parity_300m", impl, steps=13, extra=[])
    assert cfg.fp8.experts == impl and cfg.data.kind == "mock" and cfg.data.mock_vocab_size == 32000
    moe = cfg.model.moe
    assert moe.num_experts >= 8 and moe.top_k >= 2
    counts, flops = _counts(cfg)
    assert counts.total >= 300e6, counts  # issue 7: at least 300M total parameters
    # Sized for ~2 min a run on one H200: 8 x 1024 tokens a step, ~0.7 GFLOP a token.
    tokens = cfg.run.micro_batch_size * cfg.run.grad_accum * cfg.run.seq_len
    assert tokens == 8192 and flops * tokens / 120e12 < 0.06  # < 60 ms a step at 120 TFLOP/s


def test_parity_experiment_as_train_py_runs_it():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(train_step.REPO / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=["experiment=parity_300m"]))
    cfg.validate()
    assert cfg.run.steps >= 1000 and cfg.data.kind == "megatron"
    assert cfg.data.paths[0].endswith("python_corpus/python_sources")
    assert cfg.run.eval_interval == 100 and cfg.checkpoint.interval == 0
    assert cfg.run.name == "parity_300m-bf16" and cfg.logging.group == "parity_300m"
    # the run consumes well under one epoch of the ~40M-token corpus tools/prepare_python_corpus.py prepares
    assert cfg.run.steps * cfg.run.micro_batch_size * cfg.run.seq_len < 10e6


def test_mixtral_2layer_row():
    cfg = train_step.compose_config("mixtral_2layer", "rowwise", steps=13, extra=[])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.moe.num_experts, cfg.run.seq_len) == (4096, 2, 8, 4096)


@pytest.mark.parametrize("model", list(train_step.MODELS))
def test_every_impl_row_composes(model):
    cfgs = {impl: train_step.compose_config(model, impl, steps=13, extra=[]) for impl in train_step.IMPLS}
    assert {i: c.fp8.experts for i, c in cfgs.items()} == {
        "bf16": "bf16", "rowwise": "rowwise", "blockwise": "blockwise", "rowwise_all": "rowwise",
        "bf16_forward_cast": "bf16"}
    # rowwise_all differs from rowwise in the dense layers' recipe alone
    everywhere = cfgs["rowwise_all"]
    assert (cfgs["rowwise"].fp8.dense, everywhere.fp8.dense) == ("bf16", "rowwise")
    everywhere.fp8.dense = "bf16"
    assert everywhere == cfgs["rowwise"]
    # The reference is the default BF16 step; the old one differs in exactly the two knobs.
    ref, old = cfgs["bf16"], cfgs["bf16_forward_cast"]
    assert (ref.run.weight_cast, ref.optim.fused) == ("step", True)
    assert (old.run.weight_cast, old.optim.fused) == ("forward", False)
    old.run.weight_cast, old.optim.fused = ref.run.weight_cast, ref.optim.fused
    assert old == ref


def test_qwen3_slice_fits_one_80gb_gpu_with_the_plans_margin():
    h100_bytes = 79 * GIB  # an H100 80 GB's torch.cuda total_memory is ~79.1 GiB
    for impl in train_step.IMPLS:
        cfg = train_step.compose_config("qwen3_slice", impl, steps=13, extra=[])
        m = cfg.model
        assert (m.dim, m.n_layers, m.moe.num_experts, m.moe.top_k, m.vocab_size) == (2048, 4, 128, 8, 151936)
        assert (cfg.run.seq_len, cfg.run.grad_accum, cfg.run.activation_checkpointing) == (4096, 1, False)
        plan = plan_memory(cfg, 1)
        assert plan.total_bytes * REFUSE_RATIO <= h100_bytes, (impl, plan.gib)
    # One more sequence would not fit BF16, the recipe that needs the most: the slice fills the GPU.
    cfg = train_step.compose_config("qwen3_slice", "bf16", steps=13, extra=[])
    cfg.run.micro_batch_size += 1
    assert plan_memory(cfg, 1).total_bytes * REFUSE_RATIO > h100_bytes


def test_speedups_against_both_references():
    rows = [{"model": "m", "impl": "bf16", "tokens_per_s": 100.0},
            {"model": "m", "impl": "rowwise", "tokens_per_s": 150.0},
            {"model": "m", "impl": "bf16_forward_cast", "tokens_per_s": 80.0},
            {"model": "n", "impl": "rowwise", "tokens_per_s": 10.0},
            {"model": "m", "impl": "blockwise", "tokens_per_s": None, "error": "x"}]  # fmt: skip
    train_step.add_speedups(rows)
    assert [r.get("speedup_vs_bf16") for r in rows] == [1.0, 1.5, 0.8, None, None]
    assert [r.get("speedup_vs_bf16_forward_cast") for r in rows] == [1.25, 1.875, 1.0, None, None]
