"""Resumes and checkpoints as a user meets them (`python train.py` in subprocesses, tiny model):
a changed config is listed and refused or applied on request, a longer run keeps its lr schedule,
the recorded config is what the run used, no checkpoint is written during a non-finite streak,
checkpoints by time, one launch per run directory, and the FP8-on-a-CPU notice."""

import socket
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from app_helpers import app_env, by_step, run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return app_env(tmp_path_factory.mktemp("cache"))


def _recorded(run_dir: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))


def test_changed_config_is_refused_or_applied_and_the_schedule_keeps_its_length(env, tmp_path):
    run_train(env, tmp_path, "run.name=r", "run.steps=4")  # warm-up 2, cosine over steps 2..4
    run_dir = tmp_path / "r"
    # Another lr on resume: refused before a step, naming the key and the option.
    proc = run_train(env, tmp_path, "run.name=r", "run.steps=6", "optim.lr=0.01", check=False)
    assert proc.returncode != 0
    assert "optim.lr: 0.003 -> 0.01" in proc.stderr and "checkpoint.apply_changes=true" in proc.stderr
    assert max(by_step(run_dir)) == 4
    # A longer run alone is free, and keeps the schedule of 4 steps: its end, min_lr_ratio x lr.
    run_train(env, tmp_path, "run.name=r", "run.steps=6")
    lrs = by_step(run_dir, "lr")
    assert lrs[5] == pytest.approx(0.003 * 0.1) and lrs[6] == pytest.approx(0.003 * 0.1)
    assert _recorded(run_dir)["optim"]["schedule_steps"] == 4 and _recorded(run_dir)["run"]["steps"] == 6
    # Applied on request: the new lr is the base from this step on, on the same schedule.
    proc = run_train(env, tmp_path, "run.name=r", "run.steps=7", "optim.lr=0.01", "checkpoint.apply_changes=true")
    assert "optim.lr: 0.003 -> 0.01  (applied: checkpoint.apply_changes)" in proc.stderr
    assert by_step(run_dir, "lr")[7] == pytest.approx(0.01 * 0.1)
    assert _recorded(run_dir)["optim"]["lr"] == 0.01


def test_no_checkpoint_during_a_non_finite_streak(env, tmp_path):
    # lr 1e30: step 1's update blows the weights up, every later loss is NaN; a checkpoint a step
    # would otherwise leave only post-blow-up checkpoints after pruning (keep_last=2).
    proc = run_train(env, tmp_path, "run.name=nan", "run.steps=5", "optim.lr=1e30", "run.max_nonfinite_steps=10",
                     "checkpoint.interval=1", "checkpoint.keep_last=2")  # fmt: skip
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert ckpts == ["step_000001"], ckpts
    assert "no checkpoint saved during a non-finite streak" in proc.stderr
    assert "non-finite gradient norm nan (loss" in proc.stderr  # the loss itself is finite


def test_checkpoints_by_time(env, tmp_path):
    run_train(env, tmp_path, "run.name=timed", "run.steps=3", "checkpoint.interval_minutes=1e-6",
              "checkpoint.keep_last=0", "checkpoint.at_end=false")  # fmt: skip
    ckpts = sorted(p.name for p in (tmp_path / "timed" / "checkpoints").iterdir())
    assert ckpts == ["step_000001", "step_000002", "step_000003"], ckpts


def test_a_second_launch_of_a_live_run_is_refused_at_once(env, tmp_path):
    from trainer.run_lock import FileLock

    run_dir = tmp_path / "live"
    run_dir.mkdir()
    with FileLock(run_dir / ".lock"):  # held by this (live) process, as a running launch holds it
        proc = run_train(env, tmp_path, "run.name=live", "run.steps=2", check=False, timeout=120)
    assert proc.returncode != 0
    assert socket.gethostname() in proc.stderr and "pid" in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / ".hydra").exists()


def test_fp8_on_a_cpu_is_announced(env, tmp_path):
    proc = run_train(env, tmp_path, "run.name=fp8", "run.steps=2", "fp8=rowwise", "model.dim=128",
                     "model.moe.ffn_dim=128", "run.micro_batch_size=1")  # fmt: skip
    assert "on a CPU: the FP8 GEMMs run as a torch emulation" in proc.stderr
