"""Metrics logging: files always, wandb optional and never fatal."""

import json
import sys

from trainer.metrics import MetricsLogger, format_line, load_imbalance

RECORD = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0,
          "tflops_per_gpu": 1.0, "mfu": None, "memory_gib": 1.0, "load_imbalance": 1.25, "skipped_steps": 0}


def test_missing_wandb_does_not_stop_logging(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    logger = MetricsLogger(str(tmp_path), {}, "offline", "p", "n", "g", "bf16")
    logger.log(RECORD, {"expert_load/layer_0": [1.0, 2.0]})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["expert_load/layer_0"] == [1.0, 2.0]


def test_broken_wandb_init_does_not_stop_logging(tmp_path, monkeypatch):
    class Broken:
        class Settings:
            def __init__(self, **kw):
                pass

        @staticmethod
        def init(**kw):
            raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", Broken)
    logger = MetricsLogger(str(tmp_path), {}, "online", "p", "n", "g", "bf16")
    logger.log(RECORD)
    logger.close()
    assert (tmp_path / "metrics.jsonl").exists()


def test_line_and_imbalance():
    import torch

    assert load_imbalance(torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]])) == (1.0 + 4.0) / 2
    line = format_line(RECORD)
    assert "step      3" in line and "loss 2.5000" in line and "load max/mean 1.25" in line


def test_line_shows_all_to_all_time_only_under_expert_parallelism():
    assert "a2a" not in format_line(RECORD | {"a2a_ms": None, "a2a_share": None})
    line = format_line(RECORD | {"a2a_ms": 12.34, "a2a_share": 0.081})
    assert "a2a 12.3 ms (8%)" in line, line
