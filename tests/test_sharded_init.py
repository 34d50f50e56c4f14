"""trainer/sharded_init.py: layout-independent initial weights, replayed one parameter at a time.

The 4-process layouts are in tests/test_fsdp_ep.py; here one process: the values depend on the
seed and the parameter's name only, every parameter must be initialised through torch.nn.init,
and (GPU) the build's peak memory is the model plus one full parameter.
"""

import pytest
import torch
from torch import nn

from trainer.sharded_init import ReplayOnShards, materialize, param_seed


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(64, 8))
        self.b = nn.Parameter(torch.empty(8))
        self.register_buffer("n", torch.empty(3))

    def init_weights(self) -> None:
        nn.init.normal_(self.a, std=0.02)
        nn.init.ones_(self.b)
        self.n.fill_(7.0)  # a buffer: written as it is


def _meta(cls=_Two):
    with torch.device("meta"):
        return cls()


def test_values_depend_on_seed_and_name_only():
    m1 = materialize(_meta(), torch.device("cpu"), seed=5)
    m2 = materialize(_meta(), torch.device("cpu"), seed=5)
    assert torch.equal(m1.a, m2.a) and torch.equal(m1.b, torch.ones(8)) and torch.equal(m1.n, torch.full((3,), 7.0))
    want = torch.empty(64, 8)
    nn.init.normal_(want, std=0.02, generator=torch.Generator().manual_seed(param_seed(5, "a")))
    assert torch.equal(m1.a, want)
    assert not torch.equal(materialize(_meta(), torch.device("cpu"), seed=6).a, m1.a)
    assert param_seed(5, "a") != param_seed(5, "b") and param_seed(5, "a") == param_seed(5, "a")


def test_a_parameter_left_uninitialised_is_named():
    class Forgets(_Two):
        def init_weights(self) -> None:
            nn.init.normal_(self.a)

    with pytest.raises(RuntimeError, match=r"left parameters \['b'\] uninitialised"):
        materialize(_meta(Forgets), torch.device("cpu"), seed=0)


def test_an_init_it_cannot_replay_is_named():
    class Copies(_Two):
        def init_weights(self) -> None:
            nn.init.normal_(self.a)
            self.b.copy_(torch.arange(8.0))

    with pytest.raises(TypeError, match="initialises parameter 'b' with copy_"):
        materialize(_meta(Copies), torch.device("cpu"), seed=0)


def test_outside_the_mode_nothing_changes():
    m = materialize(_meta(), torch.device("cpu"), seed=0)
    with ReplayOnShards(m, seed=0):
        y = m.a.sum()  # not an init call: runs as usual
    assert torch.equal(y, m.a.sum())


@pytest.mark.gpu
def test_build_peak_is_the_model_plus_one_full_parameter():
    from trainer.config import TrainConfig
    from trainer.loop import build
    from moe.fp8.training import Fp8Training
    from trainer.parallel import DistEnv

    cfg = TrainConfig()
    cfg.model.dim, cfg.model.n_layers, cfg.model.vocab_size = 2048, 2, 32000
    cfg.model.moe.num_experts, cfg.model.moe.ffn_dim = 16, 1536
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build(cfg, DistEnv(0, 1, 0, torch.device("cuda")), Fp8Training(cfg.fp8))
    params = [p for p in model.parameters()]
    total = sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in model.buffers())
    largest = max(p.numel() * p.element_size() for p in params)
    peak = torch.cuda.max_memory_allocated() - base
    # The allocator rounds each block up (to 512 B, and 2 MiB segments): 1% slack.
    assert peak <= (total + largest) * 1.01, (peak, total, largest)
    assert peak >= total
