"""bench/all.py on CPU: argument handling, the refusal without a GPU, --dry-run, and the runner itself
(deadline skips, a stage's time limit, failures, results files) with `python -c` stand-in stages."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.all import Stage, default_stages, main, parse_only, skip_reason

REPO = Path(__file__).resolve().parents[1]
NAMES = [s.name for s in default_stages()]
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: torch sees none


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_default_table():
    assert NAMES == ["tests", "kernels", "moe_block", "train_step", "step_profile", "gemm", "linear", "all_to_all", "scaling",
                     "memory_plan", "fp8_all_gather", "glue", "hf_experts", "optim_step"]
    stages = {s.name: s for s in default_stages(["-k", "permute"])}
    assert stages["tests"].argv[-2:] == ("-k", "permute") and "gpu" in stages["tests"].argv
    assert {n for n, s in stages.items() if s.min_gpus == 2} == {"all_to_all", "scaling"}
    assert all(0 < s.expected_s <= s.limit_s for s in stages.values())


def test_only_picks_in_table_order():
    assert parse_only(None, NAMES) == NAMES
    assert parse_only("gemm, tests", NAMES) == ["tests", "gemm"]
    with pytest.raises(ValueError, match=r"--only: unknown stage\(s\) \['bench'\]; allowed: tests, kernels"):
        parse_only("tests,bench", NAMES)
    with pytest.raises(ValueError, match="--only"):
        parse_only(",", NAMES)


def test_unknown_stage_and_bad_deadline_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--only", "kernels,benchmarks"], gpus=1)
    assert err.value.code == 2
    assert "unknown stage(s) ['benchmarks']; allowed: tests, kernels, moe_block" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--deadline", "0"], gpus=1)
    assert "--deadline must be > 0" in capsys.readouterr().err


def test_skip_reason():
    two = Stage("a2a", _py("pass"), expected_s=90, limit_s=300, min_gpus=2)
    assert skip_reason(two, 1, None) == "needs 2 GPUs, 1 visible"
    assert skip_reason(two, 2, None) is None
    assert skip_reason(two, 2, 90) is None
    assert skip_reason(two, 2, 89.4) == "needs ~90s, 89s left before the deadline"


def test_no_gpu_refuses_and_writes_nothing(tmp_path):
    log_dir = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "bench.all", "--log-dir", str(log_dir)], cwd=REPO, env=NO_GPU,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert not log_dir.exists()


def test_dry_run_lists_the_plan(tmp_path):
    cmd = [sys.executable, "-m", "bench.all", "--dry-run", "--deadline", "800", "--log-dir", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=REPO, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("no CUDA GPU visible") and lines[1] == "plan for 1 GPU(s), deadline 800s"
    by_stage = {line.split(":")[0]: line for line in lines[2:]}
    assert list(by_stage) == NAMES
    assert "at ~0s" in by_stage["tests"] and by_stage["tests"].endswith("-m pytest -m gpu -q --durations=15")
    assert by_stage["kernels"].endswith("-m bench.kernels") and "at ~240s" in by_stage["kernels"]
    # 240 + 420 s planned, then moe_block's ~300 s no longer fit in 800; gemm's 90 still do
    assert by_stage["moe_block"] == "moe_block: skip: needs ~300s, 140s left before the deadline"
    assert "at ~660s" in by_stage["gemm"]
    assert by_stage["scaling"] == "scaling: skip: needs 2 GPUs, 1 visible"
    assert not (tmp_path / "x").exists()


def test_runner_deadline_timeout_failure_and_results(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "old.json").write_text("{}")
    write = f"import pathlib; pathlib.Path({str(results / 'fast.json')!r}).write_text('{{}}'); print('hello')"
    stages = [
        Stage("fast", _py(write), expected_s=0.1, limit_s=60),
        Stage("broken", _py("import sys; sys.exit(3)"), expected_s=0.1, limit_s=60),
        Stage("hang", _py("import time; time.sleep(600)"), expected_s=0.1, limit_s=1.5),
        Stage("two_gpus", _py("pass"), expected_s=0.1, limit_s=60, min_gpus=2),
        Stage("too_long", _py("pass"), expected_s=1000, limit_s=2000),
        Stage("until_deadline", _py("import time; time.sleep(600)"), expected_s=0.1, limit_s=600),
    ]
    log_dir = tmp_path / "logs"
    t0 = time.monotonic()
    rc = main(["--log-dir", str(log_dir), "--deadline", "12"], stages=stages, gpus=1, results_dir=results)
    elapsed = time.monotonic() - t0
    assert rc == 1  # a stage failed / timed out
    assert elapsed < 25  # the last stage was stopped at the deadline, not its 600 s limit
    out = capsys.readouterr().out
    summary = out[out.index("\nstage ") + 1:].splitlines()
    rows = {line.split()[0]: line for line in summary[1:]}
    assert list(rows) == [s.name for s in stages]
    assert "  ok  " in rows["fast"] and rows["fast"].endswith("fast.json")  # old.json predates the stage
    assert "failed rc=3" in rows["broken"] and rows["broken"].endswith("-")
    assert "timed out" in rows["hang"] and "timed out" in rows["until_deadline"]
    assert "skipped: needs 2 GPUs, 1 visible" in rows["two_gpus"]
    assert "skipped: needs ~1000s" in rows["too_long"] and "left before the deadline" in rows["too_long"]
    assert "hang: started, limit 2s" in out and "hang: timed out after" in out  # progress lines
    assert (log_dir / "fast.log").read_text().splitlines()[1] == "hello"
    assert (log_dir / "summary.txt").read_text().splitlines() == summary
    assert "commit " in (log_dir / "env.txt").read_text()
    assert not (log_dir / "two_gpus.log").exists()


def test_all_ok_exits_zero(tmp_path, capsys):
    stages = [Stage("a", _py("pass"), expected_s=0.1, limit_s=60)]
    assert main(["--log-dir", str(tmp_path)], stages=stages, gpus=1, results_dir=tmp_path) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["a", "ok", "0", "-"]
