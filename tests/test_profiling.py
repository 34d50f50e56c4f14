"""run.profile (trainer/profiling.py): a tiny run writes a Chrome trace of the chosen step and
nothing for the others; bad steps are refused naming the field; off, nothing is built."""

import gzip
import json

import pytest
import torch
from app_helpers import app_env, run_train

from trainer.config import TrainConfig
from trainer.profiling import ProfileConfig, build_step_profiler, profiled, trace_path


def test_tiny_run_traces_the_chosen_step(tmp_path):
    out = tmp_path / "out"
    proc = run_train(app_env(tmp_path / "cache"), out, "run.name=prof", "run.steps=2", "run.device=cpu",
                     "run.profile.steps=[2]", "checkpoint.interval=0", "checkpoint.at_end=false", "data=mock",
                     "data.mock_vocab_size=4096")  # fmt: skip
    run_dir = out / "prof"
    written = sorted(p.name for p in (run_dir / "profile").iterdir())
    assert written == ["step2.rank0.json.gz"]  # step 1 not traced; no memory snapshot on a CPU
    with gzip.open(trace_path(run_dir, 2, 0), "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert len(events) > 100 and any(n.startswith("aten::mm") or n == "aten::addmm" for n in names), sorted(names)[:50]
    assert f"step 2 profiled: trace {trace_path(run_dir, 2, 0)}" in proc.stderr + proc.stdout


def test_steps_out_of_range_are_refused():
    cfg = TrainConfig()
    cfg.run.steps = 10
    cfg.optim.warmup_steps = 2
    cfg.run.profile.steps = [3, 11]
    with pytest.raises(ValueError, match=r"run.profile.steps must hold optimizer steps in \[1, run.steps=10\] "
                                         r"\(steps count from 1\), got \[3, 11\]"):  # fmt: skip
        cfg.validate()
    cfg.run.profile.steps = [0]
    with pytest.raises(ValueError, match="run.profile.steps"):
        cfg.validate()
    cfg.run.profile.steps = [1, 10]
    cfg.validate()


def test_off_builds_nothing_and_other_steps_run_as_they_are(tmp_path, caplog):
    cpu = torch.device("cpu")
    assert build_step_profiler(ProfileConfig(), tmp_path, 0, cpu) is None
    with profiled(None, 1):
        pass
    profiler = build_step_profiler(ProfileConfig(steps=[5]), tmp_path, 0, cpu, start_step=7)
    assert "every one is at or before step 7" in caplog.text
    with profiler.around(4):
        torch.ones(2) @ torch.ones(2)
    assert not (tmp_path / "profile").exists()


@pytest.mark.gpu
def test_cuda_step_writes_kernels_and_a_memory_snapshot(tmp_path):
    import pickle

    from bench.kernel_families import classify, gpu_events, load_trace
    from trainer.profiling import memory_path

    cuda = torch.device("cuda")
    profiler = build_step_profiler(ProfileConfig(steps=[3]), tmp_path, 0, cuda)
    a = torch.randn(1024, 1024, device=cuda, dtype=torch.bfloat16)
    with profiler.around(3):
        b = (a @ a).float().sum()
    assert b.isfinite()
    kernels = gpu_events(load_trace(trace_path(tmp_path, 3, 0)))
    assert "gemm_bf16" in {classify(k.name) for k in kernels}, [k.name for k in kernels]
    with open(memory_path(tmp_path, 3, 0), "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["segments"] and any(snapshot["device_traces"])  # the step's allocations
