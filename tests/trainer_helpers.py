"""A tiny in-process Trainer on the CPU, fed batches directly (test_step_casts, test_grad_clip).
Test files import it as `trainer_helpers` (tests/ is on sys.path)."""

import types

import torch

import trainer.loop
from trainer.config import TrainConfig
from trainer.parallel import DistEnv

VOCAB = 61


def tiny_train_config(steps: int, grad_accum: int) -> TrainConfig:
    """Two blocks of dim 32 (a dense one, an MoE one of 4 experts top-2), 2 x 16 tokens a
    micro-batch on the CPU, no evaluation, wandb or checkpoints; callers set their own fields,
    then validate()."""
    c = TrainConfig()
    m = c.model
    m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.max_seq_len = 32, 2, 4, 2, VOCAB, 16
    m.first_k_dense = 1
    m.moe.num_experts, m.moe.top_k, m.moe.ffn_dim = 4, 2, 24
    c.data.kind, c.data.mock_vocab_size, c.data.num_workers = "mock", VOCAB, 0
    c.run.seq_len, c.run.micro_batch_size, c.run.grad_accum, c.run.steps = 16, 2, grad_accum, steps
    c.run.device, c.run.eval_interval = "cpu", 0
    c.optim.warmup_steps = 1
    c.logging.wandb = "disabled"
    c.checkpoint.interval_minutes, c.checkpoint.at_end = 0, False
    return c


def token_batches(seed: int):
    """Endless micro-batches of random tokens, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, VOCAB, (2, 17), generator=gen)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def cpu_trainer(cfg: TrainConfig, run_dir, monkeypatch, device: str = "cpu") -> "trainer.loop.Trainer":
    """One process's Trainer (on the CPU unless `device` says) with no dataset built: the test
    feeds it token_batches."""
    no_data = types.SimpleNamespace(check_model_vocab=lambda vocab: None, valid=None)
    monkeypatch.setattr(trainer.loop, "build_train_valid", lambda *args, **kwargs: no_data)
    return trainer.loop.Trainer(cfg, str(run_dir), DistEnv(0, 1, 0, torch.device(device)))


def steps_and_weights(t: "trainer.loop.Trainer", steps: int, batches) -> tuple[list, list[torch.Tensor]]:
    """Run `steps` train steps on the micro-batch iterator `batches`: each step's (loss,
    grad_norm), then a copy of every parameter."""
    stats = [t.train_step(batches) for _ in range(steps)]
    return [(s["loss"], s["grad_norm"]) for s in stats], [p.detach().clone() for p in t.model.parameters()]
