"""bench/train_step.py on CPU: its model configs (the loss-parity model among them).

The timing itself needs a GPU; here the configs it composes are checked against what the
experiments promise (tests/test_input_errors.py checks that it refuses without a GPU and never
replaces a results file with failed rows).
"""

import pytest
import torch

from bench import train_step
from moe.counting import count_params, training_flops_per_token
from moe.model import MoETransformer


def _counts(cfg):
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    return count_params(model), training_flops_per_token(model, cfg.run.seq_len)


@pytest.mark.parametrize("impl", train_step.IMPLS)
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
