"""Metrics logging: files always, wandb optional and never fatal."""

import json
import sys

import pytest

from trainer.metrics import MetricsLogger, format_eta, format_line, last_logged_step, load_imbalance, wandb_run_id
from wandb_fake import install_fake_wandb

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
    line = format_line(RECORD, 1000)
    assert line.startswith("step    3/1000 | loss 2.5000 |") and "load max/mean 1.25" in line
    assert "1.00k tok/s" in line and "ETA" not in line  # no step time in the record: no ETA


def test_line_has_step_time_tokens_per_second_and_eta():
    line = format_line(RECORD | {"step": 120, "step_ms": 412.4, "tokens_per_s": 19_871.0}, 1000)
    parts = line.split(" | ")
    assert parts[0] == "step  120/1000" and "412 ms/step" in parts and "19.9k tok/s" in parts
    assert parts[-1] == "ETA 6m03s"  # 880 steps left at 412.4 ms
    assert format_line(RECORD | {"step": 1000, "step_ms": 412.4}, 1000).endswith("ETA 0s")
    assert format_line(RECORD | {"tokens_per_s": 2.5e6}, 10).split(" | ")[4] == "2.50M tok/s"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (41.6, "42s"), (60, "1m00s"), (3599.4, "59m59s"),
                                           (3600, "1h00m"), (11_220, "3h07m"), (2 * 86400 + 4 * 3600 + 5, "2d04h")])
def test_eta_text(seconds, text):
    assert format_eta(seconds) == text


def test_wandb_run_id_is_the_run_directory_s(tmp_path):
    a = wandb_run_id("qwen3 30b/a3b:run#1", str(tmp_path / "qwen3 30b/a3b:run#1"))
    assert a == wandb_run_id("qwen3 30b/a3b:run#1", str(tmp_path / "x" / ".." / "qwen3 30b/a3b:run#1"))
    assert a.startswith("qwen3-30b-a3b-run-1-") and len(a) == len("qwen3-30b-a3b-run-1-") + 8
    assert a != wandb_run_id("qwen3 30b/a3b:run#1", str(tmp_path / "other_root" / "qwen3 30b/a3b:run#1"))
    long = wandb_run_id("n" * 200, str(tmp_path))
    assert len(long) == 64 and set(long[:55]) == {"n"} and long[55] == "-"


def test_last_logged_step_skips_a_cut_line_and_reads_past_a_chunk(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_logged_step(str(path)) == 0  # no file yet
    path.write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n" + json.dumps({"step": 8, "h": [1.0] * 500}) + "\n"
                    + '{"step": 9, "lo')  # a crash cut the last line
    assert last_logged_step(str(path), chunk=64) == 8
    path.write_text("")
    assert last_logged_step(str(path)) == 0


def test_resumed_logger_leaves_logged_steps_out_of_wandb(tmp_path, monkeypatch):
    """The steps a resumed launch re-runs are in the wandb run already: file only."""
    events = install_fake_wandb(monkeypatch)
    first = MetricsLogger(str(tmp_path), {"a": 1}, "offline", "p", "n", "g", "bf16")
    for step in (1, 2, 3, 4):
        first.log(RECORD | {"step": step})
    first.close()
    second = MetricsLogger(str(tmp_path), {"a": 1}, "offline", "p", "n", "g", "bf16")  # from a step-2 checkpoint
    for step in (3, 4, 5):
        second.log(RECORD | {"step": step})
    second.close()
    calls = [e if isinstance(e, dict) else e[0] for e in events]  # init kwargs, or a logged step
    init1, init2 = calls[0], calls[5]
    assert calls[1:5] == [1, 2, 3, 4] and calls[6:] == [5]
    assert init1["id"] == init2["id"] == wandb_run_id("n", str(tmp_path)) and init1["resume"] == "allow"
    assert init1["config"] == {"a": 1}
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 3, 4, 5]
    explicit = MetricsLogger(str(tmp_path / "b"), {}, "offline", "p", "n", "g", "bf16", wandb_id="my-run_1")
    explicit.close()
    assert events[-1]["id"] == "my-run_1"


def test_line_shows_all_to_all_time_only_under_expert_parallelism():
    assert "a2a" not in format_line(RECORD | {"a2a_ms": None, "a2a_share": None}, 10)
    line = format_line(RECORD | {"a2a_ms": 12.34, "a2a_share": 0.081}, 10)
    assert "a2a 12.3 ms (8%)" in line, line
